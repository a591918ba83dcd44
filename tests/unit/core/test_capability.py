"""Capability tokens (talos.core.capability): format, patterns, delegation, verification."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from talos.core.capability import (
    DOMAIN_PREFIX,
    MAX_CHAIN_LENGTH,
    TEXT_PREFIX,
    Capability,
    CapabilityPolicy,
    CapabilityVerifier,
    covers,
    delegate,
    issue,
    matches,
    verify,
)
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.identity import Identity
from talos.core.revocation import (
    IssuerKeys,
    KeyLookup,
    RevocationList,
    RevocationMode,
    RevocationPolicy,
    RevocationState,
    StaleListAccepted,
)
from talos.errors import (
    CapabilityDenied,
    CapabilitySignatureInvalid,
    ChainTooDeep,
    ConfigurationError,
    Expired,
    LocalProtocolError,
    MalformedFrame,
    NotYetValid,
    RevocationListStale,
    Revoked,
    ScopeMismatch,
    SignatureInvalid,
    UnsupportedVersion,
    VerificationError,
)
from talos.testing import FakeClock, SeededRng

NOW = 1_700_000_000.0
HOUR = 3600.0
ACTION = "message.send"
RESOURCE = "inbox/public/1"
DEPTHS = [(length, depth) for length in range(1, 6) for depth in range(1, length + 1)]


# -- a small world: a root issuer, five holders, one verifier --------------------------


class World:
    """``agents[0]`` issues the root token to ``agents[1]``, who delegates to ``agents[2]``..."""

    def __init__(self) -> None:
        rng, clock = SeededRng(7), FakeClock(NOW)
        self.rng = rng
        self.agents = [Identity.create(f"a{n}", rng=rng, clock=clock) for n in range(7)]
        self.verifier = Identity.create("verifier", rng=rng, clock=clock)
        self.keys = IssuerKeys(a.keylog for a in self.agents)

    @property
    def audience(self) -> str:
        return self.verifier.agent_id

    def synced_state(self, at: float = NOW) -> RevocationState:
        state = RevocationState()
        for agent in self.agents:
            state.mark_synced(agent.agent_id, at)
        return state


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@dataclass(frozen=True)
class Level:
    """How one token of a test chain differs from a plain delegation (times are offsets)."""

    actions: tuple[str, ...] = ("message.*",)
    resources: tuple[str, ...] = ("inbox/*",)
    iat: float = 0.0
    nbf: float = 0.0
    exp: float = HOUR
    key_sequence: int = 0
    signer: int | None = None  # index of the agent whose key signs; default the issuer


def link(world: World, depth: int, level: Level, parent: Capability | None) -> Capability:
    """Token ``depth`` (1-based) from agents[depth-1] to agents[depth], signed without checks."""
    issuer, subject = world.agents[depth - 1], world.agents[depth]
    signer = world.agents[depth - 1 if level.signer is None else level.signer]
    token = Capability(
        token_id=depth.to_bytes(16, "big"),
        issuer=issuer.agent_id,
        key_sequence=level.key_sequence,
        subject=subject.agent_id,
        audience=world.audience,
        actions=frozenset(level.actions),
        resources=frozenset(level.resources),
        issued_at_ms=round((NOW + level.iat) * 1000),
        not_before_ms=round((NOW + level.nbf) * 1000),
        expires_ms=round((NOW + level.exp) * 1000),
        delegations=MAX_CHAIN_LENGTH - depth,
        parent=parent,
    )
    return token.signed_by(signer.signing_key)


def chain(world: World, length: int, levels: dict[int, Level] | None = None) -> Capability:
    token: Capability | None = None
    for depth in range(1, length + 1):
        token = link(world, depth, (levels or {}).get(depth, Level()), token)
    assert token is not None
    return token


def from_depth(depth: int, length: int, level: Level) -> dict[int, Level]:
    """``level`` for every token from ``depth`` to the leaf, so attenuation still holds."""
    return {d: level for d in range(depth, length + 1)}


def policy(world: World, **kwargs: Any) -> CapabilityPolicy:
    return CapabilityPolicy(audience=world.audience, **kwargs)


Check = Callable[..., None]


def checker(
    kind: str,
    world: World,
    state: RevocationState,
    pol: CapabilityPolicy,
    keys: KeyLookup | None = None,
) -> Check:
    """The free function or a fresh cached verifier, with the same signature."""
    keys = world.keys if keys is None else keys
    if kind == "function":

        def check(token: Capability, **kw: Any) -> None:
            verify(token, revocations=state, policy=pol, keys=keys, **kw)

        return check
    return CapabilityVerifier(policy=pol, keys=keys, revocations=state).verify


KINDS = ["function", "cached"]


def run(check: Check, token: Capability, *, now: float = NOW, **kw: Any) -> None:
    check(token, action=kw.pop("action", ACTION), resource=kw.pop("resource", RESOURCE), now=now)


# -- format --------------------------------------------------------------------------


def test_round_trip_bytes_and_text(world: World) -> None:
    token = chain(world, 3)
    assert Capability.from_bytes(token.to_bytes()) == token
    text = token.to_text()
    assert text.startswith(TEXT_PREFIX)
    assert "=" not in text
    assert Capability.from_text(text) == token
    assert token.depth == 3
    assert [t.depth for t in token.chain()] == [1, 2, 3]


def test_signature_is_domain_separated(world: World) -> None:
    token = chain(world, 1)
    assert token.signed_bytes().startswith(DOMAIN_PREFIX)
    key = world.agents[0].signing_key.public_key
    key.verify(token.signature, token.signed_bytes())
    with pytest.raises(SignatureInvalid):
        key.verify(token.signature, canonical_dumps(token.body()))


def test_text_form_rejects_other_prefixes_and_versions(world: World) -> None:
    body = world_text(world)[len(TEXT_PREFIX) :]
    with pytest.raises(UnsupportedVersion):
        Capability.from_text("tcap2." + body)
    for bad in [
        "tcap." + body,
        "cap1." + body,
        TEXT_PREFIX + body + "=",
        TEXT_PREFIX + "+/" + body,
    ]:
        with pytest.raises(MalformedFrame):
            Capability.from_text(bad)
    with pytest.raises(MalformedFrame):
        Capability.from_text(b"tcap1.AA")  # type: ignore[arg-type]


def world_text(world: World) -> str:
    return chain(world, 1).to_text()


def test_text_form_must_be_canonical_base64url() -> None:
    data = b"\xa0"  # an empty map; the last base64 character carries unused bits
    encoded = base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    assert encoded == "oA"
    with pytest.raises(MalformedFrame, match="canonical"):
        Capability.from_text(TEXT_PREFIX + "oB")
    with pytest.raises(MalformedFrame):
        Capability.from_text(TEXT_PREFIX + encoded)  # decodes, but not a token


def test_decoder_checks_version_before_fields(world: World) -> None:
    raw = chain(world, 1).to_dict()
    with pytest.raises(UnsupportedVersion):
        Capability.from_bytes(canonical_dumps({**raw, "v": 2, "new": 1}))
    with pytest.raises(MalformedFrame):
        Capability.from_bytes(canonical_dumps({**raw, "extra": 1}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("id", b"short"),
        ("iss", "did:web:example"),
        ("ks", -1),
        ("act", []),
        ("act", ["b", "a"]),
        ("act", ["a", "a"]),
        ("act", ["a*b"]),
        ("act", ["has space"]),
        ("res", ["x" * 257]),
        ("nbf", 2**63),
        ("sig", b"s" * 63),
        ("par", b"not a map"),
    ],
)
def test_decoder_rejects_bad_fields(world: World, key: str, value: Any) -> None:
    raw = chain(world, 2).to_dict()
    with pytest.raises(MalformedFrame):
        Capability.from_bytes(canonical_dumps({**raw, key: value}))


def test_decoder_rejects_not_before_after_expiry(world: World) -> None:
    raw = chain(world, 1).to_dict()
    with pytest.raises(MalformedFrame, match="not-before"):
        Capability.from_bytes(canonical_dumps({**raw, "nbf": raw["exp"] + 1}))


def test_decoder_bounds_the_chain(world: World) -> None:
    raw: dict[str, Any] = chain(world, 1).to_dict()
    for _ in range(MAX_CHAIN_LENGTH - 1):
        raw = {**raw, "par": raw}
    assert Capability.from_bytes(canonical_dumps(raw)).depth == MAX_CHAIN_LENGTH
    with pytest.raises(MalformedFrame, match="chain"):
        Capability.from_bytes(canonical_dumps({**raw, "par": raw}))


# -- patterns ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("message.send", "message.send", True),
        ("message.send", "message.sendx", False),
        ("message.*", "message.send", True),
        ("message.*", "message.", True),
        ("message.*", "message", False),
        ("files*", "files-secret", True),  # no segment semantics: use "files/*"
        ("files/*", "files", False),
        ("*", "", True),
        ("*", "anything", True),
        ("a*", "a*", True),
    ],
)
def test_matches(pattern: str, value: str, expected: bool) -> None:
    assert matches(pattern, value) is expected


@pytest.mark.parametrize(
    ("parent", "child", "expected"),
    [
        ("a", "a", True),
        ("a", "a*", False),
        ("a", "ab", False),
        ("a*", "a", True),
        ("a*", "ab", True),
        ("a*", "ab*", True),
        ("a*", "a*", True),
        ("ab*", "a*", False),
        ("ab*", "a", False),
        ("*", "*", True),
        ("*", "x*", True),
        ("x*", "*", False),
    ],
)
def test_covers(parent: str, child: str, expected: bool) -> None:
    assert covers(parent, child) is expected


# -- issuing and delegating ----------------------------------------------------------


def _root(world: World, **kw: Any) -> Capability:
    args: dict[str, Any] = {
        "issuer": world.agents[0].agent_id,
        "key_sequence": 0,
        "subject": world.agents[1].agent_id,
        "audience": world.audience,
        "actions": ["message.*"],
        "resources": ["inbox/*"],
        "expires": NOW + HOUR,
        "now": NOW,
        "rng": world.rng,
        "delegations": 2,
    }
    return issue(world.agents[0].signing_key, **{**args, **kw})


def test_issue_and_delegate_verify(world: World) -> None:
    root = _root(world)
    child = delegate(
        root,
        world.agents[1].signing_key,
        key_sequence=0,
        subject=world.agents[2].agent_id,
        now=NOW + 1,
        rng=world.rng,
        actions=["message.send"],
        resources=["inbox/public/*"],
        expires=NOW + 60,
    )
    assert child.issuer == root.subject
    assert child.audience == root.audience
    assert child.not_before_ms == child.issued_at_ms == round((NOW + 1) * 1000)
    verify(
        child,
        action=ACTION,
        resource=RESOURCE,
        now=NOW + 2,
        revocations=world.synced_state(),
        policy=policy(world),
        keys=world.keys,
        holder=world.agents[2].agent_id,
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"actions": ["bad pattern"]},
        {"resources": []},
        {"resources": ["*x*"]},
        {"subject": "alice"},
        {"not_before": NOW + 2 * HOUR},
        {"actions": [f"a{n}" for n in range(33)]},
        {  # too large to send
            "actions": [f"a{n:02}" + "x" * 253 for n in range(32)],
            "resources": [f"r{n:02}" + "x" * 253 for n in range(32)],
        },
    ],
)
def test_issue_rejects_invalid_tokens(world: World, kw: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        _root(world, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"actions": ["*"]},
        {"resources": ["inbox/*", "outbox/*"]},
        {"expires": NOW + 2 * HOUR},
        {"not_before": NOW - 10},
    ],
)
def test_delegate_refuses_to_widen(world: World, kw: dict[str, Any]) -> None:
    root = _root(world)
    with pytest.raises(LocalProtocolError, match="cannot delegate"):
        delegate(
            root,
            world.agents[1].signing_key,
            key_sequence=0,
            subject=world.agents[2].agent_id,
            now=NOW,
            rng=world.rng,
            **kw,
        )


def test_delegate_refuses_chains_the_decoder_would_not_read(world: World) -> None:
    token = chain(world, 6)
    token = link(world, 7 - 1, Level(), token)  # depth 7 (issuer agents[5] again)
    token = replace(token, parent=token)
    assert token.depth == MAX_CHAIN_LENGTH
    with pytest.raises(LocalProtocolError):
        delegate(
            token, world.agents[6].signing_key, key_sequence=0, subject="x", now=NOW, rng=world.rng
        )


# -- every denial at every depth -------------------------------------------------------


def _fault(world: World, fault: str, length: int, depth: int) -> tuple[Capability, RevocationState]:
    """A chain of ``length`` whose token at ``depth`` (and only from there) is at fault."""
    state = world.synced_state()
    levels: dict[int, Level] = {}
    issuer = world.agents[depth - 1]
    if fault == "expired":
        levels = from_depth(depth, length, Level(exp=-61.0))
    elif fault == "not-yet-valid":
        levels = from_depth(depth, length, Level(nbf=61.0))
    elif fault == "clock-skew":
        levels = from_depth(depth, length, Level(iat=61.0))
    elif fault == "scope":
        levels = from_depth(depth, length, Level(resources=("inbox/private/*",)))
    elif fault == "forged":
        levels = {depth: Level(signer=depth)}
    elif fault == "unknown-key-sequence":
        levels = {depth: Level(key_sequence=1)}
    token = chain(world, length, levels)
    target = token.chain()[depth - 1]
    lst = RevocationList.create(issuer.agent_id, now=NOW)
    if fault == "revoked-id":
        lst = lst.revise(now=NOW, token_ids=[target.token_id])
    elif fault == "revoked-before":
        lst = lst.revise(now=NOW, issued_before=NOW + 0.0001)
    elif fault == "revoked-key":
        lst = lst.revise(now=NOW, key_sequences=[0])
    state.apply(lst.signed_by(issuer.signing_key, 0), keys=world.keys)
    if fault == "stale":
        state = RevocationState()
        for n, agent in enumerate(world.agents):
            state.mark_synced(agent.agent_id, NOW - 301 if n == depth - 1 else NOW)
    return token, state


FAULTS: dict[str, tuple[type[VerificationError], str]] = {
    "expired": (Expired, "expired"),
    "not-yet-valid": (NotYetValid, "not valid yet"),
    "clock-skew": (NotYetValid, "clock skew"),
    "scope": (ScopeMismatch, "does not cover"),
    "forged": (CapabilitySignatureInvalid, "does not verify"),
    "unknown-key-sequence": (CapabilitySignatureInvalid, "no verified key"),
    "revoked-id": (Revoked, "token id is revoked"),
    "revoked-before": (Revoked, "cut-off"),
    "revoked-key": (Revoked, "key sequence 0 is revoked"),
    "stale": (RevocationListStale, "strict"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("length", "depth"), DEPTHS)
@pytest.mark.parametrize("fault", FAULTS)
def test_every_denial_at_every_depth(
    world: World, kind: str, fault: str, length: int, depth: int
) -> None:
    token, state = _fault(world, fault, length, depth)
    error, text = FAULTS[fault]
    check = checker(kind, world, state, policy(world))
    with pytest.raises(error, match=text) as info:
        run(check, token)
    assert isinstance(info.value, CapabilityDenied)  # one `except` denies every fault
    # Revocation names the token, not the depth; everything else names the depth.
    if not fault.startswith("revoked"):
        assert f"depth {depth}" in str(info.value) or fault == "stale"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", range(1, 6))
def test_sound_chains_verify_at_every_length(world: World, kind: str, length: int) -> None:
    check = checker(kind, world, world.synced_state(), policy(world))
    run(check, chain(world, length))
    run(check, chain(world, length))


@pytest.mark.parametrize(("length", "depth"), DEPTHS)
def test_tampered_token_at_each_depth(world: World, length: int, depth: int) -> None:
    """An attacker edits token ``depth`` after signing and re-signs the tokens it holds below."""
    tokens = list(chain(world, length).chain())
    flipped = bytes([tokens[depth - 1].signature[0] ^ 1]) + tokens[depth - 1].signature[1:]
    widened = replace(tokens[depth - 1], actions=frozenset({"*"}))
    for tampered in (replace(tokens[depth - 1], signature=flipped), widened):
        token = tampered
        for below in range(depth + 1, length + 1):
            signer = world.agents[below - 1].signing_key
            token = replace(tokens[below - 1], parent=token).signed_by(signer)
        for kind in KINDS:
            check = checker(kind, world, world.synced_state(), policy(world))
            with pytest.raises(CapabilitySignatureInvalid, match=f"depth {depth}"):
                run(check, token)


def test_unknown_issuer_is_signature_invalid(world: World) -> None:
    keys = IssuerKeys(a.keylog for a in world.agents[1:])
    check = checker("function", world, world.synced_state(), policy(world), keys)
    with pytest.raises(SignatureInvalid, match="no verified key"):
        run(check, chain(world, 2))


# -- delegation limits and attenuation -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_chain_too_deep_at_six(world: World, kind: str) -> None:
    check = checker(kind, world, world.synced_state(), policy(world))
    run(check, chain(world, 5))
    with pytest.raises(ChainTooDeep):
        run(check, chain(world, 6))
    with pytest.raises(ChainTooDeep):  # before any signature is checked
        run(check, chain(world, 6, {1: Level(signer=3)}))


def test_max_depth_is_configurable(world: World) -> None:
    check = checker("function", world, world.synced_state(), policy(world, max_depth=2))
    run(check, chain(world, 2))
    with pytest.raises(ChainTooDeep):
        run(check, chain(world, 3))
    for bad in (0, MAX_CHAIN_LENGTH + 1):
        with pytest.raises(ConfigurationError):
            policy(world, max_depth=bad)


WIDER: dict[str, Level] = {
    "action": Level(actions=("*",)),
    "resource": Level(resources=("inbox/*", "outbox/*")),
    "expiry": Level(exp=HOUR + 1),
    "not-before": Level(nbf=-1.0),
    "issued-at": Level(iat=-1.0),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", range(2, 6))
@pytest.mark.parametrize("wider", WIDER)
def test_attenuation_violations(world: World, kind: str, depth: int, wider: str) -> None:
    token = chain(world, 5, {depth: WIDER[wider]})
    check = checker(kind, world, world.synced_state(), policy(world))
    with pytest.raises(ScopeMismatch, match=f"depth {depth}"):
        run(check, token)


@pytest.mark.parametrize("depth", range(2, 6))
def test_delegation_by_a_non_holder_is_refused(world: World, depth: int) -> None:
    tokens = chain(world, 5).chain()
    # agents[0] re-issues the token at `depth` in its own name (it does not hold the parent).
    bogus = replace(tokens[depth - 1], issuer=world.agents[0].agent_id)
    token = bogus.signed_by(world.agents[0].signing_key)
    with pytest.raises(ScopeMismatch, match="does not hold the parent"):
        run(checker("function", world, world.synced_state(), policy(world)), token)


def test_audience_mismatch(world: World) -> None:
    other = CapabilityPolicy(audience=world.agents[6].agent_id)
    for kind in KINDS:
        with pytest.raises(ScopeMismatch, match="addressed to"):
            run(checker(kind, world, world.synced_state(), other), chain(world, 2))


def test_audience_change_in_the_chain(world: World) -> None:
    root = chain(world, 1)
    child = replace(
        link(world, 2, Level(), root), audience=world.agents[6].agent_id, signature=b""
    ).signed_by(world.agents[1].signing_key)
    pol = CapabilityPolicy(audience=world.agents[6].agent_id)
    with pytest.raises(ScopeMismatch, match="audience"):
        run(checker("function", world, world.synced_state(), pol), child)


@pytest.mark.parametrize("kind", KINDS)
def test_holder_must_be_the_subject(world: World, kind: str) -> None:
    token = chain(world, 2)
    check = checker(kind, world, world.synced_state(), policy(world))
    kw = {"action": ACTION, "resource": RESOURCE, "now": NOW}
    check(token, holder=world.agents[2].agent_id, **kw)
    check(token, holder=world.agents[2].agent_id, **kw)
    with pytest.raises(ScopeMismatch, match="granted to"):
        check(token, holder=world.agents[1].agent_id, **kw)


def test_request_must_be_strings(world: World) -> None:
    check = checker("function", world, world.synced_state(), policy(world))
    with pytest.raises(LocalProtocolError):
        check(chain(world, 1), action=ACTION, resource=b"inbox/1", now=NOW)


# -- clock skew at its boundaries ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("level", "ok", "bad", "error", "text"),
    [
        (Level(exp=100.0), NOW + 160.0, NOW + 160.001, Expired, "expired"),
        (Level(nbf=100.0), NOW + 40.0, NOW + 39.999, NotYetValid, "not valid yet"),
        (Level(iat=100.0, nbf=100.0), NOW + 40.0, NOW + 39.999, NotYetValid, "clock skew"),
    ],
)
def test_clock_skew_boundary(
    world: World,
    kind: str,
    level: Level,
    ok: float,
    bad: float,
    error: type[CapabilityDenied],
    text: str,
) -> None:
    token = chain(world, 1, {1: level})
    check = checker(kind, world, world.synced_state(NOW + 200), policy(world))
    run(check, token, now=ok)
    with pytest.raises(error, match=text):
        run(check, token, now=bad)


def test_clock_skew_is_configurable(world: World) -> None:
    token = chain(world, 1, {1: Level(exp=100.0)})
    check = checker("function", world, world.synced_state(), policy(world, clock_skew=0))
    run(check, token, now=NOW + 100)
    with pytest.raises(Expired):
        run(check, token, now=NOW + 100.001)
    with pytest.raises(ConfigurationError):
        policy(world, clock_skew=-1)


# -- revocation modes at the boundaries of their age limits ------------------------------


@pytest.fixture
def warnings() -> list[StaleListAccepted]:
    return []


def _mode_check(
    world: World, kind: str, mode: RevocationMode, warnings: list[StaleListAccepted]
) -> tuple[Check, Capability]:
    pol = policy(world, revocation=RevocationPolicy(mode=mode), on_warning=warnings.append)
    token = chain(world, 2, {1: Level(exp=100 * 365 * 86400.0), 2: Level(exp=HOUR * 1e5)})
    return checker(kind, world, world.synced_state(NOW), pol), token


@pytest.mark.parametrize("kind", KINDS)
def test_strict_mode_boundary(world: World, kind: str, warnings: list[StaleListAccepted]) -> None:
    check, token = _mode_check(world, kind, RevocationMode.STRICT, warnings)
    run(check, token, now=NOW + 300)
    with pytest.raises(RevocationListStale, match="strict"):
        run(check, token, now=NOW + 300.001)
    assert warnings == []


@pytest.mark.parametrize("kind", KINDS)
def test_permissive_mode_boundaries(
    world: World, kind: str, warnings: list[StaleListAccepted]
) -> None:
    check, token = _mode_check(world, kind, RevocationMode.PERMISSIVE, warnings)
    run(check, token, now=NOW + 300)
    assert warnings == []
    run(check, token, now=NOW + 300.001)
    assert len(warnings) == 2  # one per issuer in the chain
    assert warnings[0].mode is RevocationMode.PERMISSIVE
    assert warnings[0].age_seconds == pytest.approx(300.001)
    assert "permissive" in warnings[0].message
    run(check, token, now=NOW + 300 + HOUR)
    assert len(warnings) == 4  # warned again: every accepted stale check warns
    with pytest.raises(RevocationListStale, match="permissive"):
        run(check, token, now=NOW + 300 + HOUR + 0.001)
    assert len(warnings) == 4  # a denial does not warn


@pytest.mark.parametrize("kind", KINDS)
def test_offline_mode_accepts_indefinitely_with_a_warning(
    world: World, kind: str, warnings: list[StaleListAccepted]
) -> None:
    check, token = _mode_check(world, kind, RevocationMode.OFFLINE, warnings)
    run(check, token, now=NOW + 300)
    assert warnings == []
    run(check, token, now=NOW + 300.001)
    run(check, token, now=NOW + 10 * 365 * 86400)
    assert len(warnings) == 4
    assert all(w.mode is RevocationMode.OFFLINE for w in warnings)


def test_never_synced_issuer(world: World, warnings: list[StaleListAccepted]) -> None:
    token = chain(world, 1)
    strict = checker("function", world, RevocationState(), policy(world))
    with pytest.raises(RevocationListStale):
        run(strict, token)
    offline = RevocationPolicy(mode=RevocationMode.OFFLINE)
    pol = policy(world, revocation=offline, on_warning=warnings.append)
    run(checker("function", world, RevocationState(), pol), token)
    assert warnings[0].age_seconds == float("inf")


def test_custom_max_age_and_grace(world: World) -> None:
    rev = RevocationPolicy(mode=RevocationMode.PERMISSIVE, max_age=10, grace=5)
    check = checker("function", world, world.synced_state(), policy(world, revocation=rev))
    token = chain(world, 1)
    run(check, token, now=NOW + 15)
    with pytest.raises(RevocationListStale):
        run(check, token, now=NOW + 15.001)


# -- revoked-before-T and key sequences --------------------------------------------------


def test_revoked_before_is_rounded_to_the_safe_side(world: World) -> None:
    """T is rounded up and issue times down, so every token issued before T is revoked."""
    issuer = world.agents[0]
    before = _root(world, now=NOW - 0.0004)  # 0.3 ms before T, in the same millisecond
    after = _root(world, now=NOW)
    state = world.synced_state()
    lst = RevocationList.create(issuer.agent_id, now=NOW)
    lst = lst.revise(now=NOW, issued_before=NOW - 0.0001)
    state.apply(lst.signed_by(issuer.signing_key, 0), keys=world.keys)
    check = checker("function", world, state, policy(world))
    with pytest.raises(Revoked, match="cut-off"):
        run(check, before)
    run(check, after)


def test_key_rotation_and_revoked_key_sequence(world: World) -> None:
    rng, clock = SeededRng(99), FakeClock(NOW)
    issuer = Identity.create("issuer", rng=rng, clock=clock)
    holder = world.agents[1].agent_id
    old = issue(
        issuer.signing_key,
        issuer=issuer.agent_id,
        key_sequence=0,
        subject=holder,
        audience=world.audience,
        actions=["*"],
        resources=["*"],
        expires=NOW + HOUR,
        now=NOW,
        rng=rng,
    )
    rotated = issuer.rotate(rng=rng, clock=clock)
    new = replace(old, token_id=b"n" * 16, key_sequence=1).signed_by(rotated.signing_key)
    keys = IssuerKeys([rotated.keylog])
    state = RevocationState()
    state.mark_synced(issuer.agent_id, NOW)
    check = checker("function", world, state, policy(world), keys)
    run(check, old)  # rotation alone does not revoke what the old key signed
    run(check, new)
    with pytest.raises(SignatureInvalid):  # claims the wrong key sequence
        run(check, replace(old, key_sequence=1))
    lst = RevocationList.create(issuer.agent_id, now=NOW).revise(now=NOW, key_sequences=[0])
    state.apply(lst.signed_by(rotated.signing_key, 1), keys=keys)
    with pytest.raises(Revoked, match="key sequence 0"):
        run(check, old)
    run(check, new)


# -- the cached path ---------------------------------------------------------------------


@pytest.fixture
def cached(world: World) -> tuple[CapabilityVerifier, RevocationState]:
    state = world.synced_state()
    return CapabilityVerifier(policy=policy(world), keys=world.keys, revocations=state), state


def _verify(verifier: CapabilityVerifier, token: Capability, now: float = NOW, **kw: Any) -> None:
    verifier.verify(
        token, action=kw.get("action", ACTION), resource=kw.get("resource", RESOURCE), now=now
    )


@pytest.mark.parametrize("depth", range(1, 6))
def test_cached_path_honours_revocation_added_after_caching(
    world: World, cached: tuple[CapabilityVerifier, RevocationState], depth: int
) -> None:
    verifier, state = cached
    token = chain(world, 5)
    _verify(verifier, token)
    _verify(verifier, token)
    assert len(verifier) == 1
    issuer = world.agents[depth - 1]
    target = token.chain()[depth - 1]
    lst = RevocationList.create(issuer.agent_id, now=NOW).revise(
        now=NOW, token_ids=[target.token_id]
    )
    state.apply(lst.signed_by(issuer.signing_key, 0), keys=world.keys)
    with pytest.raises(Revoked):
        _verify(verifier, token)
    assert len(verifier) == 0
    with pytest.raises(Revoked):
        _verify(verifier, token)


@pytest.mark.parametrize("depth", range(1, 6))
def test_cached_path_honours_expiry_after_caching(
    world: World, cached: tuple[CapabilityVerifier, RevocationState], depth: int
) -> None:
    verifier, state = cached
    token = chain(world, 5, from_depth(depth, 5, Level(exp=100.0)))
    _verify(verifier, token, NOW + 160)
    with pytest.raises(Expired, match=f"depth {depth}"):
        _verify(verifier, token, NOW + 160.001)
    assert len(verifier) == 0


def test_cached_path_honours_staleness(
    world: World, cached: tuple[CapabilityVerifier, RevocationState]
) -> None:
    verifier, state = cached
    token = chain(world, 1)
    _verify(verifier, token, NOW + 300)
    with pytest.raises(RevocationListStale):
        _verify(verifier, token, NOW + 300.001)
    state.mark_synced(world.agents[0].agent_id, NOW + 300.001)
    _verify(verifier, token, NOW + 300.001)


def test_cached_path_checks_scope_for_new_requests(
    world: World, cached: tuple[CapabilityVerifier, RevocationState]
) -> None:
    verifier, _ = cached
    token = chain(world, 3, from_depth(2, 3, Level(actions=("message.send",))))
    _verify(verifier, token)
    _verify(verifier, token, resource="inbox/other")
    with pytest.raises(ScopeMismatch):
        _verify(verifier, token, action="message.delete")
    with pytest.raises(ScopeMismatch):
        _verify(verifier, token, resource="outbox/1")
    assert len(verifier) == 1  # a denied request does not evict a valid token


def test_cached_path_is_bound_to_the_whole_token_not_its_id(
    world: World, cached: tuple[CapabilityVerifier, RevocationState]
) -> None:
    verifier, _ = cached
    token = chain(world, 2)
    _verify(verifier, token)
    forged = replace(token, subject=world.agents[5].agent_id)  # same id, old signature
    with pytest.raises(SignatureInvalid):
        _verify(verifier, forged)
    copy = Capability.from_bytes(token.to_bytes())  # equal but a different object
    assert copy is not token
    _verify(verifier, copy)


def test_cache_is_bounded(world: World) -> None:
    verifier = CapabilityVerifier(
        policy=policy(world), keys=world.keys, revocations=world.synced_state(), max_entries=2
    )
    tokens = [replace(chain(world, 1), token_id=bytes([n]) * 16) for n in range(3)]
    tokens = [t.signed_by(world.agents[0].signing_key) for t in tokens]
    for token in tokens:
        _verify(verifier, token)
    assert len(verifier) == 2
    verifier.clear()
    assert len(verifier) == 0


def test_cached_path_remembers_a_bounded_number_of_requests(
    world: World, cached: tuple[CapabilityVerifier, RevocationState]
) -> None:
    verifier, _ = cached
    token = chain(world, 1)
    for n in range(200):
        _verify(verifier, token, resource=f"inbox/{n}")
    _verify(verifier, token, resource="inbox/199")


def test_verification_errors_are_verification_errors() -> None:
    """Callers deny on VerificationError: it covers CapabilityDenied and SignatureInvalid."""
    for error in (*{e for e, _ in FAULTS.values()}, ChainTooDeep):
        assert issubclass(error, VerificationError)


def test_strict_loads_accepts_what_tokens_encode(world: World) -> None:
    data = chain(world, 5).to_bytes()
    assert strict_loads(data, max_size=len(data))["v"] == 1


def test_signed_bytes_memo_never_survives_a_change(world: World) -> None:
    token = chain(world, 2)
    check = checker("function", world, world.synced_state(), policy(world))
    run(check, token)  # signed_bytes() is now memoized on `token`
    for changed in (
        replace(token, actions=frozenset({"*"})),
        replace(token, parent=chain(world, 1, {1: Level(resources=("*",))})),
    ):
        assert changed.signed_bytes() != token.signed_bytes()
        with pytest.raises(SignatureInvalid):
            run(check, changed)


# -- the delegation budget ------------------------------------------------------------


def test_non_delegable_token_cannot_be_delegated(world: World) -> None:
    root = _root(world, delegations=0)
    with pytest.raises(LocalProtocolError, match="not delegable"):
        delegate(
            root,
            world.agents[1].signing_key,
            key_sequence=0,
            subject=world.agents[2].agent_id,
            now=NOW,
            rng=world.rng,
        )


@pytest.mark.parametrize("kind", KINDS)
def test_delegating_a_non_delegable_token_is_refused_on_verify(world: World, kind: str) -> None:
    """A holder who signs a child anyway gets it refused by every verifier."""
    root = _root(world, delegations=0)
    child = replace(
        root,
        issuer=world.agents[1].agent_id,
        subject=world.agents[2].agent_id,
        token_id=b"\x07" * 16,
        parent=root,
    ).signed_by(world.agents[1].signing_key)
    check = checker(kind, world, world.synced_state(), policy(world))
    with pytest.raises(ScopeMismatch, match="depth 2: the parent token is not delegable"):
        run(check, child)


def test_delegation_budget_shrinks_and_cannot_grow(world: World) -> None:
    root = _root(world, delegations=2)
    child = delegate(
        root,
        world.agents[1].signing_key,
        key_sequence=0,
        subject=world.agents[2].agent_id,
        now=NOW,
        rng=world.rng,
    )
    assert child.delegations == 1
    with pytest.raises(LocalProtocolError, match="more further delegation"):
        delegate(
            root,
            world.agents[1].signing_key,
            key_sequence=0,
            subject=world.agents[2].agent_id,
            now=NOW,
            rng=world.rng,
            delegations=2,
        )
