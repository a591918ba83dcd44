"""The inbox: received, verified, decrypted messages waiting for the application.

Owns the ``inbox`` database: u64be(seq) -> CBOR row ``{v, from, id, ct, sent,
recv, cap}`` whose ``ct`` is the data sealed with associated data
``("inbox", sender, message id)``, and, after every row, the counter
(:data:`NEXT_KEY` -> u64be(next seq), layout 2), so a sequence number is
never reused, even after the inbox was emptied. New rows go just before the
counter, so writing it costs a receive no page of its own (layout 1 kept it
in ``agent`` as ``inbox_next``, now read as its floor). Every read of rows
stops at the counter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from talos.core.encoding import canonical_dumps
from talos.errors import LocalProtocolError, MalformedFrame
from talos.storage.state.commit import Unchanged
from talos.storage.state.meta import Meta
from talos.storage.state.rows import (
    FORMAT_VERSION,
    MAX_PAYLOAD_SIZE,
    U64,
    as_bytes,
    corrupt,
    decode_row,
    message_id,
    peer_key,
    seq_name,
)
from talos.storage.state.sealing import Sealer

if TYPE_CHECKING:
    import lmdb

_FIELDS: Final = frozenset({"v", "from", "id", "ct", "sent", "recv", "cap"})
#: The counter's key: 9 bytes, after every u64 row key.
NEXT_KEY: Final = b"\xff" * 9


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """A received, verified, decrypted message waiting for the application."""

    sender: str
    message_id: bytes
    data: bytes
    sent_at_ms: int
    received_at_ms: int
    capability_id: bytes | None = None


class Inbox:
    """The ``inbox`` database, its rows and its counter (:data:`NEXT_KEY`)."""

    def __init__(self, db: lmdb._Database, meta: Meta, sealer: Sealer) -> None:
        self._db = db
        self._meta = meta
        self._sealer = sealer

    def row(self, message: InboxMessage) -> bytes:
        """The stored row of ``message`` (data sealed); built before the transaction.

        Raises:
            LocalProtocolError: a field of ``message`` is invalid.
        """
        sender = message.sender
        peer_key(sender)
        message_id(message.message_id)
        data = as_bytes("message data", message.data)
        if len(data) > MAX_PAYLOAD_SIZE:
            raise LocalProtocolError(f"message larger than {MAX_PAYLOAD_SIZE} bytes")
        cap = message.capability_id
        if type(message.sent_at_ms) is not int or type(message.received_at_ms) is not int:
            raise LocalProtocolError("inbox message times must be integers (ms)")
        if cap is not None and type(cap) is not bytes:
            raise LocalProtocolError("inbox message capability id must be bytes or None")
        sealed = self._sealer.seal(data, ("inbox", sender, message.message_id))
        try:
            return canonical_dumps(
                {
                    "v": FORMAT_VERSION,
                    "from": sender,
                    "id": message.message_id,
                    "ct": sealed,
                    "sent": message.sent_at_ms,
                    "recv": message.received_at_ms,
                    "cap": message.capability_id,
                }
            )
        except MalformedFrame as exc:
            raise LocalProtocolError(f"inbox message: {exc}") from None

    def decode(self, key: bytes, raw: bytes) -> InboxMessage:
        """The message stored at ``key``.

        Raises:
            StoreCorrupted: the row is damaged.
        """
        where = seq_name(key)
        row = decode_row("inbox", where, raw, _FIELDS)
        sender, mid, cap = row["from"], row["id"], row["cap"]
        if not (
            type(sender) is str
            and type(mid) is bytes
            and type(row["ct"]) is bytes
            and type(row["sent"]) is int
            and type(row["recv"]) is int
            and (cap is None or type(cap) is bytes)
        ):
            raise corrupt("inbox", where, "fields of the wrong type")
        data = self._sealer.unseal("inbox", where, row["ct"], ("inbox", sender, mid))
        return InboxMessage(sender, mid, data, row["sent"], row["recv"], cap)

    def append(self, txn: lmdb.Transaction[bytes], rows: Sequence[bytes]) -> list[int]:
        """Write rows (from :meth:`row`) at the end of the inbox; their sequence numbers."""
        db, meta = self._db, self._meta
        seqs = []
        for row in rows:
            seq = meta.next_seq(txn, db, NEXT_KEY, b"inbox_next")
            txn.put(U64.pack(seq), row, db=db)
            seqs.append(seq)
        return seqs

    def read(
        self, txn: lmdb.Transaction[bytes], after: int, limit: int
    ) -> list[tuple[int, InboxMessage]]:
        """Up to ``limit`` messages with sequence above ``after``, in order, with their
        sequence numbers.

        Raises:
            StoreCorrupted: a row is damaged.
        """
        rows: list[tuple[bytes, bytes]] = []
        cursor = txn.cursor(db=self._db)
        if limit > 0 and cursor.set_range(U64.pack(max(after + 1, 0))):
            for key, value in cursor.iternext():
                if key == NEXT_KEY:
                    break
                rows.append((key, value))
                if len(rows) >= limit:
                    break
        return [(U64.unpack(key)[0], self.decode(key, value)) for key, value in rows]

    def count(self, txn: lmdb.Transaction[bytes]) -> int:
        """How many messages wait."""
        counter = txn.get(NEXT_KEY, db=self._db) is not None
        return int(txn.stat(self._db)["entries"]) - counter

    def take(self, txn: lmdb.Transaction[bytes], limit: int) -> list[InboxMessage]:
        """Delete and return the oldest ``limit`` messages.

        Raises:
            Unchanged: the inbox is empty (or ``limit`` is not positive).
            StoreCorrupted: a row is damaged.
        """
        rows: list[tuple[bytes, bytes]] = []
        cursor = txn.cursor(db=self._db)
        if limit > 0 and cursor.first():
            for key, value in cursor.iternext():
                if key == NEXT_KEY:
                    break
                rows.append((key, value))
                if len(rows) >= limit:
                    break
        if not rows:
            raise Unchanged
        taken = [self.decode(key, value) for key, value in rows]
        for key, _ in rows:
            txn.delete(key, db=self._db)
        return taken

    def delete(self, txn: lmdb.Transaction[bytes], keys: Sequence[bytes]) -> None:
        """Delete the rows at ``keys`` (from :func:`seq_keys`).

        Raises:
            Unchanged: none of them was there.
        """
        if not self.delete_present(txn, keys):
            raise Unchanged

    def delete_present(self, txn: lmdb.Transaction[bytes], keys: Sequence[bytes]) -> bool:
        """Delete those of the rows at ``keys`` still there; whether any was (never
        raises :class:`Unchanged`: a write riding another commit must not abort it)."""
        db = self._db
        return any([txn.delete(key, db=db) for key in keys])


def seq_keys(seqs: Sequence[int]) -> list[bytes]:
    """The keys of inbox sequence numbers ``seqs``.

    Raises:
        LocalProtocolError: one is not an integer in 0..2**64-1.
    """
    keys = []
    for seq in seqs:
        if type(seq) is not int or not 0 <= seq < 2**64:
            raise LocalProtocolError("inbox sequence must be an integer in 0..2**64-1")
        keys.append(U64.pack(seq))
    return keys
