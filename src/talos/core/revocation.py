"""Revocation lists and the verifier's view of them (ARCHITECTURE §7).

Rules (the invariants every holder of lists enforces):

1. Each issuer publishes its own :class:`RevocationList`: revoked token ids,
   a cut-off "every token issued before T" (``revoked_before_ms``; 0 means
   none) and revoked issuer key sequence numbers. A list is signed by the
   issuer's key at ``key_sequence`` over :data:`DOMAIN_PREFIX` + canonical
   CBOR of every other field, and carries the time it was issued.
2. Versions increase and lists only grow: a higher version must revoke
   everything a lower one did (:meth:`RevocationList.covers`).
3. :func:`merge` of two lists of one issuer is deterministic and symmetric:
   the higher version wins when it covers the lower; otherwise the lower is
   kept and the pair is reported as ``NOT_APPEND_ONLY``. Two different lists
   with the same version are a *fork*, reported as ``FORKED``; the one that
   revokes more is kept (ties broken by the encoded bytes), so every node that
   saw both lists keeps the same one. Both are security events carrying the
   two lists as evidence: the issuer's key may be stolen, and it recovers by
   publishing a higher version that covers both.
4. Freshness is what the synchronization layer says it is: it calls
   :meth:`RevocationState.mark_synced` when it has confirmed it holds an
   issuer's newest list (or that the issuer has none). An issuer's list is
   *stale* at ``now`` when ``now > last_synced + max_age``; never synced means
   infinitely old. What a stale list means depends on the
   :class:`RevocationMode`:

   * ``strict``: deny with :class:`~talos.errors.RevocationListStale`;
   * ``permissive``: allow, with a :class:`StaleListAccepted` warning, while
     ``now <= last_synced + max_age + grace``; deny after that;
   * ``offline``: allow indefinitely, with a warning each time.

   Core does not log: warnings are returned to the caller
   (:mod:`talos.core.capability` hands them to the policy's ``on_warning``).

All times inside lists and tokens are integer milliseconds; ``now`` and the
policy durations are float seconds.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.crypto import SIGNATURE_SIZE, SigningKey
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.keylog import IssuerKeys, KeyLookup, resolve_key
from talos.errors import (
    ConfigurationError,
    LocalProtocolError,
    MalformedFrame,
    RevocationListStale,
    Revoked,
    UnsupportedVersion,
)

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_AGE",
    "DOMAIN_PREFIX",
    "LIST_VERSION",
    "MAX_LIST_SIZE",
    "IssuerKeys",
    "KeyLookup",
    "MergeOutcome",
    "MergeResult",
    "RevocationList",
    "RevocationMode",
    "RevocationPolicy",
    "RevocationState",
    "StaleListAccepted",
    "merge",
    "resolve_key",
]

LIST_VERSION: Final = 1
#: Domain separation: a list signature can never pass for a token or an envelope.
DOMAIN_PREFIX: Final = b"talos/revocation/v1\x00"
#: Bound on an encoded list (about 60,000 revoked ids; compact with revoked-before-T).
MAX_LIST_SIZE: Final = 1 << 20
DEFAULT_MAX_AGE: Final = 300.0
DEFAULT_GRACE: Final = 3600.0
TOKEN_ID_SIZE: Final = 16
_MAX_U32: Final = 2**32 - 1
_MAX_MS: Final = 2**63 - 1
_FIELDS: Final = frozenset({"v", "iss", "ver", "iat", "ks", "ids", "before", "keys", "sig"})

# -- the list -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RevocationList:
    """One signed version of an issuer's revocations. Build, then :meth:`signed_by`."""

    issuer: str
    version: int
    issued_at_ms: int
    key_sequence: int = 0
    revoked_ids: frozenset[bytes] = frozenset()
    revoked_before_ms: int = 0
    revoked_key_sequences: frozenset[int] = frozenset()
    signature: bytes = b""

    @classmethod
    def create(cls, issuer: str, *, now: float) -> RevocationList:
        """Version 1, revoking nothing (unsigned).

        Raises:
            LocalProtocolError: ``issuer`` is not an agent id.
        """
        lst = cls(issuer, 1, math.floor(now * 1000))
        lst._check_local()
        return lst

    def revise(
        self,
        *,
        now: float,
        token_ids: Iterable[bytes] = (),
        issued_before: float | None = None,
        key_sequences: Iterable[int] = (),
    ) -> RevocationList:
        """The next version: this one plus the given revocations (unsigned).

        ``issued_before`` is rounded *up* to the millisecond, so every token
        issued strictly before it is revoked (a token issued in the same
        millisecond after it may be too: the safe side).

        Raises:
            LocalProtocolError: an id or key sequence is malformed.
        """
        before = self.revoked_before_ms
        if issued_before is not None:
            before = max(before, math.ceil(issued_before * 1000))
        lst = replace(
            self,
            version=self.version + 1,
            issued_at_ms=math.floor(now * 1000),
            revoked_ids=self.revoked_ids | frozenset(token_ids),
            revoked_before_ms=before,
            revoked_key_sequences=self.revoked_key_sequences | frozenset(key_sequences),
            signature=b"",
        )
        lst._check_local()
        return lst

    def signed_by(self, key: SigningKey, key_sequence: int) -> RevocationList:
        """A copy signed with the issuer's key at ``key_sequence``."""
        unsigned = replace(self, key_sequence=key_sequence, signature=b"")
        unsigned._check_local()
        return replace(unsigned, signature=key.sign(unsigned.signed_bytes()))

    def verify_signature(self, keys: KeyLookup) -> None:
        """Check the issuer's signature.

        Raises:
            SignatureInvalid: unknown issuer key, or the signature does not verify.
        """
        key = resolve_key(keys, self.issuer, self.key_sequence)
        key.verify(self.signature, self.signed_bytes())

    def covers(self, older: RevocationList) -> bool:
        """Whether this list revokes everything ``older`` does (append-only)."""
        return (
            self.revoked_ids >= older.revoked_ids
            and self.revoked_before_ms >= older.revoked_before_ms
            and self.revoked_key_sequences >= older.revoked_key_sequences
        )

    def revocation_of(self, token_id: bytes, issued_at_ms: int, key_sequence: int) -> str | None:
        """Why this list revokes the described token, or ``None`` if it does not."""
        if token_id in self.revoked_ids:
            return "token id is revoked"
        if issued_at_ms < self.revoked_before_ms:
            return "every token issued before the issuer's cut-off is revoked"
        if key_sequence in self.revoked_key_sequences:
            return f"issuer key sequence {key_sequence} is revoked"
        return None

    # -- encoding -------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        """The signed fields as a CBOR map (sets as sorted lists)."""
        return {
            "v": LIST_VERSION,
            "iss": self.issuer,
            "ver": self.version,
            "iat": self.issued_at_ms,
            "ks": self.key_sequence,
            "ids": sorted(self.revoked_ids),
            "before": self.revoked_before_ms,
            "keys": sorted(self.revoked_key_sequences),
        }

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        return DOMAIN_PREFIX + canonical_dumps(self.body())

    def to_bytes(self) -> bytes:
        """Versioned canonical CBOR, for the network and for storage."""
        return canonical_dumps({**self.body(), "sig": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_LIST_SIZE) -> RevocationList:
        """Decode a list from untrusted bytes (structure only; see :meth:`verify_signature`).

        Raises:
            MalformedFrame: too large, not canonical CBOR, wrong fields, types
                or ranges, sets not strictly sorted.
            UnsupportedVersion: a list format this build does not know.
        """
        raw = strict_loads(data, max_size=max_size)
        if type(raw) is not dict:
            raise MalformedFrame("revocation list must be a CBOR map")
        version = raw.get("v")
        if type(version) is not int:
            raise MalformedFrame("revocation list format version must be an integer")
        if version != LIST_VERSION:
            raise UnsupportedVersion(f"revocation list format {version} is not supported")
        if raw.keys() != _FIELDS:
            raise MalformedFrame("revocation list has missing or unexpected fields")
        return cls(
            issuer=_agent_id(raw["iss"]),
            version=_uint("version", raw["ver"], _MAX_MS, minimum=1),
            issued_at_ms=_uint("issue time", raw["iat"], _MAX_MS),
            key_sequence=_uint("key sequence", raw["ks"], _MAX_U32),
            revoked_ids=_sorted_ids(raw["ids"]),
            revoked_before_ms=_uint("revoked-before time", raw["before"], _MAX_MS),
            revoked_key_sequences=_sorted_keys(raw["keys"]),
            signature=_signature(raw["sig"]),
        )

    def _check_local(self) -> None:
        """Validate a list built locally; a failure is the caller's bug."""
        try:
            _agent_id(self.issuer)
            _uint("version", self.version, _MAX_MS, minimum=1)
            _uint("issue time", self.issued_at_ms, _MAX_MS)
            _uint("key sequence", self.key_sequence, _MAX_U32)
            _uint("revoked-before time", self.revoked_before_ms, _MAX_MS)
            _sorted_ids(sorted(self.revoked_ids))
            _sorted_keys(sorted(self.revoked_key_sequences))
        except (MalformedFrame, TypeError) as exc:
            raise LocalProtocolError(f"invalid revocation list: {exc}") from exc


_checked_agent_id: Final = functools.lru_cache(maxsize=1024)(check_agent_id)


def _agent_id(value: Any) -> str:
    if type(value) is not str:
        raise MalformedFrame("issuer must be a text agent id")
    return _checked_agent_id(value)


def _uint(name: str, value: Any, maximum: int, *, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise MalformedFrame(f"{name} must be an integer in {minimum}..{maximum}")
    return value


def _signature(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != SIGNATURE_SIZE:
        raise MalformedFrame(f"signature must be {SIGNATURE_SIZE} bytes")
    return value


def _sorted_ids(value: Any) -> frozenset[bytes]:
    if type(value) is not list:
        raise MalformedFrame("revoked ids must be a list")
    for item in value:
        if type(item) is not bytes or len(item) != TOKEN_ID_SIZE:
            raise MalformedFrame(f"revoked ids must be {TOKEN_ID_SIZE} bytes each")
    _check_increasing(value, "revoked ids")
    return frozenset(value)


def _sorted_keys(value: Any) -> frozenset[int]:
    if type(value) is not list:
        raise MalformedFrame("revoked key sequences must be a list")
    for item in value:
        _uint("revoked key sequence", item, _MAX_U32)
    _check_increasing(value, "revoked key sequences")
    return frozenset(value)


def _check_increasing(items: list[Any], name: str) -> None:
    """One encoding per set: strictly increasing, so no duplicates and no reordering."""
    if any(a >= b for a, b in zip(items, items[1:], strict=False)):
        raise MalformedFrame(f"{name} must be strictly increasing")


# -- merging ------------------------------------------------------------------------


class MergeOutcome(enum.Enum):
    """What :func:`merge` did with an offered list."""

    ADOPTED = "adopted"  #: the offered list is new or a newer, covering version
    UNCHANGED = "unchanged"  #: the offered list is the one in use
    OLDER = "older"  #: an older version the one in use covers: ignored
    FORKED = "forked"  #: same version, different content (security event)
    NOT_APPEND_ONLY = "not-append-only"  #: a newer version drops revocations (security event)


@dataclass(frozen=True, slots=True)
class MergeResult:
    """The list to use after a merge, and the evidence if the issuer misbehaved."""

    outcome: MergeOutcome
    kept: RevocationList
    offered: RevocationList
    previous: RevocationList | None

    @property
    def security_event(self) -> bool:
        """A fork or an append-only violation: the issuer's key may be compromised."""
        return self.outcome in (MergeOutcome.FORKED, MergeOutcome.NOT_APPEND_ONLY)

    @property
    def changed(self) -> bool:
        return self.kept is not self.previous


def merge(current: RevocationList | None, offered: RevocationList) -> MergeResult:
    """Decide which of two lists of one issuer to use (rule 3 of the module docstring).

    Signatures are not checked here (see :meth:`RevocationState.apply`).

    Raises:
        LocalProtocolError: the lists belong to different issuers.
    """
    if current is None:
        return MergeResult(MergeOutcome.ADOPTED, offered, offered, None)
    if current.issuer != offered.issuer:
        raise LocalProtocolError("cannot merge revocation lists of different issuers")
    if current == offered:
        return MergeResult(MergeOutcome.UNCHANGED, current, offered, current)
    if current.version == offered.version:
        kept = max(current, offered, key=_fork_preference)
        return MergeResult(MergeOutcome.FORKED, kept, offered, current)
    low, high = sorted((current, offered), key=lambda lst: lst.version)
    if not high.covers(low):
        return MergeResult(MergeOutcome.NOT_APPEND_ONLY, low, offered, current)
    outcome = MergeOutcome.ADOPTED if high is offered else MergeOutcome.OLDER
    return MergeResult(outcome, high, offered, current)


def _fork_preference(lst: RevocationList) -> tuple[int, int, int, bytes]:
    """Total order for forks: the list that revokes more wins; bytes break ties."""
    return (
        lst.revoked_before_ms,
        len(lst.revoked_key_sequences),
        len(lst.revoked_ids),
        lst.to_bytes(),
    )


# -- freshness policy ---------------------------------------------------------------


class RevocationMode(enum.StrEnum):
    """How to treat a revocation list older than ``max_age`` (Failure-Modes)."""

    STRICT = "strict"
    PERMISSIVE = "permissive"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class RevocationPolicy:
    """Freshness requirements: mode, ``max_age`` and the permissive ``grace`` (seconds)."""

    mode: RevocationMode = RevocationMode.STRICT
    max_age: float = DEFAULT_MAX_AGE
    grace: float = DEFAULT_GRACE

    def __post_init__(self) -> None:
        """Raises: ConfigurationError: unknown mode or a negative duration."""
        if not isinstance(self.mode, RevocationMode):
            raise ConfigurationError(f"unknown revocation mode {self.mode!r}")
        if not (self.max_age >= 0 and self.grace >= 0):
            raise ConfigurationError("revocation max_age and grace must not be negative")


@dataclass(frozen=True, slots=True)
class StaleListAccepted:
    """Warning: a token was allowed although its issuer's list is older than ``max_age``."""

    issuer: str
    mode: RevocationMode
    age_seconds: float

    @property
    def message(self) -> str:
        return (
            f"revocation list of {self.issuer} is {self.age_seconds:.0f} s old; "
            f"accepted in {self.mode} mode"
        )


# -- the verifier's state -----------------------------------------------------------


@dataclass(slots=True)
class RevocationState:
    """The lists a verifier uses, when each issuer was last synchronized, and conflicts.

    Sans-I/O and mutable; persistence stores :meth:`RevocationList.to_bytes`
    and the sync time per issuer and replays them through :meth:`apply` and
    :meth:`mark_synced`. ``generation`` increases whenever the revocations in
    use change, which is how cached verifications notice.
    """

    _lists: dict[str, RevocationList] = field(default_factory=dict)
    _synced: dict[str, float] = field(default_factory=dict)
    #: Forks and append-only violations seen, in order: evidence for the audit log.
    conflicts: list[MergeResult] = field(default_factory=list)
    generation: int = 0

    def apply(self, offered: RevocationList, *, keys: KeyLookup) -> MergeResult:
        """Verify ``offered`` and merge it with the issuer's list in use.

        A security event is recorded in :attr:`conflicts` and returned; it is
        not raised, so synchronization of other issuers goes on.

        Raises:
            SignatureInvalid: the list is not signed by its issuer.
        """
        offered.verify_signature(keys)
        result = merge(self._lists.get(offered.issuer), offered)
        if result.security_event:
            self.conflicts.append(result)
        if result.changed:
            self._lists[offered.issuer] = result.kept
            self.generation += 1
        return result

    def mark_synced(self, issuer: str, now: float) -> None:
        """Record that at ``now`` this state holds ``issuer``'s newest list (or it has none)."""
        self._synced[issuer] = max(now, self._synced.get(issuer, now))

    def list_for(self, issuer: str) -> RevocationList | None:
        return self._lists.get(issuer)

    @property
    def lists(self) -> Mapping[str, RevocationList]:
        return dict(self._lists)

    def last_synced(self, issuer: str) -> float | None:
        return self._synced.get(issuer)

    def revocation_list_age_seconds(self, now: float) -> float:
        """Age of the oldest list in use: the ``talos_revocation_list_age_seconds`` gauge.

        An issuer with a list but no sync counts as infinitely old; 0.0 when
        no issuer is known.
        """
        issuers = self._lists.keys() | self._synced.keys()
        if not issuers:
            return 0.0
        return max(now - self._synced.get(issuer, -math.inf) for issuer in issuers)

    def fresh_until(self, issuer: str, policy: RevocationPolicy) -> float:
        """The last ``now`` at which ``issuer``'s list is within ``max_age``."""
        return self._synced.get(issuer, -math.inf) + policy.max_age

    def check(
        self,
        issuer: str,
        token_id: bytes,
        issued_at_ms: int,
        key_sequence: int,
        *,
        now: float,
        policy: RevocationPolicy,
    ) -> StaleListAccepted | None:
        """Is this token of ``issuer`` revoked, and is the list fresh enough to say?

        Returns a warning when a stale list is accepted under the policy.

        Raises:
            Revoked: the issuer's list revokes the token id, every token issued
                before the token's issue time, or the key sequence that signed it.
            RevocationListStale: the list is too old for the policy's mode.
        """
        lst = self._lists.get(issuer)
        if lst is not None:
            reason = lst.revocation_of(token_id, issued_at_ms, key_sequence)
            if reason is not None:
                raise Revoked(f"capability {token_id.hex()} of {issuer}: {reason}")
        synced = self._synced.get(issuer, -math.inf)
        if now <= synced + policy.max_age:
            return None
        return _stale(issuer, synced, now, policy)


def _stale(issuer: str, synced: float, now: float, policy: RevocationPolicy) -> StaleListAccepted:
    """Apply the mode to a list last synchronized at ``synced``, older than ``max_age``.

    Raises:
        RevocationListStale: strict mode, or permissive beyond the grace period.
    """
    mode, age = policy.mode, now - synced
    if mode is RevocationMode.OFFLINE:
        return StaleListAccepted(issuer, mode, age)
    if mode is RevocationMode.PERMISSIVE and now <= synced + policy.max_age + policy.grace:
        return StaleListAccepted(issuer, mode, age)
    limit = policy.max_age + (policy.grace if mode is RevocationMode.PERMISSIVE else 0.0)
    raise RevocationListStale(
        f"revocation list of {issuer} is {age:.0f} s old, beyond the {limit:.0f} s "
        f"allowed in {mode} mode"
    )
