"""Capability tokens: signed, delegable, attenuated grants (ARCHITECTURE §7).

Rules (the invariants :func:`verify` enforces):

1. A token is one canonical CBOR map (:data:`TOKEN_FIELDS`), at most
   :data:`MAX_TOKEN_SIZE` bytes, signed with Ed25519 by its issuer's key at
   ``key_sequence`` over :data:`DOMAIN_PREFIX` + canonical CBOR of every
   other field. The text form is ``tcap1.`` + unpadded base64url of those bytes.
2. A *pattern* (action or resource) is 1..256 printable ASCII characters
   without spaces. ``*`` may only be the last character. A pattern without
   ``*`` matches exactly that string; ``p*`` matches every string that starts
   with ``p`` (``p`` itself included, no path-segment semantics: write
   ``files/*``, not ``files*``). Requests are matched literally.
3. A delegated token embeds its parent whole and is issued by the parent's
   subject, for the parent's audience. It *attenuates*: each of its patterns
   is covered by one parent pattern (``c`` is covered by ``p`` when
   ``c == p``, or ``p`` ends in ``*`` and ``c`` starts with ``p`` minus the
   star), its expiry is no later, its not-before and issue time no earlier.
   The chain's *depth* is its number of tokens (a root token has depth 1).
4. Verification walks the whole chain, root to leaf, and checks at EVERY
   depth: signature, attenuation, the validity window, revocation and the
   freshness of the issuer's revocation list. Validity is the closed interval
   ``[max(not_before, issued_at) - skew, expires + skew]``; a token issued
   further in the future than ``skew`` is refused as clock skew.
5. :func:`verify` never returns a verdict: it returns ``None`` or raises a
   :class:`~talos.errors.CapabilityDenied` subclass; a forged or tampered
   token, or one signed by a key no verified key log knows, raises
   :class:`~talos.errors.CapabilitySignatureInvalid`, which is also a
   :class:`~talos.errors.SignatureInvalid`.

:class:`CapabilityVerifier` caches chains that passed rule 4 and re-checks
only what can change (time, revocations, freshness) on later calls.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.crypto import SIGNATURE_SIZE, SigningKey
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.revocation import (
    TOKEN_ID_SIZE,
    KeyLookup,
    RevocationPolicy,
    RevocationState,
    StaleListAccepted,
    resolve_key,
)
from talos.core.rng import Rng
from talos.errors import (
    CapabilitySignatureInvalid,
    ChainTooDeep,
    ConfigurationError,
    Expired,
    LocalProtocolError,
    MalformedFrame,
    NotYetValid,
    Revoked,
    ScopeMismatch,
    SignatureInvalid,
    UnsupportedVersion,
)

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_MAX_DEPTH",
    "DOMAIN_PREFIX",
    "MAX_CHAIN_LENGTH",
    "MAX_TOKEN_SIZE",
    "TEXT_PREFIX",
    "TOKEN_FIELDS",
    "TOKEN_ID_SIZE",
    "TOKEN_VERSION",
    "Capability",
    "CapabilityPolicy",
    "CapabilityVerifier",
    "covers",
    "delegate",
    "issue",
    "matches",
    "verify",
]

TOKEN_VERSION: Final = 1
#: Domain separation: a token signature can never pass for an envelope, key event or list.
DOMAIN_PREFIX: Final = b"talos/capability/v1\x00"
TEXT_PREFIX: Final = "tcap1."
#: Same bound as an envelope's capability reference.
MAX_TOKEN_SIZE: Final = 16 * 1024
#: Longest chain the decoder accepts; policies may allow at most this depth.
MAX_CHAIN_LENGTH: Final = 8
DEFAULT_MAX_DEPTH: Final = 5
DEFAULT_CLOCK_SKEW: Final = 60.0
MAX_PATTERNS: Final = 32
MAX_PATTERN_LENGTH: Final = 256
#: Distinct (action, resource) pairs remembered per cached token.
MAX_ALLOWED_PER_TOKEN: Final = 64
_MAX_U32: Final = 2**32 - 1
_MAX_MS: Final = 2**63 - 1
TOKEN_FIELDS: Final = frozenset(
    {"v", "id", "iss", "ks", "sub", "aud", "act", "res", "iat", "nbf", "exp", "dlg", "par", "sig"}
)
# Printable ASCII except space and "*"; then an optional trailing "*".
_PATTERN: Final = re.compile(r"[!-)+-~]{1,256}|[!-)+-~]{0,255}\*")
_TEXT: Final = re.compile(r"tcap([0-9]{1,4})\.([A-Za-z0-9_-]*)")
_MAX_TEXT: Final = len(TEXT_PREFIX) + (MAX_TOKEN_SIZE * 4 + 2) // 3


# -- patterns -----------------------------------------------------------------------


def matches(pattern: str, value: str) -> bool:
    """Whether ``pattern`` (rule 2) matches the concrete request ``value``."""
    return pattern == value or (pattern[-1] == "*" and value.startswith(pattern[:-1]))


def covers(parent: str, child: str) -> bool:
    """Whether every string ``child`` matches is matched by ``parent`` (rule 3).

    Sound and exact for single patterns; for sets, :func:`_covered` asks for
    one covering parent pattern per child pattern, which is conservative.
    """
    return child == parent or (parent[-1] == "*" and child.startswith(parent[:-1]))


def _covered(children: frozenset[str], parents: frozenset[str]) -> bool:
    return all(any(covers(p, c) for p in parents) for c in children)


def _matched(patterns: frozenset[str], value: str) -> bool:
    return value in patterns or any(matches(p, value) for p in patterns)


# -- the token ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capability:
    """One token and, through ``parent``, the chain it was delegated along.

    Times are integer milliseconds since the Unix epoch.
    """

    token_id: bytes
    issuer: str
    key_sequence: int
    subject: str
    audience: str
    actions: frozenset[str]
    resources: frozenset[str]
    issued_at_ms: int
    not_before_ms: int
    expires_ms: int
    #: How many further delegations the subject may make (0: not delegable).
    delegations: int = 0
    parent: Capability | None = None
    signature: bytes = b""
    # Memo of signed_bytes(). init=False, so dataclasses.replace() never carries it
    # over to a changed copy; compare=False, so it never affects equality.
    _signed: bytes | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def depth(self) -> int:
        """Tokens in the chain ending here (a root token has depth 1)."""
        return 1 if self.parent is None else self.parent.depth + 1

    def chain(self) -> tuple[Capability, ...]:
        """The chain from the root token to this one."""
        tokens: list[Capability] = []
        token: Capability | None = self
        while token is not None:
            tokens.append(token)
            token = token.parent
        return tuple(reversed(tokens))

    def body(self) -> dict[str, Any]:
        """The signed fields as a CBOR map (the parent whole, signature included)."""
        return {
            "v": TOKEN_VERSION,
            "id": self.token_id,
            "iss": self.issuer,
            "ks": self.key_sequence,
            "sub": self.subject,
            "aud": self.audience,
            "act": sorted(self.actions),
            "res": sorted(self.resources),
            "iat": self.issued_at_ms,
            "nbf": self.not_before_ms,
            "exp": self.expires_ms,
            "dlg": self.delegations,
            "par": None if self.parent is None else self.parent.to_dict(),
        }

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers (computed once per object)."""
        signed = self._signed
        if signed is None:
            signed = DOMAIN_PREFIX + canonical_dumps(self.body())
            object.__setattr__(self, "_signed", signed)
        return signed

    def signed_by(self, key: SigningKey) -> Capability:
        """A copy signed with ``key`` (the issuer's key at ``key_sequence``)."""
        return replace(self, signature=key.sign(self.signed_bytes()))

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "sig": self.signature}

    def to_bytes(self) -> bytes:
        """Versioned canonical CBOR, for the wire (``capability_ref``) and storage."""
        return canonical_dumps(self.to_dict())

    def to_text(self) -> str:
        """``tcap1.`` + unpadded base64url of :meth:`to_bytes`, for the CLI."""
        return TEXT_PREFIX + base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Capability:
        """Decode a token (and its chain) from untrusted bytes; structure only.

        Raises:
            MalformedFrame: too large, not canonical CBOR, wrong fields, types
                or ranges, unsorted patterns, or a chain longer than
                :data:`MAX_CHAIN_LENGTH`.
            UnsupportedVersion: a token format this build does not know.
        """
        return _parse(strict_loads(data, max_size=MAX_TOKEN_SIZE), MAX_CHAIN_LENGTH)

    @classmethod
    def from_text(cls, text: str) -> Capability:
        """Decode the text form.

        Raises:
            MalformedFrame: not ``tcap<N>.`` + canonical unpadded base64url, or
                bad token bytes.
            UnsupportedVersion: another text or token format version.
        """
        return cls.from_bytes(_text_bytes(text))


def _text_bytes(text: str) -> bytes:
    if type(text) is not str or len(text) > _MAX_TEXT:
        raise MalformedFrame("capability text must be a string of bounded length")
    match = _TEXT.fullmatch(text)
    if match is None:
        raise MalformedFrame("capability text must be 'tcap1.' followed by base64url")
    if match.group(1) != "1":
        raise UnsupportedVersion(f"capability text version {match.group(1)} is not supported")
    encoded = match.group(2)
    try:
        data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise MalformedFrame("capability text is not valid base64url") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != encoded:
        raise MalformedFrame("capability text is not canonical base64url")
    return data


# -- decoding -----------------------------------------------------------------------


def _parse(raw: Any, levels: int) -> Capability:
    if type(raw) is not dict:
        raise MalformedFrame("capability must be a CBOR map")
    version = raw.get("v")
    if type(version) is not int:
        raise MalformedFrame("capability format version must be an integer")
    if version != TOKEN_VERSION:
        raise UnsupportedVersion(f"capability format {version} is not supported")
    if raw.keys() != TOKEN_FIELDS:
        raise MalformedFrame("capability has missing or unexpected fields")
    if raw["par"] is not None and levels <= 1:
        raise MalformedFrame(f"capability chain longer than {MAX_CHAIN_LENGTH}")
    token = Capability(
        token_id=_token_id(raw["id"]),
        issuer=_agent_id(raw["iss"]),
        key_sequence=_uint("key sequence", raw["ks"], _MAX_U32),
        subject=_agent_id(raw["sub"]),
        audience=_agent_id(raw["aud"]),
        actions=_patterns("actions", raw["act"]),
        resources=_patterns("resources", raw["res"]),
        issued_at_ms=_uint("issue time", raw["iat"], _MAX_MS),
        not_before_ms=_uint("not-before", raw["nbf"], _MAX_MS),
        expires_ms=_uint("expiry", raw["exp"], _MAX_MS),
        delegations=_uint("delegations", raw["dlg"], MAX_CHAIN_LENGTH - 1),
        parent=None if raw["par"] is None else _parse(raw["par"], levels - 1),
        signature=_signature(raw["sig"]),
    )
    if token.not_before_ms > token.expires_ms:
        raise MalformedFrame("capability not-before is after its expiry")
    return token


_checked_agent_id: Final = functools.lru_cache(maxsize=1024)(check_agent_id)


def _agent_id(value: Any) -> str:
    if type(value) is not str:
        raise MalformedFrame("agent id must be text")
    return _checked_agent_id(value)


def _uint(name: str, value: Any, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise MalformedFrame(f"{name} must be an integer in 0..{maximum}")
    return value


def _token_id(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != TOKEN_ID_SIZE:
        raise MalformedFrame(f"capability id must be {TOKEN_ID_SIZE} bytes")
    return value


def _signature(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != SIGNATURE_SIZE:
        raise MalformedFrame(f"signature must be {SIGNATURE_SIZE} bytes")
    return value


def _patterns(name: str, value: Any) -> frozenset[str]:
    if type(value) is not list or not 1 <= len(value) <= MAX_PATTERNS:
        raise MalformedFrame(f"{name} must be a list of 1..{MAX_PATTERNS} patterns")
    for item in value:
        if type(item) is not str or _PATTERN.fullmatch(item) is None:
            raise MalformedFrame(f"{name} hold an invalid pattern")
    if any(a >= b for a, b in zip(value, value[1:], strict=False)):
        raise MalformedFrame(f"{name} must be strictly increasing")
    return frozenset(value)


# -- issuing ------------------------------------------------------------------------


def issue(
    signing_key: SigningKey,
    *,
    issuer: str,
    key_sequence: int,
    subject: str,
    audience: str,
    actions: Iterable[str],
    resources: Iterable[str],
    expires: float,
    now: float,
    rng: Rng,
    not_before: float | None = None,
    delegations: int = 0,
) -> Capability:
    """Issue a root token. Times are seconds; ``not_before`` defaults to ``now``.

    ``delegations`` is how many times the subject (and those it delegates to)
    may delegate further; 0 makes the token non-delegable.

    Raises:
        LocalProtocolError: a malformed field (agent id, pattern, times), or
            the token would not decode (e.g. too large).
    """
    issued = math.floor(now * 1000)
    token = Capability(
        token_id=rng.bytes(TOKEN_ID_SIZE),
        issuer=issuer,
        key_sequence=key_sequence,
        subject=subject,
        audience=audience,
        actions=frozenset(actions),
        resources=frozenset(resources),
        issued_at_ms=issued,
        not_before_ms=issued if not_before is None else math.ceil(not_before * 1000),
        expires_ms=math.floor(expires * 1000),
        delegations=delegations,
    )
    return _sealed(token, signing_key)


def delegate(
    parent: Capability,
    signing_key: SigningKey,
    *,
    key_sequence: int,
    subject: str,
    now: float,
    rng: Rng,
    actions: Iterable[str] | None = None,
    resources: Iterable[str] | None = None,
    expires: float | None = None,
    not_before: float | None = None,
    delegations: int | None = None,
) -> Capability:
    """Delegate ``parent`` (held by its subject, who signs) to ``subject``.

    Omitted scope and expiry are the parent's; ``not_before`` defaults to the
    later of ``now`` and the parent's; ``delegations`` defaults to one fewer
    than the parent allows.

    Raises:
        LocalProtocolError: the child would be wider than the parent (rule 3),
            the chain too long, or a field malformed.
    """
    issued = max(math.floor(now * 1000), parent.issued_at_ms)
    nbf = max(issued, parent.not_before_ms) if not_before is None else not_before * 1000
    token = Capability(
        token_id=rng.bytes(TOKEN_ID_SIZE),
        issuer=parent.subject,
        key_sequence=key_sequence,
        subject=subject,
        audience=parent.audience,
        actions=parent.actions if actions is None else frozenset(actions),
        resources=parent.resources if resources is None else frozenset(resources),
        issued_at_ms=issued,
        not_before_ms=math.ceil(nbf),
        expires_ms=parent.expires_ms if expires is None else math.floor(expires * 1000),
        delegations=max(parent.delegations - 1, 0) if delegations is None else delegations,
        parent=parent,
    )
    reason = _attenuation_error(token, parent)
    if reason is not None:
        raise LocalProtocolError(f"cannot delegate: {reason}")
    return _sealed(token, signing_key)


def _sealed(token: Capability, signing_key: SigningKey) -> Capability:
    """Sign, then prove the token decodes to itself (so a peer can read it)."""
    try:
        signed = token.signed_by(signing_key)
        if Capability.from_bytes(signed.to_bytes()) != signed:
            raise MalformedFrame("token does not survive encoding")
    except (MalformedFrame, UnsupportedVersion, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"invalid capability: {exc}") from exc
    return signed


# -- verification -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapabilityPolicy:
    """How a verifier checks tokens addressed to it.

    ``audience`` is the verifier's own agent id. ``on_warning`` receives a
    :class:`~talos.core.revocation.StaleListAccepted` for each stale list a
    successful verification relied on (core never logs).
    """

    audience: str
    max_depth: int = DEFAULT_MAX_DEPTH
    clock_skew: float = DEFAULT_CLOCK_SKEW
    revocation: RevocationPolicy = RevocationPolicy()
    on_warning: Callable[[StaleListAccepted], None] | None = None

    def __post_init__(self) -> None:
        """Raises: ConfigurationError: depth outside 1..8 or a negative skew."""
        if not 1 <= self.max_depth <= MAX_CHAIN_LENGTH:
            raise ConfigurationError(f"max_depth must be in 1..{MAX_CHAIN_LENGTH}")
        if not self.clock_skew >= 0:
            raise ConfigurationError("clock_skew must not be negative")

    @property
    def skew_ms(self) -> int:
        return round(self.clock_skew * 1000)


def verify(
    token: Capability,
    *,
    action: str,
    resource: str,
    now: float,
    revocations: RevocationState,
    policy: CapabilityPolicy,
    keys: KeyLookup,
    holder: str | None = None,
) -> None:
    """Full verification of ``token`` for ``action`` on ``resource`` at ``now``.

    ``holder``, when given, is the authenticated agent presenting the token;
    it must be the token's subject (transports should always pass it).

    Raises:
        ChainTooDeep: the chain is deeper than ``policy.max_depth``.
        ScopeMismatch: wrong audience or holder, a delegation wider than its
            parent, or the request is outside the token's patterns.
        SignatureInvalid: a signature in the chain does not verify, or its
            issuer's key is not in any verified key log.
        NotYetValid: before not-before, or issued in the future (clock skew).
        Expired: a token in the chain has expired.
        Revoked: a token in the chain is revoked by its issuer's list.
        RevocationListStale: an issuer's list is too old for the policy.
        LocalProtocolError: ``action`` or ``resource`` is not a string.
    """
    _emit(policy, _verify_full(token, action, resource, now, revocations, policy, keys, holder))


def _verify_full(
    token: Capability,
    action: str,
    resource: str,
    now: float,
    revocations: RevocationState,
    policy: CapabilityPolicy,
    keys: KeyLookup,
    holder: str | None,
) -> list[StaleListAccepted]:
    _check_request(action, resource)
    chain = token.chain()
    if len(chain) > policy.max_depth:
        raise ChainTooDeep(f"delegation chain of {len(chain)} exceeds {policy.max_depth}")
    _check_bindings(token, policy.audience, holder)
    parent: Capability | None = None
    for depth, link in enumerate(chain, 1):
        _check_signature(link, keys, depth)
        if parent is not None:
            reason = _attenuation_error(link, parent)
            if reason is not None:
                raise ScopeMismatch(f"capability at depth {depth}: {reason}")
        parent = link
    return _check_live(chain, action, resource, now, revocations, policy)


def _check_request(action: object, resource: object) -> None:
    if type(action) is not str or type(resource) is not str:
        raise LocalProtocolError("action and resource must be strings")


def _check_bindings(token: Capability, audience: str, holder: str | None) -> None:
    if token.audience != audience:
        raise ScopeMismatch(f"capability is addressed to {token.audience}, not to this agent")
    if holder is not None and holder != token.subject:
        raise ScopeMismatch(f"capability was granted to {token.subject}, not to {holder}")


def _check_signature(token: Capability, keys: KeyLookup, depth: int) -> None:
    try:
        resolve_key(keys, token.issuer, token.key_sequence).verify(
            token.signature, token.signed_bytes()
        )
    except SignatureInvalid as exc:
        raise CapabilitySignatureInvalid(f"capability at depth {depth}: {exc}") from None


def _attenuation_error(child: Capability, parent: Capability) -> str | None:
    """Why ``child`` is not a valid delegation of ``parent`` (rule 3), or ``None``."""
    if child.issuer != parent.subject:
        return "issued by an agent that does not hold the parent"
    if child.audience != parent.audience:
        return "audience differs from the parent's"
    if parent.delegations < 1:
        return "the parent token is not delegable"
    if child.delegations > parent.delegations - 1:
        return "allows more further delegation than the parent"
    if not _covered(child.actions, parent.actions):
        return "actions wider than the parent's"
    if not _covered(child.resources, parent.resources):
        return "resources wider than the parent's"
    if child.expires_ms > parent.expires_ms:
        return "expires after the parent"
    if child.not_before_ms < parent.not_before_ms:
        return "valid before the parent"
    if child.issued_at_ms < parent.issued_at_ms:
        return "issued before the parent"
    return None


def _check_live(
    chain: tuple[Capability, ...],
    action: str,
    resource: str,
    now: float,
    revocations: RevocationState,
    policy: CapabilityPolicy,
) -> list[StaleListAccepted]:
    """Everything that can change after a chain verified once: time, revocation, scope."""
    skew, t = policy.skew_ms, now * 1000.0
    for depth, link in enumerate(chain, 1):
        _check_time(link, t, skew, depth)
    warnings = []
    for link in chain:
        warning = revocations.check(
            link.issuer,
            link.token_id,
            link.issued_at_ms,
            link.key_sequence,
            now=now,
            policy=policy.revocation,
        )
        if warning is not None:
            warnings.append(warning)
    for depth, link in enumerate(chain, 1):
        if not (_matched(link.actions, action) and _matched(link.resources, resource)):
            raise ScopeMismatch(f"capability at depth {depth} does not cover {action} {resource}")
    return warnings


def _check_time(token: Capability, t: float, skew: int, depth: int) -> None:
    if t < token.issued_at_ms - skew:
        raise NotYetValid(
            f"capability at depth {depth} was issued {(token.issued_at_ms - t) / 1000:.3f} s "
            f"in the future, beyond the {skew / 1000:g} s tolerance: clock skew"
        )
    if t < token.not_before_ms - skew:
        raise NotYetValid(f"capability at depth {depth} is not valid yet")
    if t > token.expires_ms + skew:
        raise Expired(f"capability at depth {depth} has expired")


def _emit(policy: CapabilityPolicy, warnings: list[StaleListAccepted]) -> None:
    if warnings and policy.on_warning is not None:
        for warning in warnings:
            policy.on_warning(warning)


# -- cached verification ------------------------------------------------------------


class _Verified:
    """A chain that passed full verification, and what the fast path may skip."""

    __slots__ = ("allowed", "chain", "fresh_until", "from_ms", "generation", "token", "until_ms")

    def __init__(self, token: Capability, skew: int) -> None:
        self.token = token
        self.chain = token.chain()
        self.from_ms = max(max(t.not_before_ms, t.issued_at_ms) - skew for t in self.chain)
        self.until_ms = min(t.expires_ms + skew for t in self.chain)
        self.fresh_until = -math.inf
        self.generation = -1
        self.allowed: set[tuple[str, str]] = set()


class CapabilityVerifier:
    """:func:`verify` with a cache of verified chains.

    After a full verification, the token id maps to the verified token, its
    validity window over the whole chain, the (action, resource) pairs it was
    checked for, the revocation ``generation`` it was checked against and the
    time until which every issuer's list stays fresh. A later call for the
    same token (equal, not just the same id) is allowed when the generation is
    unchanged, ``now`` is inside the window and before that freshness deadline,
    and the pair was seen. Otherwise time, revocation, freshness and scope are
    checked again (without signatures); a change to the revocation state
    always forces that. Denials are never cached.
    """

    __slots__ = ("_cache", "_keys", "_policy", "_revocations", "max_entries")

    def __init__(
        self,
        *,
        policy: CapabilityPolicy,
        keys: KeyLookup,
        revocations: RevocationState,
        max_entries: int = 10_000,
    ) -> None:
        self._policy = policy
        self._keys = keys
        self._revocations = revocations
        self._cache: dict[bytes, _Verified] = {}
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._cache)

    def verify(
        self,
        token: Capability,
        *,
        action: str,
        resource: str,
        now: float,
        holder: str | None = None,
    ) -> None:
        """As :func:`verify`, with this verifier's policy, keys and revocation state.

        Raises:
            the exceptions of :func:`verify`.
        """
        entry = self._cache.get(token.token_id)
        if (
            entry is not None
            and (entry.token is token or entry.token == token)
            and entry.generation == self._revocations.generation
            and entry.from_ms <= now * 1000.0 <= entry.until_ms
            and now <= entry.fresh_until
            and (action, resource) in entry.allowed
            and (holder is None or holder == token.subject)
        ):
            return
        self._verify_slow(token, action, resource, now, holder, entry)

    def _verify_slow(
        self,
        token: Capability,
        action: str,
        resource: str,
        now: float,
        holder: str | None,
        entry: _Verified | None,
    ) -> None:
        policy, revocations = self._policy, self._revocations
        if entry is None or (entry.token is not token and entry.token != token):
            warnings = _verify_full(
                token, action, resource, now, revocations, policy, self._keys, holder
            )
            entry = self._remember(token)
        else:
            warnings = self._recheck(entry, action, resource, now, holder)
        if len(entry.allowed) < MAX_ALLOWED_PER_TOKEN:
            entry.allowed.add((action, resource))
        entry.generation = revocations.generation
        entry.fresh_until = min(
            revocations.fresh_until(t.issuer, policy.revocation) for t in entry.chain
        )
        _emit(policy, warnings)

    def _recheck(
        self, entry: _Verified, action: str, resource: str, now: float, holder: str | None
    ) -> list[StaleListAccepted]:
        _check_request(action, resource)
        _check_bindings(entry.token, self._policy.audience, holder)
        try:
            return _check_live(entry.chain, action, resource, now, self._revocations, self._policy)
        except (Expired, Revoked):
            # Both are final: the token can never verify again.
            del self._cache[entry.token.token_id]
            raise

    def _remember(self, token: Capability) -> _Verified:
        cache = self._cache
        if token.token_id not in cache and len(cache) >= self.max_entries:
            del cache[next(iter(cache))]  # the oldest entry
        entry = _Verified(token, self._policy.skew_ms)
        cache[token.token_id] = entry
        return entry

    def clear(self) -> None:
        """Forget every cached verification."""
        self._cache.clear()
