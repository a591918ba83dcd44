"""Audit log entries: what one record holds, and its one byte encoding.

Rules this module keeps:

* An entry is metadata about an event (its sequence number, time, kind, the
  peer concerned) plus a small map of *hashes and metadata*. It never holds a
  message's plaintext or ciphertext: callers pass digests, ids, sizes and
  reason codes. The bounds below make that a rule rather than a wish: a byte
  string longer than :data:`MAX_BYTES_FIELD` (a signature, a hash, an id fits;
  a payload does not) and a text longer than :data:`MAX_TEXT_FIELD` are
  refused, and the whole entry encodes to at most :data:`MAX_ENTRY_SIZE` bytes.
* The encoding is deterministic CBOR (RFC 8949 §4.2) of the map
  ``{"v": version, "s": seq, "t": time_ms, "k": kind, "p": peer, "d": data}``,
  so each entry has exactly one byte representation, and the Merkle leaf is
  ``merkle.leaf_hash(entry bytes)`` (RFC 9162 §2.1.1). The sequence number is
  inside the hashed bytes, so a leaf also commits to its position.
* Decoding is strict (:func:`talos.core.encoding.strict_loads`): every input
  that is not exactly an encoding this module produces is refused with
  :class:`~talos.errors.MalformedFrame`; an unknown version with
  :class:`~talos.errors.UnsupportedVersion`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import cbor2

from talos.core.audit.merkle import leaf_hash
from talos.core.encoding import MAX_DEPTH, strict_loads
from talos.errors import LocalProtocolError, MalformedFrame, UnsupportedVersion

__all__ = [
    "ENTRY_VERSION",
    "MAX_BYTES_FIELD",
    "MAX_ENTRY_SIZE",
    "MAX_PEER_LENGTH",
    "MAX_TEXT_FIELD",
    "AuditEntry",
    "AuditKind",
    "check_kind",
    "check_peer",
    "encode_data",
    "encode_entry",
    "entry_middle",
    "finish_entries",
    "finish_entry",
]

#: Version of the entry encoding; part of the hashed bytes.
ENTRY_VERSION: Final = 1

#: Largest encoded entry, in bytes.
MAX_ENTRY_SIZE: Final = 4096

#: Longest byte string inside ``data``: room for a 64-byte signature, not a payload.
MAX_BYTES_FIELD: Final = 64

#: Longest text (in characters) inside ``data``: ids, names and reason strings.
MAX_TEXT_FIELD: Final = 512

#: Longest peer identifier, in characters.
MAX_PEER_LENGTH: Final = 256

#: Largest value of a sequence number or a time (uint64).
_MAX_U64: Final = 2**64 - 1

_KIND_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_FIELDS = frozenset({"v", "s", "t", "k", "p", "d"})


class AuditKind(StrEnum):
    """The kinds of event Talos records. Values equal names, so they read well in queries.

    Applications may log kinds of their own: any upper-case identifier of at
    most 64 characters (``[A-Z][A-Z0-9_]*``) is accepted, see :func:`check_kind`.
    """

    MESSAGE_SENT = "MESSAGE_SENT"
    MESSAGE_RECEIVED = "MESSAGE_RECEIVED"
    MESSAGE_DELIVERED = "MESSAGE_DELIVERED"
    SESSION_ESTABLISHED = "SESSION_ESTABLISHED"
    SESSION_RESET = "SESSION_RESET"
    SIGNATURE_FAILURE = "SIGNATURE_FAILURE"
    DECRYPTION_FAILURE = "DECRYPTION_FAILURE"
    REPLAY_DROPPED = "REPLAY_DROPPED"
    CAPABILITY_GRANTED = "CAPABILITY_GRANTED"
    CAPABILITY_DENIED = "CAPABILITY_DENIED"
    CAPABILITY_REVOKED = "CAPABILITY_REVOKED"
    KEY_ROTATED = "KEY_ROTATED"
    #: A peer's key log grew: it rotated (old and new sequence, emergency, reason).
    PEER_KEY_ROTATED = "PEER_KEY_ROTATED"
    #: A peer offered a key log that forks or rolls back the one we hold.
    PEER_KEY_LOG_REFUSED = "PEER_KEY_LOG_REFUSED"
    PEER_REJECTED = "PEER_REJECTED"
    DELIVERY_FAILED = "DELIVERY_FAILED"
    ANCHOR_SUBMITTED = "ANCHOR_SUBMITTED"
    ANCHOR_CONFIRMED = "ANCHOR_CONFIRMED"
    ANCHOR_FAILED = "ANCHOR_FAILED"
    #: A checkpoint's anchor became final on chain (talos.audit.anchoring).
    AUDIT_ANCHORED = "AUDIT_ANCHORED"
    LOG_RESTORED = "LOG_RESTORED"
    #: ``talos audit rebuild`` re-derived the log from its intact entries (lost counts).
    AUDIT_REBUILT = "AUDIT_REBUILT"
    #: A witness and an origin disagree on the origin's log: a checkpoint that
    #: rolls back, forks or is not consistent with one a witness accepted
    #: (docs/design/witnesses.md). Written on both sides.
    AUDIT_EQUIVOCATION = "AUDIT_EQUIVOCATION"
    #: A witness cosigned this log's checkpoint (size, root, the cosignature).
    CHECKPOINT_COSIGNED = "CHECKPOINT_COSIGNED"
    #: ``talos audit rebuild --from-peers`` rebuilt the log from a mirror (size, lost).
    MIRROR_REBUILT = "MIRROR_REBUILT"
    #: The application cancelled a queued message (TalosClient.cancel); it left the outbox.
    MESSAGE_CANCELLED = "MESSAGE_CANCELLED"
    #: A queued message's expires_in passed before its ACK; it left the outbox.
    MESSAGE_EXPIRED = "MESSAGE_EXPIRED"
    #: An anchor of this log by its own wallet contradicts the log (talos.audit.anchoring.watch).
    ANCHOR_MISMATCH = "ANCHOR_MISMATCH"
    #: Payloads of entries covered by a final anchor were dropped (talos.audit.pruning).
    AUDIT_PRUNED = "AUDIT_PRUNED"
    #: A capability granted to this agent was verified and stored (client.add_capability,
    #: ``talos capabilities add``).
    CAPABILITY_RECEIVED = "CAPABILITY_RECEIVED"
    #: A request arrived (``id``, ``rq``: until when, Unix ms, its sender waits for
    #: the reply); committed with the message (docs/design/request-reply.md).
    REQUEST_RECEIVED = "REQUEST_RECEIVED"
    #: This agent answered a request (``id``: the reply's, ``re``: the request's);
    #: committed with the reply's place in the outbox.
    REPLY_SENT = "REPLY_SENT"
    #: A reply was refused (``id``, ``re``, ``reason``: unsolicited, second, foreign,
    #: late, expired).
    REPLY_REFUSED = "REPLY_REFUSED"
    #: Audit entries of one kind about one peer that the per-peer rate limit left
    #: out (``count``, ``kind``, ``from_ms``..``to_ms``): queries never undercount
    #: silently (talos.client.control.Auditor, docs/operations.md).
    FAILURES_SUPPRESSED = "FAILURES_SUPPRESSED"


def check_kind(kind: object) -> str:
    """Return ``kind`` as a plain ``str`` if it is a valid entry kind.

    Raises:
        LocalProtocolError: not a string of the form ``[A-Z][A-Z0-9_]{0,63}``.
    """
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise LocalProtocolError(f"audit kind {kind!r} is not an upper-case identifier")
    return str(kind)


def check_peer(peer: object) -> str | None:
    """Return ``peer`` if it is ``None`` or a printable id of at most 256 characters.

    Raises:
        LocalProtocolError: anything else (empty, too long, control characters).
    """
    if peer is None:
        return None
    if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_LENGTH or not peer.isprintable():
        raise LocalProtocolError("audit peer must be a printable string of 1-256 characters")
    return str(peer)


def _check_data(value: Any, depth: int = 0) -> Any:
    """Validate ``value`` against the data model and the bounds; return it in canonical order.

    Maps come back as new dicts whose keys are in RFC 8949 §4.2.1 order
    (shorter encoded key first, then bytewise), so a plain ``cbor2.dumps``
    of the result is the deterministic encoding: cbor2 always writes shortest
    lengths, and floats, tags and sets are refused here. This is about five
    times faster than canonical mode on the append path; the unit tests check
    that both give the same bytes.

    Raises:
        LocalProtocolError: a type outside the model, a bound broken, too deep.
    """
    kind = type(value)
    if kind is bytes:
        if len(value) > MAX_BYTES_FIELD:
            raise LocalProtocolError(
                f"audit data holds {len(value)} bytes in one field; log a hash, not a payload"
            )
        return value
    if kind is str:
        if len(value) > MAX_TEXT_FIELD:
            raise LocalProtocolError(f"audit data text longer than {MAX_TEXT_FIELD} characters")
        return value
    if kind is int:
        if not -(2**64) <= value < 2**64:
            raise LocalProtocolError("audit data integer outside the 64-bit range")
        return value
    if kind is bool or value is None:
        return value
    if depth >= MAX_DEPTH:
        raise LocalProtocolError(f"audit data nested deeper than {MAX_DEPTH}")
    if kind is list or kind is tuple:
        return [_check_data(item, depth + 1) for item in value]
    if kind is dict:
        keyed = []
        for key, item in value.items():
            if type(key) is not str or len(key) > MAX_TEXT_FIELD:
                raise LocalProtocolError(
                    "audit data keys must be strings of at most 512 characters"
                )
            raw = _utf8(key)
            keyed.append((len(raw), raw, key, _check_data(item, depth + 1)))
        keyed.sort(key=lambda row: (row[0], row[1]))
        return {key: item for _, _, key, item in keyed}
    raise LocalProtocolError(f"{kind.__name__} is outside the audit data model")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError("audit data text is not encodable as UTF-8") from None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One record of the audit log.

    ``time_ms`` is Unix time in milliseconds; ``data`` maps text keys to
    values of the Talos CBOR data model (ints, bytes, text, booleans, null,
    lists, maps) within the bounds in the module docstring.
    """

    seq: int
    time_ms: int
    kind: str
    peer: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate every field and put ``data`` in canonical order.

        Raises:
            LocalProtocolError: a field is out of range, a kind or peer is
                invalid, or ``data`` breaks the bounds or the data model.
        """
        for name, value in (("seq", self.seq), ("time_ms", self.time_ms)):
            if type(value) is not int or not 0 <= value <= _MAX_U64:
                raise LocalProtocolError(f"audit entry {name} must be a uint64")
        check_kind(self.kind)
        check_peer(self.peer)
        if not isinstance(self.data, Mapping):
            raise LocalProtocolError("audit data must be a mapping")
        object.__setattr__(self, "kind", str(self.kind))
        object.__setattr__(self, "data", _check_data(dict(self.data)))

    def to_bytes(self) -> bytes:
        """The canonical CBOR encoding: what the Merkle leaf hashes.

        Raises:
            LocalProtocolError: ``data`` is outside the CBOR data model, or the
                entry encodes to more than :data:`MAX_ENTRY_SIZE` bytes.
        """
        return encode_entry(self.seq, self.time_ms, self.kind, self.peer, encode_data(self.data))

    def leaf_hash(self) -> bytes:
        """The Merkle leaf of this entry, ``SHA-256(0x00 || to_bytes())``."""
        return leaf_hash(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> AuditEntry:
        """Decode an entry from untrusted bytes.

        Raises:
            MalformedFrame: not exactly the canonical encoding of a valid entry.
            UnsupportedVersion: an entry version this build does not know.
        """
        raw = strict_loads(data, max_size=MAX_ENTRY_SIZE)
        if not isinstance(raw, dict) or set(raw) != _FIELDS:
            raise MalformedFrame("audit entry must be a map with exactly the entry fields")
        version = raw["v"]
        if type(version) is not int:
            raise MalformedFrame("audit entry version must be an integer")
        if version != ENTRY_VERSION:
            raise UnsupportedVersion(f"audit entry version {version} is not supported")
        if type(raw["d"]) is not dict:
            raise MalformedFrame("audit entry data must be a map")
        try:
            return cls(raw["s"], raw["t"], raw["k"], raw["p"], raw["d"])
        except LocalProtocolError as exc:
            raise MalformedFrame(f"invalid audit entry: {exc}") from None


# -- encoding ------------------------------------------------------------------
#
# The envelope around ``data`` is written by hand: it is the same bytes
# canonical_dumps would produce for the whole map (the unit tests check that),
# at a fraction of the cost on the append path. Canonical order of the one-
# letter keys is bytewise: d, k, p, s, t, v (RFC 8949 §4.2.1).


def encode_data(data: Mapping[str, Any]) -> bytes:
    """Validate ``data`` and return its canonical CBOR: the expensive half of an entry.

    A log calls this before it takes its write lock, so a bad record fails
    its own caller and never the batch it would have joined.

    Raises:
        LocalProtocolError: not a mapping with text keys, outside the CBOR data
            model, or breaking the size bounds.
    """
    ordered = _ordered_flat(data) if type(data) is dict else None
    if ordered is None:
        if not isinstance(data, Mapping):
            raise LocalProtocolError("audit data must be a mapping")
        ordered = _check_data(dict(data))
    try:
        return bytes(cbor2.dumps(ordered))
    except UnicodeEncodeError:
        raise LocalProtocolError("audit data text is not encodable as UTF-8") from None


#: Canonical key order of the data maps seen so far, by their keys in insertion order.
#: Callers log a handful of shapes (``{"message_id", "hash", "size"}``, ...), so
#: after the first entry of a shape its keys need no re-encoding and no sort.
_KEY_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}
_MAX_KEY_ORDERS: Final = 512


def _ordered_flat(data: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`_check_data` for the common case, a map of scalars; ``None`` otherwise.

    Returns the same dict as ``_check_data(data)``, with the same checks on
    keys and values, or ``None`` for anything else (a nested value, a bad
    key, a shape not yet seen); the caller then takes the general path,
    which also raises the error, if any.
    """
    keys = tuple(data)
    order = _KEY_ORDERS.get(keys)
    if order is None:
        if len(_KEY_ORDERS) >= _MAX_KEY_ORDERS or len(keys) > 32:
            return None
        for key in keys:
            if type(key) is not str or len(key) > MAX_TEXT_FIELD or not _encodable(key):
                return None
        order = tuple(sorted(keys, key=lambda k: (len(k.encode("utf-8")), k.encode("utf-8"))))
        _KEY_ORDERS[keys] = order
    else:
        for key in keys:
            if type(key) is not str:  # a str subclass equal to a cached key
                return None
    ordered = {}
    for key in order:
        value = data[key]
        kind = type(value)
        if kind is bytes:
            if len(value) > MAX_BYTES_FIELD:
                return None
        elif kind is str:
            if len(value) > MAX_TEXT_FIELD:
                return None
        elif kind is int:
            if not -(2**64) <= value < 2**64:
                return None
        elif kind is not bool and value is not None:
            return None
        ordered[key] = value
    return ordered


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_entry(seq: int, time_ms: int, kind: str, peer: str | None, data: bytes) -> bytes:
    """Assemble an entry from its fields and the output of :func:`encode_data`.

    ``kind`` and ``peer`` must have passed :func:`check_kind`/:func:`check_peer`.

    Raises:
        LocalProtocolError: the entry would exceed :data:`MAX_ENTRY_SIZE` bytes.
    """
    body = finish_entry(seq, time_ms, entry_middle(kind, peer, data))
    if len(body) > MAX_ENTRY_SIZE:
        raise LocalProtocolError(
            f"audit entry encodes to {len(body)} bytes, over the {MAX_ENTRY_SIZE}-byte limit"
        )
    return body


#: Bytes an entry adds around its middle part when seq and time are largest.
_ENVELOPE_MAX = len(b"\xa6\x61d") + 2 * (2 + 9) + 3


def entry_middle(kind: str, peer: str | None, data: bytes) -> bytes:
    """The part of an entry that does not depend on its seq and time (``d``, ``k``, ``p``).

    A log computes it before taking its write lock; :func:`finish_entry`
    adds the rest. Its length plus :data:`_ENVELOPE_MAX` bounds the entry.

    Raises:
        LocalProtocolError: even with the smallest seq and time the entry
            would exceed :data:`MAX_ENTRY_SIZE` (checked for the largest).
    """
    peer_bytes = b"\xf6" if peer is None else _text(peer)
    middle = b"".join((data, _kind_field(kind), peer_bytes))
    if len(middle) + _ENVELOPE_MAX > MAX_ENTRY_SIZE:
        raise LocalProtocolError(
            f"audit entry would exceed the {MAX_ENTRY_SIZE}-byte limit; log hashes, not payloads"
        )
    return middle


@functools.lru_cache(maxsize=256)
def _kind_field(kind: str) -> bytes:
    """``"k": kind, "p":`` (the bytes between data and peer); an application logs few kinds."""
    return b"\x61k" + _text(kind) + b"\x61p"


def finish_entry(seq: int, time_ms: int, middle: bytes) -> bytes:
    """Complete an entry from :func:`entry_middle` (keys in canonical order: d k p s t v)."""
    return b"".join((b"\xa6\x61d", middle, b"\x61s", _head(0, seq), _tail(time_ms)))


def finish_entries(first_seq: int, time_ms: int, middles: Sequence[bytes]) -> list[bytes]:
    """:func:`finish_entry` for consecutive seqs from ``first_seq`` that share one time.

    A group commit stamps its whole batch with one time, so the time is
    encoded once per batch rather than once per entry.
    """
    tail = _tail(time_ms)
    return [
        b"".join((b"\xa6\x61d", middle, b"\x61s", _head(0, seq), tail))
        for seq, middle in enumerate(middles, first_seq)
    ]


def _tail(time_ms: int) -> bytes:
    return b"\x61t" + _head(0, time_ms) + b"\x61v\x01"


def _head(major: int, value: int) -> bytes:
    """A CBOR initial byte and shortest argument (RFC 8949 §3, §4.2.1)."""
    top = major << 5
    if value < 24:
        return bytes((top | value,))
    if value < 0x100:
        return bytes((top | 24, value))
    if value < 0x10000:
        return bytes((top | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((top | 26,)) + value.to_bytes(4, "big")
    return bytes((top | 27,)) + value.to_bytes(8, "big")


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return _head(3, len(raw)) + raw
