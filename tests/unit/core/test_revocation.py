"""Revocation lists (talos.core.revocation): format, merging, forks, freshness."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from talos.core.encoding import canonical_dumps
from talos.core.identity import Identity
from talos.core.revocation import (
    DOMAIN_PREFIX,
    IssuerKeys,
    MergeOutcome,
    RevocationList,
    RevocationMode,
    RevocationPolicy,
    RevocationState,
    StaleListAccepted,
    merge,
)
from talos.errors import (
    ConfigurationError,
    LocalProtocolError,
    MalformedFrame,
    RevocationListStale,
    Revoked,
    SignatureInvalid,
    UnsupportedVersion,
)
from talos.testing import FakeClock, SeededRng

NOW = 1_700_000_000.0


class Issuers:
    def __init__(self) -> None:
        rng, clock = SeededRng(3), FakeClock(NOW)
        self.alice = Identity.create("alice", rng=rng, clock=clock)
        self.bob = Identity.create("bob", rng=rng, clock=clock)
        self.keys = IssuerKeys([self.alice.keylog, self.bob.keylog])

    def signed(self, lst: RevocationList, who: Identity | None = None) -> RevocationList:
        return lst.signed_by((who or self.alice).signing_key, 0)

    def v1(self) -> RevocationList:
        return RevocationList.create(self.alice.agent_id, now=NOW)


@pytest.fixture(scope="module")
def issuers() -> Issuers:
    return Issuers()


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


# -- the list --------------------------------------------------------------------------


def test_round_trip_and_signature(issuers: Issuers) -> None:
    lst = issuers.signed(
        issuers.v1().revise(
            now=NOW + 1, token_ids=[tid(2), tid(1)], issued_before=NOW, key_sequences=[3]
        )
    )
    assert lst.version == 2
    assert lst.issued_at_ms == round((NOW + 1) * 1000)
    assert RevocationList.from_bytes(lst.to_bytes()) == lst
    assert lst.signed_bytes().startswith(DOMAIN_PREFIX)
    lst.verify_signature(issuers.keys)


def test_tampered_or_unknown_lists_do_not_verify(issuers: Issuers) -> None:
    lst = issuers.signed(issuers.v1().revise(now=NOW, token_ids=[tid(1)]))
    with pytest.raises(SignatureInvalid):
        replace(lst, revoked_ids=frozenset()).verify_signature(issuers.keys)
    with pytest.raises(SignatureInvalid):
        replace(lst, version=9).verify_signature(issuers.keys)
    with pytest.raises(SignatureInvalid, match="no verified key"):
        lst.verify_signature(IssuerKeys([issuers.bob.keylog]))
    with pytest.raises(SignatureInvalid):  # signed by someone else
        issuers.signed(lst, issuers.bob).verify_signature(issuers.keys)
    with pytest.raises(SignatureInvalid):
        RevocationState().apply(replace(lst, version=9), keys=issuers.keys)


def test_revise_only_grows(issuers: Issuers) -> None:
    v2 = issuers.v1().revise(now=NOW, token_ids=[tid(1)], issued_before=NOW + 5)
    v3 = v2.revise(now=NOW, issued_before=NOW + 1, key_sequences=[0])
    assert v3.version == 3
    assert v3.covers(v2)
    assert not v2.covers(v3)
    assert v3.revoked_before_ms == v2.revoked_before_ms  # T never moves back
    assert v3.revoked_ids == {tid(1)}


@pytest.mark.parametrize(
    "kw", [{"token_ids": [b"short"]}, {"key_sequences": [-1]}, {"key_sequences": [2**32]}]
)
def test_revise_rejects_bad_entries(issuers: Issuers, kw: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        issuers.v1().revise(now=NOW, **kw)


def test_create_rejects_bad_issuer() -> None:
    with pytest.raises(LocalProtocolError):
        RevocationList.create("did:web:x", now=NOW)


def test_revocation_of(issuers: Issuers) -> None:
    lst = issuers.v1().revise(now=NOW, token_ids=[tid(1)], issued_before=NOW, key_sequences=[2])
    t_ms = round(NOW * 1000)
    assert lst.revocation_of(tid(1), t_ms, 0) == "token id is revoked"
    assert lst.revocation_of(tid(5), t_ms - 1, 0) is not None
    assert lst.revocation_of(tid(5), t_ms, 0) is None  # issued at T: not before it
    assert lst.revocation_of(tid(5), t_ms, 2) == "issuer key sequence 2 is revoked"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ver", 0),
        ("ids", [tid(2), tid(1)]),
        ("ids", [tid(1), tid(1)]),
        ("ids", [b"x" * 15]),
        ("keys", [3, 1]),
        ("keys", [-1]),
        ("iss", "nobody"),
        ("before", "soon"),
        ("sig", b""),
    ],
)
def test_decoder_rejects_bad_fields(issuers: Issuers, key: str, value: Any) -> None:
    raw = canonical_dumps({**_raw(issuers), key: value})
    with pytest.raises(MalformedFrame):
        RevocationList.from_bytes(raw)


def _raw(issuers: Issuers) -> dict[str, Any]:
    lst = issuers.signed(issuers.v1().revise(now=NOW, token_ids=[tid(1), tid(2)]))
    return {**lst.body(), "sig": lst.signature}


def test_decoder_versions_and_fields(issuers: Issuers) -> None:
    raw = _raw(issuers)
    with pytest.raises(UnsupportedVersion):
        RevocationList.from_bytes(canonical_dumps({**raw, "v": 2}))
    with pytest.raises(MalformedFrame):
        RevocationList.from_bytes(canonical_dumps({**raw, "v": "1"}))
    with pytest.raises(MalformedFrame):
        RevocationList.from_bytes(canonical_dumps({**raw, "x": 1}))
    with pytest.raises(MalformedFrame):
        RevocationList.from_bytes(canonical_dumps([raw]))
    with pytest.raises(MalformedFrame):
        RevocationList.from_bytes(canonical_dumps(raw), max_size=10)


# -- merging, forks, append-only --------------------------------------------------------


def test_merge_adopts_newer_supersets(issuers: Issuers) -> None:
    v1 = issuers.signed(issuers.v1())
    v2 = issuers.signed(v1.revise(now=NOW, token_ids=[tid(1)]))
    assert merge(None, v1).outcome is MergeOutcome.ADOPTED
    result = merge(v1, v2)
    assert (result.outcome, result.kept, result.changed) == (MergeOutcome.ADOPTED, v2, True)
    assert not result.security_event
    older = merge(v2, v1)
    assert (older.outcome, older.kept, older.changed) == (MergeOutcome.OLDER, v2, False)
    assert merge(v2, v2).outcome is MergeOutcome.UNCHANGED


def test_fork_is_detected_and_resolved_deterministically(issuers: Issuers) -> None:
    v1 = issuers.v1()
    a = issuers.signed(v1.revise(now=NOW, token_ids=[tid(1)]))
    b = issuers.signed(v1.revise(now=NOW, token_ids=[tid(2), tid(3)]))
    ab, ba = merge(a, b), merge(b, a)
    assert ab.outcome is ba.outcome is MergeOutcome.FORKED
    assert ab.security_event
    assert ba.security_event
    assert ab.kept == ba.kept == b  # the list that revokes more
    assert {ab.offered, ab.previous} == {a, b}  # both lists, as evidence


def test_fork_tie_break_is_by_bytes(issuers: Issuers) -> None:
    v1 = issuers.v1()
    a = issuers.signed(v1.revise(now=NOW, token_ids=[tid(1)]))
    b = issuers.signed(v1.revise(now=NOW, token_ids=[tid(2)]))
    kept = max(a, b, key=lambda lst: lst.to_bytes())
    assert merge(a, b).kept == merge(b, a).kept == kept


def test_append_only_violation_keeps_the_lower_version(issuers: Issuers) -> None:
    v2 = issuers.signed(issuers.v1().revise(now=NOW, token_ids=[tid(1)]))
    v3 = issuers.signed(replace(v2, version=3, revoked_ids=frozenset({tid(2)})))
    for result in (merge(v2, v3), merge(v3, v2)):
        assert result.outcome is MergeOutcome.NOT_APPEND_ONLY
        assert result.security_event
        assert result.kept == v2


def test_merge_refuses_different_issuers(issuers: Issuers) -> None:
    bob = RevocationList.create(issuers.bob.agent_id, now=NOW)
    with pytest.raises(LocalProtocolError):
        merge(issuers.v1(), bob)


def test_state_records_conflicts_and_generations(issuers: Issuers) -> None:
    state = RevocationState()
    v1 = issuers.signed(issuers.v1())
    a = issuers.signed(v1.revise(now=NOW, token_ids=[tid(1), tid(2)]))
    b = issuers.signed(v1.revise(now=NOW, token_ids=[tid(3)]))
    assert state.apply(v1, keys=issuers.keys).outcome is MergeOutcome.ADOPTED
    assert state.generation == 1
    state.apply(a, keys=issuers.keys)
    assert state.generation == 2
    result = state.apply(b, keys=issuers.keys)
    assert result.outcome is MergeOutcome.FORKED
    assert state.conflicts == [result]
    assert state.list_for(issuers.alice.agent_id) == a
    assert state.generation == 2  # nothing in use changed
    assert state.apply(a, keys=issuers.keys).outcome is MergeOutcome.UNCHANGED
    # The issuer recovers by publishing a higher version covering both forks.
    v3 = issuers.signed(
        replace(a, version=3, revoked_ids=a.revoked_ids | b.revoked_ids, signature=b"")
    )
    assert state.apply(v3, keys=issuers.keys).outcome is MergeOutcome.ADOPTED
    assert state.lists == {issuers.alice.agent_id: v3}


def test_partition_heals_to_the_same_list(issuers: Issuers) -> None:
    """Two verifiers that saw the lists in different orders end up using the same one."""
    v1 = issuers.signed(issuers.v1())
    v2 = issuers.signed(v1.revise(now=NOW, token_ids=[tid(1)]))
    fork = issuers.signed(v1.revise(now=NOW, key_sequences=[0]))
    v3 = issuers.signed(v2.revise(now=NOW, token_ids=[tid(9)]))
    left, right = RevocationState(), RevocationState()
    for lst in (v1, v2, fork, v3):
        left.apply(lst, keys=issuers.keys)
    for lst in (v3, fork, v2, v1):
        right.apply(lst, keys=issuers.keys)
    assert left.lists == right.lists


# -- freshness ---------------------------------------------------------------------------


def test_age_of_the_oldest_list(issuers: Issuers) -> None:
    state = RevocationState()
    assert state.revocation_list_age_seconds(NOW) == 0.0
    state.mark_synced(issuers.alice.agent_id, NOW)
    state.mark_synced(issuers.bob.agent_id, NOW + 100)
    assert state.revocation_list_age_seconds(NOW + 150) == 150
    state.mark_synced(issuers.alice.agent_id, NOW + 140)
    assert state.revocation_list_age_seconds(NOW + 150) == 50
    state.mark_synced(issuers.alice.agent_id, NOW)  # an older report does not roll back
    assert state.last_synced(issuers.alice.agent_id) == NOW + 140


def test_a_list_never_synced_is_infinitely_old(issuers: Issuers) -> None:
    state = RevocationState()
    state.apply(issuers.signed(issuers.v1()), keys=issuers.keys)
    assert state.revocation_list_age_seconds(NOW) == math.inf


def _check(state: RevocationState, issuers: Issuers, now: float, policy: RevocationPolicy) -> Any:
    return state.check(issuers.alice.agent_id, tid(1), round(NOW * 1000), 0, now=now, policy=policy)


@pytest.mark.parametrize(
    ("mode", "at", "outcome"),
    [
        (RevocationMode.STRICT, 300.0, None),
        (RevocationMode.STRICT, 300.001, RevocationListStale),
        (RevocationMode.PERMISSIVE, 300.0, None),
        (RevocationMode.PERMISSIVE, 300.001, StaleListAccepted),
        (RevocationMode.PERMISSIVE, 3900.0, StaleListAccepted),
        (RevocationMode.PERMISSIVE, 3900.001, RevocationListStale),
        (RevocationMode.OFFLINE, 300.0, None),
        (RevocationMode.OFFLINE, 300.001, StaleListAccepted),
        (RevocationMode.OFFLINE, 1e9, StaleListAccepted),
    ],
)
def test_modes_at_their_boundaries(
    issuers: Issuers, mode: RevocationMode, at: float, outcome: type | None
) -> None:
    state = RevocationState()
    state.mark_synced(issuers.alice.agent_id, NOW)
    policy = RevocationPolicy(mode=mode)
    if outcome is RevocationListStale:
        with pytest.raises(RevocationListStale, match=str(mode)):
            _check(state, issuers, NOW + at, policy)
    elif outcome is None:
        assert _check(state, issuers, NOW + at, policy) is None
    else:
        warning = _check(state, issuers, NOW + at, policy)
        assert isinstance(warning, StaleListAccepted)
        assert warning.issuer == issuers.alice.agent_id
        assert warning.age_seconds == pytest.approx(at)


def test_revoked_beats_stale(issuers: Issuers) -> None:
    state = RevocationState()
    state.apply(issuers.signed(issuers.v1().revise(now=NOW, token_ids=[tid(1)])), keys=issuers.keys)
    with pytest.raises(Revoked):
        _check(state, issuers, NOW, RevocationPolicy())


def test_fresh_until(issuers: Issuers) -> None:
    state, policy = RevocationState(), RevocationPolicy(max_age=10)
    assert state.fresh_until(issuers.alice.agent_id, policy) == -math.inf
    state.mark_synced(issuers.alice.agent_id, NOW)
    assert state.fresh_until(issuers.alice.agent_id, policy) == NOW + 10


@pytest.mark.parametrize(
    "kw", [{"max_age": -1}, {"grace": -0.5}, {"mode": "strict"}, {"max_age": math.nan}]
)
def test_policy_validation(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RevocationPolicy(**kw)


def test_defaults_match_the_failure_modes_document() -> None:
    policy = RevocationPolicy()
    assert (policy.mode, policy.max_age, policy.grace) == (RevocationMode.STRICT, 300.0, 3600.0)


def test_issuer_keys_follow_rotation() -> None:
    rng, clock = SeededRng(5), FakeClock(NOW)
    agent = Identity.create("a", rng=rng, clock=clock)
    rotated = agent.rotate(rng=rng, clock=clock)
    keys = IssuerKeys([agent.keylog])
    assert keys(agent.agent_id, 0) == agent.signing_key.public_key
    assert keys(agent.agent_id, 1) is None
    keys.add(rotated.keylog)
    assert keys(agent.agent_id, 1) == rotated.signing_key.public_key
    assert keys(agent.agent_id, -1) is None
    assert keys("did:talos:zunknown", 0) is None
