"""Row plumbing every part of the agent state shares: the layout version, u64
keys, validation of the ids used in keys, strict decoding of CBOR rows, and the
:class:`~talos.errors.StoreCorrupted` that names a damaged row."""

from __future__ import annotations

import struct
from typing import Any, Final

from talos.core.encoding import strict_versioned_map
from talos.core.replay import MAX_ID_SIZE
from talos.errors import LocalProtocolError, MalformedFrame, StoreCorrupted, UnsupportedVersion

#: Version of every structured row (its ``v`` field).
FORMAT_VERSION: Final = 1
#: Version of the layout (``agent["format"]``). Layout 2 keeps the outbox and
#: inbox counters beside their rows (``outbox_index[b"n"]``, ``inbox[NEXT_KEY]``)
#: instead of in ``agent``, which a message commit then does not touch. A
#: layout-1 state reads as before (its ``agent`` counters stay the floor of
#: the new ones) and becomes layout 2 with its first commit; a Talos that
#: knows only layout 1 refuses layout 2 (it would reuse sequence numbers).
LAYOUT_VERSION: Final = 2
#: Layouts this version reads.
READABLE_LAYOUTS: Final = frozenset({1, 2})
#: Largest outbox payload or inbox message accepted.
MAX_PAYLOAD_SIZE: Final = 16 << 20

U64: Final = struct.Struct(">Q")
_MAX_ROW = MAX_PAYLOAD_SIZE + (64 << 10)
_MAX_PEER_BYTES = 255


def corrupt(db: str, key: str, reason: str) -> StoreCorrupted:
    """The error for a damaged row of database ``db`` at ``key``."""
    return StoreCorrupted(
        f"agent state database {db!r}, key {key}: {reason}",
        where=f"agent state {db} {key}",
        what=reason,
    )


def seq_name(key: bytes) -> str:
    """How an error names the row at u64 key ``key`` (its number, or hex if malformed)."""
    return str(U64.unpack(key)[0]) if len(key) == 8 else key.hex()


def decode_row(db: str, where: str, raw: bytes, fields: frozenset[str]) -> dict[str, Any]:
    """A row's CBOR map with exactly ``fields`` at :data:`FORMAT_VERSION`.

    Raises:
        StoreCorrupted: it is not such a map.
    """
    try:
        return strict_versioned_map(
            raw, max_size=_MAX_ROW, fields=fields, version=FORMAT_VERSION, what=f"{db} row"
        )
    except (MalformedFrame, UnsupportedVersion) as exc:
        raise corrupt(db, where, str(exc)) from None


def peer_key(peer: str) -> bytes:
    """The UTF-8 bytes of a peer id (printable, 1..255 bytes: an LMDB key must fit).

    Raises:
        LocalProtocolError: not such a string.
    """
    if type(peer) is not str or not peer or not peer.isprintable():
        raise LocalProtocolError("peer id must be a non-empty printable string")
    raw = peer.encode("utf-8")
    if len(raw) > _MAX_PEER_BYTES:
        raise LocalProtocolError(f"peer id longer than {_MAX_PEER_BYTES} bytes")
    return raw


def message_id(mid: bytes) -> bytes:
    """``mid`` if it is a valid message id (1..MAX_ID_SIZE bytes).

    Raises:
        LocalProtocolError: it is not.
    """
    if type(mid) is not bytes or not 1 <= len(mid) <= MAX_ID_SIZE:
        raise LocalProtocolError(f"message id must be 1..{MAX_ID_SIZE} bytes")
    return mid


def as_bytes(what: str, value: bytes) -> bytes:
    """``value`` as ``bytes`` (from any bytes-like object).

    Raises:
        LocalProtocolError: it is not bytes-like.
    """
    if not isinstance(value, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"{what} must be bytes")
    return bytes(value)


def text(db: str, key: bytes) -> str:
    """A key of ``db`` decoded as UTF-8.

    Raises:
        StoreCorrupted: it is not UTF-8.
    """
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise corrupt(db, key.hex(), "key is not UTF-8") from None
