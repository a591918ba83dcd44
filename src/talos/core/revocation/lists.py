"""Revocation lists: what an issuer publishes, its encoding, and merging two versions.

Owns rules 1 to 3 of :mod:`talos.core.revocation`: the signed list and its
canonical CBOR, growth from version to version (:meth:`RevocationList.covers`)
and the deterministic :func:`merge` that turns forks and shrinking lists into
evidence. Decoding untrusted bytes raises only
:class:`~talos.errors.MalformedFrame` or :class:`~talos.errors.UnsupportedVersion`.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.crypto import SIGNATURE_SIZE, SigningKey
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.keylog import KeyLookup, resolve_key
from talos.errors import LocalProtocolError, MalformedFrame, UnsupportedVersion

__all__ = [
    "DOMAIN_PREFIX",
    "LIST_VERSION",
    "MAX_LIST_SIZE",
    "TOKEN_ID_SIZE",
    "MergeOutcome",
    "MergeResult",
    "RevocationList",
    "merge",
]

LIST_VERSION: Final = 1
#: Domain separation: a list signature can never pass for a token or an envelope.
DOMAIN_PREFIX: Final = b"talos/revocation/v1\x00"
#: Bound on an encoded list (about 60,000 revoked ids; compact with revoked-before-T).
MAX_LIST_SIZE: Final = 1 << 20
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
    """Decide which of two lists of one issuer to use (rule 3 of :mod:`talos.core.revocation`).

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
