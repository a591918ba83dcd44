"""The outbox: messages waiting for their recipient's signed ACK.

Owns the ``outbox`` database and its index, which holds the counter::

    outbox        u64be(seq)                   -> {v, peer, id, ct, cap, enq, n, last[, exp]}
    outbox_index  b"m" message id              -> u64be(seq)
                  b"n"                         -> u64be(next seq)  (layout 2)
                  b"p" u8(len) peer u64be(seq) -> b""   (per-peer order)

A queued message writes its index rows anyway, so the counter beside them
costs the commit no page of its own (layout 1 kept it in ``agent`` as
``outbox_next``, now read as its floor).

``ct`` is the plaintext payload sealed with associated data ``("outbox",
peer, message id)``: after a session reset every queued message is encrypted
again under the new session. ``n`` and ``last`` count delivery attempts (for
backoff). ``exp`` (Unix ms) is written only for a message queued with
``expires_in``, so rows without one read as before. The queue limit counts
the whole outbox and is checked again inside the write transaction, so two
writers cannot both pass it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from talos.core.encoding import canonical_dumps
from talos.errors import LocalProtocolError, QueueFull, StoreCorrupted
from talos.storage.state.commit import AuditRecords
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
    text,
)
from talos.storage.state.sealing import Sealer

if TYPE_CHECKING:
    import lmdb

_FIELDS: Final = frozenset({"v", "peer", "id", "ct", "cap", "enq", "n", "last"})
#: The counter's key in ``outbox_index`` (between the ``m`` and ``p`` rows).
NEXT_KEY: Final = b"n"
#: The fields of a row queued with an expiry.
_EXPIRING_FIELDS: Final = _FIELDS | {"exp"}


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A message waiting for its recipient's signed ACK (payload decrypted)."""

    seq: int
    peer: str
    message_id: bytes
    payload: bytes
    capability: bytes | None
    enqueued_ms: int
    attempts: int = 0
    last_attempt_ms: int | None = None
    #: When it expires (Unix ms), if queued with an expiry.
    expires_ms: int | None = None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """What the outbox says about one queued message without decrypting it."""

    seq: int
    peer: str
    message_id: bytes
    enqueued_ms: int
    attempts: int
    last_attempt_ms: int | None
    expires_ms: int | None
    #: Size of the sealed payload (the payload plus a fixed overhead).
    sealed_size: int


@dataclass(frozen=True, slots=True)
class Enqueue:
    """One message to queue with :meth:`AgentState.enqueue_many`."""

    peer: str
    message_id: bytes
    payload: bytes
    capability: bytes | None
    audit: AuditRecords = ()
    #: When it expires (Unix ms), or None: never.
    expires_ms: int | None = None


Outcome = OutboxItem | QueueFull | LocalProtocolError


class Accepted(NamedTuple):
    """A request that passed admission: where its result goes, and its sealed payload."""

    position: int
    request: Enqueue
    sealed: bytes


@dataclass(slots=True)
class Admission:
    """The requests of one :meth:`Outbox.admit`: a result slot for each, in order (an
    error, or None until :meth:`Outbox.write` puts the item there), and the accepted."""

    results: list[Outcome | None] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)

    def outcomes(self) -> list[Outcome]:
        """The result of every request (after the commit)."""
        return [result for result in self.results if result is not None]


def id_key(mid: bytes) -> bytes:
    """The index key of message id ``mid``.

    Raises:
        LocalProtocolError: not a valid message id.
    """
    return b"m" + message_id(mid)


def peer_prefix(peer: str) -> bytes:
    """The prefix of ``peer``'s per-peer index keys.

    Raises:
        LocalProtocolError: not a valid peer id.
    """
    raw = peer_key(peer)
    return b"p" + bytes((len(raw),)) + raw


class Outbox:
    """The ``outbox`` and ``outbox_index`` databases (with the counter, ``outbox_index[b"n"]``)."""

    def __init__(
        self, db: lmdb._Database, index: lmdb._Database, meta: Meta, sealer: Sealer
    ) -> None:
        self._db = db
        self._index = index
        self._meta = meta
        self._sealer = sealer

    # -- queueing --------------------------------------------------------------------

    def admit(
        self, txn: lmdb.Transaction[bytes], requests: Sequence[Enqueue], queue_limit: int
    ) -> Admission:
        """Check each request against ``txn`` (a snapshot) and seal the payloads of
        those accepted: a bad one, one past ``queue_limit`` or one already queued
        gets its error instead."""
        admission = Admission()
        queued = self.count(txn)
        ids: set[bytes] = set()
        for request in requests:
            try:
                sealed = self._check(request)
                if queued >= queue_limit:
                    raise QueueFull(
                        f"the outbox holds {queued} messages (queue_limit {queue_limit})"
                    )
                mid = request.message_id
                if mid in ids or txn.get(b"m" + mid, db=self._index) is not None:
                    raise LocalProtocolError("a message with this id is queued already")
            except (QueueFull, LocalProtocolError) as exc:
                admission.results.append(exc)
                continue
            ids.add(request.message_id)
            queued += 1
            admission.accepted.append(Accepted(len(admission.results), request, sealed))
            admission.results.append(None)  # the item, once committed
        return admission

    def _check(self, request: Enqueue) -> bytes:
        """Validate one request; its payload sealed for the outbox.

        Raises:
            LocalProtocolError: a bad argument.
        """
        peer_prefix(request.peer)
        message_id(request.message_id)
        payload = as_bytes("payload", request.payload)
        if len(payload) > MAX_PAYLOAD_SIZE:
            raise LocalProtocolError(f"payload larger than {MAX_PAYLOAD_SIZE} bytes")
        if request.capability is not None:
            as_bytes("capability", request.capability)
        if request.expires_ms is not None and (
            type(request.expires_ms) is not int or request.expires_ms < 0
        ):
            raise LocalProtocolError("expires_ms must be a non-negative int")
        return self._sealer.seal(payload, ("outbox", request.peer, request.message_id))

    def write(
        self,
        txn: lmdb.Transaction[bytes],
        admission: Admission,
        *,
        queue_limit: int,
        now: int,
        attempted: Collection[str],
        attempt_ms: int | None,
    ) -> None:
        """Queue the accepted requests at ``now`` and put their items in the results;
        those for a peer in ``attempted`` with one attempt counted at ``attempt_ms``.

        Raises:
            QueueFull: another writer filled the outbox since :meth:`admit`.
        """
        outbox, index, meta = self._db, self._index, self._meta
        if int(txn.stat(outbox)["entries"]) + len(admission.accepted) > queue_limit:
            raise QueueFull("the outbox filled up meanwhile (another writer)")
        results = admission.results
        for position, request, sealed in admission.accepted:
            seq = meta.next_seq(txn, index, NEXT_KEY, b"outbox_next")
            tried = request.peer in attempted
            item = OutboxItem(
                seq,
                request.peer,
                request.message_id,
                request.payload,
                request.capability,
                now,
                1 if tried else 0,
                attempt_ms if tried else None,
                request.expires_ms,
            )
            txn.put(U64.pack(seq), _row(item, sealed), db=outbox)
            txn.put(b"m" + request.message_id, U64.pack(seq), db=index)
            txn.put(peer_prefix(request.peer) + U64.pack(seq), b"", db=index)
            results[position] = item

    # -- attempts and removal --------------------------------------------------------

    def attempt(self, txn: lmdb.Transaction[bytes], key: bytes, at_ms: int) -> OutboxItem | None:
        """Count an attempt at ``at_ms`` for the message at index key ``key``; the
        updated item, or None if it is not queued."""
        bumped = self._bump(txn, key, at_ms)
        if bumped is None:
            return None
        seq_key, raw, attempts = bumped
        return replace(self.decode(seq_key, raw), attempts=attempts, last_attempt_ms=at_ms)

    def attempt_many(
        self, txn: lmdb.Transaction[bytes], keys: Iterable[bytes], at_ms: int
    ) -> list[bytes]:
        """Count an attempt at ``at_ms`` for each message at index keys ``keys``; the
        ids of those still queued, in order."""
        return [key[1:] for key in keys if self._bump(txn, key, at_ms) is not None]

    def _bump(
        self, txn: lmdb.Transaction[bytes], key: bytes, at_ms: int
    ) -> tuple[bytes, bytes, int] | None:
        """Rewrite a row with one more attempt: its key, its old value, its new count."""
        outbox = self._db
        seq_key = txn.get(key, db=self._index)
        raw = None if seq_key is None else txn.get(seq_key, db=outbox)
        if seq_key is None or raw is None:
            return None
        row = self.fields(seq_key, raw)
        row["n"] += 1
        row["last"] = at_ms
        txn.put(seq_key, canonical_dumps(row), db=outbox)
        return seq_key, raw, row["n"]

    def present(self, txn: lmdb.Transaction[bytes], keys: Sequence[bytes]) -> list[bool]:
        """Whether each index key of ``keys`` is queued."""
        index = self._index
        return [txn.get(key, db=index) is not None for key in keys]

    def remove(self, txn: lmdb.Transaction[bytes], keys: Iterable[bytes]) -> None:
        """Delete the queued messages at index keys ``keys`` (all present).

        Raises:
            StoreCorrupted: one vanished, or its index points to no row.
        """
        index, outbox = self._index, self._db
        for key in keys:
            seq_key = txn.get(key, db=index)
            if seq_key is None:
                raise corrupt("outbox_index", key[1:].hex(), "vanished meanwhile")
            raw = txn.get(seq_key, db=outbox)
            if raw is None:
                raise corrupt("outbox_index", key[1:].hex(), "points to no outbox row")
            peer = self.fields(seq_key, raw)["peer"]
            txn.delete(seq_key, db=outbox)
            txn.delete(key, db=index)
            txn.delete(peer_prefix(peer) + seq_key, db=index)

    # -- reading ---------------------------------------------------------------------

    def fields(self, key: bytes, raw: bytes) -> dict[str, Any]:
        """The checked fields of the row at ``key`` (payload still sealed).

        Raises:
            StoreCorrupted: the row is damaged.
        """
        where = seq_name(key)
        try:
            row = decode_row("outbox", where, raw, _FIELDS)
        except StoreCorrupted:
            row = decode_row("outbox", where, raw, _EXPIRING_FIELDS)
            if type(row["exp"]) is not int:
                raise corrupt("outbox", where, "fields of the wrong type") from None
        cap, last = row["cap"], row["last"]
        if not (
            len(key) == 8
            and type(row["peer"]) is str
            and type(row["id"]) is bytes
            and type(row["ct"]) is bytes
            and type(row["enq"]) is int
            and type(row["n"]) is int
            and (cap is None or type(cap) is bytes)
            and (last is None or type(last) is int)
        ):
            raise corrupt("outbox", where, "fields of the wrong type")
        return row

    def decode(self, key: bytes, raw: bytes) -> OutboxItem:
        """The item stored at ``key``, payload decrypted.

        Raises:
            StoreCorrupted: the row is damaged.
        """
        row = self.fields(key, raw)
        seq, peer, mid = U64.unpack(key)[0], row["peer"], row["id"]
        payload = self._sealer.unseal("outbox", str(seq), row["ct"], ("outbox", peer, mid))
        return OutboxItem(
            seq, peer, mid, payload, row["cap"], row["enq"], row["n"], row["last"], row.get("exp")
        )

    def summaries(self, txn: lmdb.Transaction[bytes]) -> list[QueuedMessage]:
        """Every queued message in enqueue order, without decrypting any payload.

        Raises:
            StoreCorrupted: a row is damaged.
        """
        listed = []
        for key, raw in txn.cursor(db=self._db).iternext():
            row = self.fields(key, raw)
            listed.append(
                QueuedMessage(
                    U64.unpack(key)[0],
                    row["peer"],
                    row["id"],
                    row["enq"],
                    row["n"],
                    row["last"],
                    row.get("exp"),
                    len(row["ct"]),
                )
            )
        return listed

    def read(
        self,
        txn: lmdb.Transaction[bytes],
        peer: str | None,
        *,
        after: int | None = None,
        limit: int | None = None,
    ) -> list[OutboxItem]:
        """Queued items in enqueue order: every one, or ``peer``'s after seq ``after``.

        Raises:
            LocalProtocolError: ``peer`` is not a valid peer id.
            StoreCorrupted: a row is damaged, or the index points to no row.
        """
        db = self._db
        if peer is None:
            return [self.decode(key, value) for key, value in txn.cursor(db=db).iternext()]
        prefix = peer_prefix(peer)
        rows: list[tuple[bytes, bytes]] = []
        cursor = txn.cursor(db=self._index)
        start = prefix if after is None else prefix + U64.pack(after + 1)
        if cursor.set_range(start):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix) or (limit is not None and len(rows) >= limit):
                    break
                seq_key = key[len(prefix) :]
                value = txn.get(seq_key, db=db)
                if len(seq_key) != 8 or value is None:
                    raise corrupt("outbox_index", key.hex(), "points to no outbox row")
                rows.append((seq_key, value))
        return [self.decode(key, value) for key, value in rows]

    def item(self, txn: lmdb.Transaction[bytes], mid: bytes) -> OutboxItem | None:
        """The queued message ``mid``, or None.

        Raises:
            LocalProtocolError: a bad message id.
            StoreCorrupted: the row is damaged, or the index points to no row.
        """
        seq_key = txn.get(id_key(mid), db=self._index)
        if seq_key is None:
            return None
        raw = txn.get(seq_key, db=self._db)
        if raw is None:
            raise corrupt("outbox_index", mid.hex(), "points to no outbox row")
        return self.decode(seq_key, raw)

    def queued_for(
        self, txn: lmdb.Transaction[bytes], peer: str, message_ids: Iterable[bytes]
    ) -> set[bytes]:
        """Those of ``message_ids`` queued for ``peer`` (index lookups only).

        Raises:
            LocalProtocolError: a bad message id or peer id.
        """
        prefix = peer_prefix(peer)
        keys = [(mid, id_key(mid)) for mid in message_ids]
        index = self._index
        found: set[bytes] = set()
        for mid, key in keys:
            seq_key = txn.get(key, db=index)
            if seq_key is not None and txn.get(prefix + seq_key, db=index) is not None:
                found.add(mid)
        return found

    def peers(self, txn: lmdb.Transaction[bytes]) -> list[str]:
        """Peers with at least one queued message, sorted by id bytes.

        Raises:
            StoreCorrupted: a per-peer index key is malformed.
        """
        peers: list[str] = []
        cursor = txn.cursor(db=self._index)
        if cursor.set_range(b"p"):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(b"p"):
                    break
                if len(key) < 2 + 8 or len(key) != 2 + key[1] + 8:
                    raise corrupt("outbox_index", key.hex(), "malformed peer key")
                peer = text("outbox_index", key[2 : 2 + key[1]])
                if not peers or peers[-1] != peer:
                    peers.append(peer)
        return peers

    def count(self, txn: lmdb.Transaction[bytes]) -> int:
        """How many messages are queued, for all peers."""
        return int(txn.stat(self._db)["entries"])


def _row(item: OutboxItem, sealed: bytes) -> bytes:
    row: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "peer": item.peer,
        "id": item.message_id,
        "ct": sealed,
        "cap": item.capability,
        "enq": item.enqueued_ms,
        "n": item.attempts,
        "last": item.last_attempt_ms,
    }
    if item.expires_ms is not None:
        row["exp"] = item.expires_ms
    return canonical_dumps(row)
