"""The durable state of one agent, kept in its audit log's LMDB environment (ARCHITECTURE §5).

Sessions, prekeys, the replay set, the outbox, the inbox and the peer cache
live in named databases of the same LMDB environment as the audit log, so a
state change and the audit entry that records it commit in **one** durable
transaction (:meth:`talos.audit.AuditLog.append_with`). Pass
:attr:`AgentState.DATABASES` as ``extra_databases`` to ``AuditLog.open``.

Layout (each database is ``x:<name>`` in the environment)::

    sessions      peer                      -> sealed Session.to_bytes()
    replay        b"i" id                   -> u64be(timestamp ms)
                  b"t" u64be(timestamp) id  -> b""        (time index, for pruning)
    outbox        u64be(seq)                -> outbox row (CBOR; payload sealed)
    outbox_index  b"m" message id           -> u64be(seq)
                  b"p" u8(len) peer u64be(seq) -> b""     (per-peer order)
    inbox         u64be(seq)                -> inbox row (CBOR; data sealed)
    peers         b"r" agent id             -> peer record bytes
                  b"k" agent id             -> key event log bytes
    agent         b"format", b"key_check", b"prekeys" (sealed),
                  b"inbox_next", b"outbox_next", b"replay_floor"

Rules this module keeps:

* One transaction per operation: every mutating method runs its writes
  inside ``append_with`` together with the caller's audit records. Either
  all of them are on disk when the method returns, or none is (an invalid
  audit record is refused before the transaction; :class:`QueueFull`, a
  duplicate, :class:`~talos.errors.AuditFull` abort it).
* Nothing secret is on disk in the clear. Sessions, prekeys, outbox
  payloads and inbox data are *sealed*: AES-256-GCM under a key derived from
  ``storage_key`` and a random 24-byte nonce (HMAC-SHA256 of the first 12
  bytes gives the AES key, the last 12 are the GCM nonce; an extended
  nonce, so random nonces never repeat in practice), with the database and
  the row's identity (peer, message id) as associated data, so a sealed
  value cannot be moved to another row. The first write stores a sealed
  key-check value; opening with another key is refused up front
  (:class:`~talos.errors.ConfigurationError`), so a later tag failure means
  a damaged row (:class:`~talos.errors.StoreCorrupted`).
* The replay set is stored one row per id, plus a time index; the
  in-memory :class:`~talos.core.replay.ReplayWindow` is rebuilt from it on
  open and updated only after a commit succeeded. The window's floor is
  stored too, so stepping the clock back across a restart does not make
  forgotten ids new again.
* Every stored value is decoded strictly; a damaged one raises
  :class:`~talos.errors.StoreCorrupted` naming the database and key. No
  ``lmdb`` exception escapes (the audit log's transactions translate them).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from talos.core.clock import Clock, time_ms
from talos.core.crypto import aead_decrypt, aead_encrypt, hkdf_sha256, hmac_sha256
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.peer_record import PeerRecord
from talos.core.replay import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_SKEW_MS,
    DEFAULT_WINDOW_MS,
    MAX_ID_SIZE,
    REPLAY_FORMAT_VERSION,
    ReplayWindow,
)
from talos.core.rng import Rng
from talos.errors import (
    ConfigurationError,
    DecryptionFailed,
    DuplicateMessage,
    LocalProtocolError,
    MalformedFrame,
    QueueFull,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.system import SYSTEM_RNG

if TYPE_CHECKING:
    import lmdb

    from talos.audit.log import AuditLog

__all__ = [
    "FORMAT_VERSION",
    "MAX_PAYLOAD_SIZE",
    "AgentState",
    "AuditRecords",
    "InboxMessage",
    "OutboxItem",
    "derive_storage_key",
]

#: Version of this layout (``agent["format"]``) and of every structured row.
FORMAT_VERSION: Final = 1
#: Largest outbox payload or inbox message accepted.
MAX_PAYLOAD_SIZE: Final = 16 << 20
#: Most replay rows deleted per receive; the rest go in later commits (reads skip them).
PRUNE_BATCH: Final = 1024

#: Audit records to commit with a change: ``(kind, data, peer)``, e.g. AuditRecord.
AuditRecords = Iterable[tuple[str, Mapping[str, Any], str | None]]

_U64 = struct.Struct(">Q")
_MAX_ROW = MAX_PAYLOAD_SIZE + (64 << 10)
_MAX_PEER_BYTES = 255
_SEAL_VERSION = 1
_SEAL_LABEL = b"talos/agent-state/seal/v1\x00"
_SEAL_NONCE = 24
_SEAL_OVERHEAD = 1 + _SEAL_NONCE + 16
_KEY_CHECK = b"talos agent state key check"
_OUTBOX_FIELDS = frozenset({"v", "peer", "id", "ct", "cap", "enq", "n", "last"})
_INBOX_FIELDS = frozenset({"v", "from", "id", "ct", "sent", "recv", "cap"})


def derive_storage_key(secret: bytes) -> bytes:
    """A 32-byte storage key from an agent secret (e.g. its identity seed), by HKDF-SHA256.

    Raises:
        ConfigurationError: ``secret`` is shorter than 32 bytes.
    """
    if type(secret) is not bytes or len(secret) < 32:
        raise ConfigurationError("the secret for a storage key must be at least 32 bytes")
    return hkdf_sha256(secret, salt=None, info=b"talos/agent-state/storage-key/v1", length=32)


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """A received, verified, decrypted message waiting for the application."""

    sender: str
    message_id: bytes
    data: bytes
    sent_at_ms: int
    received_at_ms: int
    capability_id: bytes | None = None


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


@dataclass(frozen=True, slots=True)
class Enqueue:
    """One message to queue with :meth:`AgentState.enqueue_many`."""

    peer: str
    message_id: bytes
    payload: bytes
    capability: bytes | None
    audit: AuditRecords = ()


@dataclass(frozen=True, slots=True)
class Received:
    """One received message to commit with :meth:`AgentState.commit_receive_many`."""

    peer: str
    session: bytes
    replay_id: bytes
    timestamp_ms: int
    message: InboxMessage
    prekeys: bytes | None = None
    audit: AuditRecords = ()


class _Unchanged(Exception):
    """Raised inside a commit that would change nothing: aborts it, audit entries included."""


class AgentState:
    """Sessions, prekeys, replay set, outbox, inbox and peer cache of one agent.

    Thread-safe: mutations are serialized by a lock (and by LMDB's single
    writer); reads use their own snapshot.
    """

    #: Names to pass as ``extra_databases`` to :meth:`talos.audit.AuditLog.open`.
    DATABASES: Final = ("sessions", "replay", "outbox", "outbox_index", "inbox", "peers", "agent")

    def __init__(
        self,
        log: AuditLog,
        *,
        storage_key: bytes,
        clock: Clock,
        rng: Rng = SYSTEM_RNG,
        replay_window_ms: int = DEFAULT_WINDOW_MS,
        clock_skew_ms: int = DEFAULT_MAX_SKEW_MS,
        replay_max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        """Attach to ``log`` (opened with ``extra_databases=AgentState.DATABASES``).

        Raises:
            ConfigurationError: the log lacks the databases, ``storage_key`` is
                not 32 bytes, it is not the key this state was written with,
                or a replay setting is invalid.
            UnsupportedVersion: the state was written by a newer Talos.
            StoreCorrupted: a replay row or the format row is damaged.
            StorageError: LMDB failed.
        """
        if type(storage_key) is not bytes or len(storage_key) != 32:
            raise ConfigurationError("storage_key must be 32 bytes")
        try:
            self._db = {name: log.database(name) for name in self.DATABASES}
        except LocalProtocolError:
            raise ConfigurationError(
                "open the audit log with extra_databases=AgentState.DATABASES"
            ) from None
        self._log = log
        self._key = storage_key
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._initialized = False
        self._replay = ReplayWindow(
            window_ms=replay_window_ms, max_skew_ms=clock_skew_ms, max_entries=replay_max_entries
        )
        with log.snapshot() as txn:
            self._check_header(txn)
            self._replay = self._load_replay(txn)

    # -- opening ---------------------------------------------------------------------

    def _check_header(self, txn: lmdb.Transaction[bytes]) -> None:
        meta = self._db["agent"]
        raw_format = txn.get(b"format", db=meta)
        if raw_format is None:
            return
        if len(raw_format) != 8:
            raise _corrupt("agent", "format", "not a u64")
        if _U64.unpack(raw_format)[0] != FORMAT_VERSION:
            raise UnsupportedVersion(
                f"agent state format {_U64.unpack(raw_format)[0]} is not supported"
            )
        check = txn.get(b"key_check", db=meta)
        try:
            opened = None if check is None else self._open(check, ("key-check",))
        except (DecryptionFailed, MalformedFrame):
            opened = None
        if opened != _KEY_CHECK:
            raise ConfigurationError(
                "storage_key does not open this agent state (the home of another "
                "identity, or a damaged key-check row)"
            )
        self._initialized = True

    def _load_replay(self, txn: lmdb.Transaction[bytes]) -> ReplayWindow:
        window = self._replay
        floor = self._counter(txn, b"replay_floor")
        ids: list[list[Any]] = []
        cursor = txn.cursor(db=self._db["replay"])
        if cursor.set_range(b"t"):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(b"t"):
                    break
                if not 10 <= len(key) <= 9 + MAX_ID_SIZE:
                    raise _corrupt("replay", key.hex(), "malformed time-index key")
                timestamp = _U64.unpack_from(key, 1)[0]
                if timestamp >= floor:
                    ids.append([key[9:], timestamp])
        state = canonical_dumps({"v": REPLAY_FORMAT_VERSION, "floor": floor, "ids": ids})
        try:
            loaded = ReplayWindow.from_bytes(
                state,
                window_ms=window.window_ms,
                max_skew_ms=window.max_skew_ms,
                max_entries=window.max_entries,
                max_size=len(state),
            )
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise _corrupt("replay", "time index", str(exc)) from None
        loaded.prune(time_ms(self._clock))
        return loaded

    # -- sealing ---------------------------------------------------------------------

    def _seal(self, plaintext: bytes, ad: tuple[Any, ...]) -> bytes:
        nonce = self._rng.bytes(_SEAL_NONCE)
        key = hmac_sha256(self._key, _SEAL_LABEL + nonce[:12])
        sealed = aead_encrypt(key, nonce[12:], plaintext, _associated(ad))
        return bytes((_SEAL_VERSION,)) + nonce + sealed

    def _open(self, sealed: bytes, ad: tuple[Any, ...]) -> bytes:
        """Raises: DecryptionFailed (wrong key or damaged), MalformedFrame (shape)."""
        if len(sealed) < _SEAL_OVERHEAD or sealed[0] != _SEAL_VERSION:
            raise MalformedFrame("sealed value is too short or of an unknown version")
        nonce = sealed[1 : 1 + _SEAL_NONCE]
        key = hmac_sha256(self._key, _SEAL_LABEL + nonce[:12])
        return aead_decrypt(key, nonce[12:], sealed[1 + _SEAL_NONCE :], _associated(ad))

    def _unseal(self, db: str, key: str, sealed: bytes, ad: tuple[Any, ...]) -> bytes:
        try:
            return self._open(sealed, ad)
        except (DecryptionFailed, MalformedFrame):
            raise _corrupt(db, key, "sealed value fails authentication") from None

    # -- committing ------------------------------------------------------------------

    def _commit(
        self, audit: AuditRecords, apply: Callable[[lmdb.Transaction[bytes]], None]
    ) -> bool:
        """Run ``apply`` and append ``audit`` in one transaction; False if ``apply`` said
        nothing changes (then nothing, not even the audit entries, was written).

        Raises:
            LocalProtocolError: an invalid audit record (before the transaction).
            AuditFull: no room; nothing was written.
            StorageError: LMDB failed; nothing was written.
        """
        records = list(audit)

        def run(txn: lmdb.Transaction[bytes]) -> None:
            apply(txn)
            if not self._initialized:
                meta = self._db["agent"]
                txn.put(b"format", _U64.pack(FORMAT_VERSION), db=meta)
                txn.put(b"key_check", self._seal(_KEY_CHECK, ("key-check",)), db=meta)

        try:
            self._log.append_with(records, run)
        except _Unchanged:
            return False
        self._initialized = True
        return True

    def _putter(
        self, db: str, key: bytes, value: bytes
    ) -> Callable[[lmdb.Transaction[bytes]], None]:
        handle = self._db[db]

        def put(txn: lmdb.Transaction[bytes]) -> None:
            txn.put(key, value, db=handle)

        return put

    def _counter(self, txn: lmdb.Transaction[bytes], name: bytes) -> int:
        raw = txn.get(name, db=self._db["agent"])
        if raw is None:
            return 0
        if len(raw) != 8:
            raise _corrupt("agent", name.decode(), "not a u64")
        return int(_U64.unpack(raw)[0])

    def _next_seq(self, txn: lmdb.Transaction[bytes], name: bytes) -> int:
        seq = self._counter(txn, name)
        txn.put(name, _U64.pack(seq + 1), db=self._db["agent"])
        return seq

    # -- sessions --------------------------------------------------------------------

    def session(self, peer: str) -> bytes | None:
        """The stored session with ``peer`` (``Session.to_bytes``), or None.

        Raises:
            LocalProtocolError: ``peer`` is not a valid peer id.
            StoreCorrupted: the stored session is damaged.
        """
        key = _peer_key(peer)
        with self._log.snapshot() as txn:
            sealed = txn.get(key, db=self._db["sessions"])
        return None if sealed is None else self._unseal("sessions", peer, sealed, ("session", peer))

    def session_peers(self) -> list[str]:
        """The peers this agent holds a session with, sorted."""
        with self._log.snapshot() as txn:
            cursor = txn.cursor(db=self._db["sessions"])
            keys = list(cursor.iternext(keys=True, values=False))
        return [_text("sessions", key) for key in keys]

    def put_session(self, peer: str, session: bytes, *, audit: AuditRecords = ()) -> None:
        """Store the session with ``peer`` (establish, or after encrypting a send).

        Raises:
            LocalProtocolError: bad peer or audit record.
            AuditFull, StorageError: nothing was written.
        """
        key = _peer_key(peer)
        sealed = self._seal(_bytes("session", session), ("session", peer))
        with self._lock:
            self._commit(audit, self._putter("sessions", key, sealed))

    def drop_session(self, peer: str, *, audit: AuditRecords = ()) -> bool:
        """Forget the session with ``peer`` (reset); False, and nothing written, if none.

        Raises:
            LocalProtocolError: bad peer or audit record.
            AuditFull, StorageError: nothing was written.
        """
        key = _peer_key(peer)

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            if not txn.delete(key, db=self._db["sessions"]):
                raise _Unchanged

        with self._lock:
            return self._commit(audit, apply)

    # -- prekeys ---------------------------------------------------------------------

    def prekeys(self) -> bytes | None:
        """The stored prekey store (``PrekeyStore.to_bytes``), or None.

        Raises:
            StoreCorrupted: the stored value is damaged.
        """
        with self._log.snapshot() as txn:
            sealed = txn.get(b"prekeys", db=self._db["agent"])
        return None if sealed is None else self._unseal("agent", "prekeys", sealed, ("prekeys",))

    def put_prekeys(self, data: bytes, *, audit: AuditRecords = ()) -> None:
        """Replace the prekey store.

        Raises:
            LocalProtocolError: bad data or audit record.
            AuditFull, StorageError: nothing was written.
        """
        sealed = self._seal(_bytes("prekeys", data), ("prekeys",))
        with self._lock:
            self._commit(audit, self._putter("agent", b"prekeys", sealed))

    # -- receiving -------------------------------------------------------------------

    @property
    def replay_window(self) -> ReplayWindow:
        """The replay set as committed (check with ``.check``; do not record into it)."""
        return self._replay

    def commit_receive(
        self,
        peer: str,
        *,
        session: bytes,
        replay_id: bytes,
        timestamp_ms: int,
        message: InboxMessage,
        prekeys: bytes | None = None,
        audit: AuditRecords = (),
    ) -> int:
        """Commit a received message: session, replay entry, inbox row (and prekeys) at once.

        ``replay_id`` is the scoped id the receiver checks (e.g. a digest of
        sender and message id); ``prekeys`` is the prekey store after an X3DH
        initial message consumed a one-time prekey. Returns the inbox sequence
        number. The replay window is updated only once the commit is durable.

        Raises:
            DuplicateMessage: ``replay_id`` is already in the replay set; nothing written.
            StaleMessage: outside the replay window or the clock-skew tolerance.
            LocalProtocolError: bad arguments or audit record.
            AuditFull, StorageError: nothing was written.
        """
        received = Received(peer, session, replay_id, timestamp_ms, message, prekeys, audit)
        return self.commit_receive_many([received])[0]

    def commit_receive_many(self, batch: Sequence[Received], *, taken: int = 0) -> list[int]:
        """Commit several received messages in one transaction (group commit).

        Each is committed as by :meth:`commit_receive`, in order; a peer's
        session ends as the last one given for it. All or nothing: if any
        message is a duplicate (also of an earlier one in ``batch``) or
        stale, nothing is written. Returns the inbox sequence numbers.

        The first ``taken`` messages are committed as received *and* taken,
        as if :meth:`take` had removed them in the same transaction: they get
        no inbox row, and the caller hands them to a waiting application
        (at most once; use only when the inbox holds nothing older).

        Raises:
            The same as :meth:`commit_receive`.
        """
        if type(taken) is not int or not 0 <= taken <= len(batch):
            raise LocalProtocolError("taken must count messages of the batch")
        with self._lock:
            now = time_ms(self._clock)
            seen: set[bytes] = set()
            for item in batch:
                # As of its arrival (the caller checked then; a batch waits a moment).
                at = min(now, item.message.received_at_ms)
                self._replay.check(item.replay_id, item.timestamp_ms, at)
                if item.replay_id in seen:
                    raise DuplicateMessage("message id was already received")
                seen.add(item.replay_id)
            floor = max(self._replay.floor_ms, now - self._replay.window_ms)
            last = {item.peer: item for item in batch}  # a peer's session ends as its last
            sessions = {
                _peer_key(peer): self._seal(_bytes("session", item.session), ("session", peer))
                for peer, item in last.items()
            }
            sealed_prekeys = None
            for item in batch:
                if item.prekeys is not None:
                    sealed_prekeys = self._seal(_bytes("prekeys", item.prekeys), ("prekeys",))
            rows = [self._inbox_row(item.message) for item in batch[taken:]]
            seqs: list[int] = []

            def apply(txn: lmdb.Transaction[bytes]) -> None:
                seqs.clear()
                for item in batch:
                    self._put_replay(txn, item.replay_id, item.timestamp_ms, floor)
                for key, sealed in sessions.items():
                    txn.put(key, sealed, db=self._db["sessions"])
                if sealed_prekeys is not None:
                    txn.put(b"prekeys", sealed_prekeys, db=self._db["agent"])
                seqs.extend(self._append_inbox(txn, rows))

            self._commit([record for item in batch for record in item.audit], apply)
            for item in batch:
                self._replay.record(
                    item.replay_id, item.timestamp_ms, min(now, item.message.received_at_ms)
                )
            return seqs

    def commit_duplicate(self, *, audit: AuditRecords) -> None:
        """Audit a dropped duplicate (REPLAY_DROPPED): audit entries only, no state change.

        Raises:
            LocalProtocolError: bad audit record.
            AuditFull, StorageError: nothing was written.
        """
        with self._lock:
            self._commit(audit, lambda txn: None)

    def _put_replay(
        self, txn: lmdb.Transaction[bytes], replay_id: bytes, timestamp_ms: int, floor: int
    ) -> None:
        db = self._db["replay"]
        id_key = b"i" + replay_id
        old = txn.get(id_key, db=db)
        if old is not None:
            if len(old) != 8:
                raise _corrupt("replay", id_key.hex(), "not a u64")
            if _U64.unpack(old)[0] >= floor:
                raise DuplicateMessage("message id was already received")
            txn.delete(b"t" + old + replay_id, db=db)
        stamp = _U64.pack(timestamp_ms)
        txn.put(id_key, stamp, db=db)
        txn.put(b"t" + stamp + replay_id, b"", db=db)
        self._prune_replay(txn, floor)
        txn.put(b"replay_floor", _U64.pack(floor), db=self._db["agent"])

    def _prune_replay(self, txn: lmdb.Transaction[bytes], floor: int) -> None:
        """Delete up to PRUNE_BATCH rows older than ``floor`` (reads skip any left)."""
        db = self._db["replay"]
        cursor = txn.cursor(db=db)
        stale: list[bytes] = []
        if cursor.set_range(b"t"):
            for key in cursor.iternext(keys=True, values=False):
                if len(stale) >= PRUNE_BATCH or not key.startswith(b"t") or len(key) < 10:
                    break
                if _U64.unpack_from(key, 1)[0] >= floor:
                    break
                stale.append(key)
        for key in stale:
            txn.delete(key, db=db)
            id_key = b"i" + key[9:]
            if txn.get(id_key, db=db) == key[1:9]:
                txn.delete(id_key, db=db)

    # -- inbox -----------------------------------------------------------------------

    def _inbox_row(self, message: InboxMessage) -> bytes:
        sender = message.sender
        _peer_key(sender)
        _message_id(message.message_id)
        data = _bytes("message data", message.data)
        if len(data) > MAX_PAYLOAD_SIZE:
            raise LocalProtocolError(f"message larger than {MAX_PAYLOAD_SIZE} bytes")
        cap = message.capability_id
        if type(message.sent_at_ms) is not int or type(message.received_at_ms) is not int:
            raise LocalProtocolError("inbox message times must be integers (ms)")
        if cap is not None and type(cap) is not bytes:
            raise LocalProtocolError("inbox message capability id must be bytes or None")
        sealed = self._seal(data, ("inbox", sender, message.message_id))
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

    def _decode_inbox(self, key: bytes, raw: bytes) -> InboxMessage:
        where = str(_U64.unpack(key)[0]) if len(key) == 8 else key.hex()
        row = _decode_row("inbox", where, raw, _INBOX_FIELDS)
        sender, mid, cap = row["from"], row["id"], row["cap"]
        if not (
            type(sender) is str
            and type(mid) is bytes
            and type(row["ct"]) is bytes
            and type(row["sent"]) is int
            and type(row["recv"]) is int
            and (cap is None or type(cap) is bytes)
        ):
            raise _corrupt("inbox", where, "fields of the wrong type")
        data = self._unseal("inbox", where, row["ct"], ("inbox", sender, mid))
        return InboxMessage(sender, mid, data, row["sent"], row["recv"], cap)

    def inbox(self, after: int = -1, limit: int = 1000) -> list[tuple[int, InboxMessage]]:
        """Up to ``limit`` messages with sequence above ``after``, in arrival order.

        They stay in the inbox until :meth:`acknowledge` (at-least-once) or
        :meth:`take` removes them.

        Raises:
            StoreCorrupted: a stored message is damaged.
        """
        rows: list[tuple[bytes, bytes]] = []
        with self._log.snapshot() as txn:
            cursor = txn.cursor(db=self._db["inbox"])
            if limit > 0 and cursor.set_range(_U64.pack(max(after + 1, 0))):
                for key, value in cursor.iternext():
                    rows.append((key, value))
                    if len(rows) >= limit:
                        break
        return [(_U64.unpack(k)[0], self._decode_inbox(k, v)) for k, v in rows]

    def inbox_count(self) -> int:
        """How many messages wait in the inbox."""
        with self._log.snapshot() as txn:
            return int(txn.stat(self._db["inbox"])["entries"])

    def return_to_inbox(self, messages: Sequence[InboxMessage]) -> list[int]:
        """Put messages taken from the inbox back (at its end), in one commit.

        For messages taken for an application that, as it turned out, was no
        longer there to get them (e.g. a cancelled ``receive()``). Returns
        their new sequence numbers.

        Raises:
            LocalProtocolError: a bad message.
            AuditFull, StorageError: nothing was written.
        """
        rows = [self._inbox_row(message) for message in messages]
        seqs: list[int] = []

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            seqs[:] = self._append_inbox(txn, rows)

        if rows:
            with self._lock:
                self._commit((), apply)
        return seqs

    def _append_inbox(self, txn: lmdb.Transaction[bytes], rows: Sequence[bytes]) -> list[int]:
        """Write sealed inbox rows at the end of the inbox; their sequence numbers."""
        seqs = []
        for row in rows:
            seq = self._next_seq(txn, b"inbox_next")
            txn.put(_U64.pack(seq), row, db=self._db["inbox"])
            seqs.append(seq)
        return seqs

    def take(self, limit: int = 1, *, audit: AuditRecords = ()) -> list[InboxMessage]:
        """Remove and return the oldest ``limit`` messages (persist-then-release).

        Their removal is durable before they are returned: a crash after
        this returns loses them for the application (at most once). For at
        least once, read with :meth:`inbox` and :meth:`acknowledge` after
        processing. With an empty inbox nothing (not even ``audit``) is written.

        Raises:
            StoreCorrupted: a stored message is damaged (nothing removed).
            LocalProtocolError: bad audit record.
            AuditFull, StorageError: nothing removed.
        """
        taken: list[InboxMessage] = []

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            db = self._db["inbox"]
            cursor = txn.cursor(db=db)
            rows: list[tuple[bytes, bytes]] = []
            if limit > 0 and cursor.first():
                for key, value in cursor.iternext():
                    rows.append((key, value))
                    if len(rows) >= limit:
                        break
            if not rows:
                raise _Unchanged
            taken[:] = [self._decode_inbox(key, value) for key, value in rows]
            for key, _ in rows:
                txn.delete(key, db=db)

        with self._lock:
            if not self._commit(audit, apply):
                return []
        return taken

    def acknowledge(self, *seqs: int, audit: AuditRecords = ()) -> bool:
        """Remove inbox messages ``seqs`` after processing them, in one commit.

        True if any was still there; False, and nothing written (not even
        ``audit``), if none was.

        Raises:
            LocalProtocolError: a bad sequence number or audit record.
            AuditFull, StorageError: nothing removed.
        """
        keys = [_U64.pack(_seq(seq)) for seq in seqs]

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            removed = [txn.delete(key, db=self._db["inbox"]) for key in keys]
            if not any(removed):
                raise _Unchanged

        with self._lock:
            return self._commit(audit, apply)

    # -- outbox ----------------------------------------------------------------------

    def enqueue(
        self,
        peer: str,
        message_id: bytes,
        payload: bytes,
        *,
        capability: bytes | None,
        queue_limit: int,
        audit: AuditRecords = (),
    ) -> OutboxItem:
        """Queue ``payload`` for ``peer`` (sealed at rest) until its ACK arrives.

        Raises:
            QueueFull: ``queue_limit`` messages are queued already; nothing written.
            LocalProtocolError: bad arguments, ``message_id`` already queued, or
                a bad audit record; nothing written.
            AuditFull, StorageError: nothing was written.
        """
        request = Enqueue(peer, message_id, payload, capability, audit)
        result = self.enqueue_many([request], queue_limit=queue_limit)[0]
        if isinstance(result, (QueueFull, LocalProtocolError)):
            raise result
        return result

    def enqueue_many(
        self,
        requests: Sequence[Enqueue],
        *,
        queue_limit: int,
        attempted: Mapping[str, bytes] | None = None,
        attempt_at: float | None = None,
    ) -> list[OutboxItem | QueueFull | LocalProtocolError]:
        """Queue several messages in one transaction (group commit of concurrent sends).

        Each request is checked on its own: one past ``queue_limit``, with bad
        arguments or with an id already queued gets its error in the result
        list (and nothing of it is written); the others are committed together.

        ``attempted`` maps peers whose messages the caller already encrypted
        to the session record after that encryption: their messages are
        queued with one attempt counted at ``attempt_at``, and the session is
        stored in the same transaction (the send fast path: queue, count the
        attempt and persist the ratchet with one commit, before transmitting).

        Raises:
            LocalProtocolError: ``queue_limit`` is not a positive integer, or a
                bad audit record (nothing written).
            AuditFull, StorageError: nothing was written.
        """
        if type(queue_limit) is not int or queue_limit < 1:
            raise LocalProtocolError("queue_limit must be a positive integer")
        now = time_ms(self._clock)
        attempted = attempted or {}
        if attempted and attempt_at is None:
            raise LocalProtocolError("attempted sessions need attempt_at")
        attempt_ms = None if attempt_at is None else int(attempt_at * 1000)
        sessions = {
            _peer_key(peer): self._seal(_bytes("session", record), ("session", peer))
            for peer, record in attempted.items()
        }
        results: list[OutboxItem | QueueFull | LocalProtocolError | None] = []
        accepted: list[tuple[int, Enqueue, bytes]] = []
        with self._lock:
            with self._log.snapshot() as txn:
                queued = int(txn.stat(self._db["outbox"])["entries"])
                index = self._db["outbox_index"]
                ids: set[bytes] = set()
                for request in requests:
                    try:
                        sealed = self._check_enqueue(request)
                        if queued >= queue_limit:
                            raise QueueFull(
                                f"the outbox holds {queued} messages (queue_limit {queue_limit})"
                            )
                        mid = request.message_id
                        if mid in ids or txn.get(b"m" + mid, db=index) is not None:
                            raise LocalProtocolError("a message with this id is queued already")
                    except (QueueFull, LocalProtocolError) as exc:
                        results.append(exc)
                        continue
                    ids.add(request.message_id)
                    queued += 1
                    accepted.append((len(results), request, sealed))
                    results.append(None)  # the item, once committed
            if not accepted:
                return [r for r in results if r is not None]

            def apply(txn: lmdb.Transaction[bytes]) -> None:
                outbox, index = self._db["outbox"], self._db["outbox_index"]
                if int(txn.stat(outbox)["entries"]) + len(accepted) > queue_limit:
                    raise QueueFull("the outbox filled up meanwhile (another writer)")
                for position, request, sealed in accepted:
                    seq = self._next_seq(txn, b"outbox_next")
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
                    )
                    txn.put(_U64.pack(seq), _outbox_row(item, sealed), db=outbox)
                    txn.put(b"m" + request.message_id, _U64.pack(seq), db=index)
                    txn.put(_peer_prefix(request.peer) + _U64.pack(seq), b"", db=index)
                    results[position] = item
                for key, session in sessions.items():
                    txn.put(key, session, db=self._db["sessions"])

            self._commit([record for _, request, _ in accepted for record in request.audit], apply)
        return [r for r in results if r is not None]

    def _check_enqueue(self, request: Enqueue) -> bytes:
        """Validate one request; its payload sealed for the outbox.

        Raises:
            LocalProtocolError: a bad argument.
        """
        _peer_prefix(request.peer)
        _message_id(request.message_id)
        payload = _bytes("payload", request.payload)
        if len(payload) > MAX_PAYLOAD_SIZE:
            raise LocalProtocolError(f"payload larger than {MAX_PAYLOAD_SIZE} bytes")
        if request.capability is not None:
            _bytes("capability", request.capability)
        return self._seal(payload, ("outbox", request.peer, request.message_id))

    def _outbox_fields(self, key: bytes, raw: bytes) -> dict[str, Any]:
        """The checked fields of an outbox row (payload still sealed)."""
        where = str(_U64.unpack(key)[0]) if len(key) == 8 else key.hex()
        row = _decode_row("outbox", where, raw, _OUTBOX_FIELDS)
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
            raise _corrupt("outbox", where, "fields of the wrong type")
        return row

    def _decode_outbox(self, key: bytes, raw: bytes) -> OutboxItem:
        row = self._outbox_fields(key, raw)
        seq, peer, mid = _U64.unpack(key)[0], row["peer"], row["id"]
        payload = self._unseal("outbox", str(seq), row["ct"], ("outbox", peer, mid))
        return OutboxItem(seq, peer, mid, payload, row["cap"], row["enq"], row["n"], row["last"])

    def _outbox_rows(
        self,
        txn: lmdb.Transaction[bytes],
        peer: str | None,
        *,
        after: int | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        db = self._db["outbox"]
        if peer is None:
            return list(txn.cursor(db=db).iternext())
        prefix = _peer_prefix(peer)
        rows: list[tuple[bytes, bytes]] = []
        cursor = txn.cursor(db=self._db["outbox_index"])
        start = prefix if after is None else prefix + _U64.pack(after + 1)
        if cursor.set_range(start):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix) or (limit is not None and len(rows) >= limit):
                    break
                seq_key = key[len(prefix) :]
                value = txn.get(seq_key, db=db)
                if len(seq_key) != 8 or value is None:
                    raise _corrupt("outbox_index", key.hex(), "points to no outbox row")
                rows.append((seq_key, value))
        return rows

    def pending(
        self, peer: str | None = None, *, after: int | None = None, limit: int | None = None
    ) -> list[OutboxItem]:
        """Queued messages (decrypted) in enqueue order, for ``peer`` or for everyone.

        For one ``peer``, ``after`` skips the messages queued up to that
        :attr:`OutboxItem.seq` (e.g. those in flight) and ``limit`` bounds
        how many are read.

        Raises:
            LocalProtocolError: ``peer`` is not a valid peer id.
            StoreCorrupted: a stored row is damaged.
        """
        if peer is None and (after is not None or limit is not None):
            raise LocalProtocolError("after and limit apply to one peer's queue")
        with self._log.snapshot() as txn:
            rows = self._outbox_rows(txn, peer, after=after, limit=limit)
        return [self._decode_outbox(key, value) for key, value in rows]

    def outbox_item(self, message_id: bytes) -> OutboxItem | None:
        """The queued message ``message_id`` (decrypted), or None.

        Raises:
            StoreCorrupted: the stored row is damaged.
        """
        with self._log.snapshot() as txn:
            seq_key = txn.get(b"m" + _message_id(message_id), db=self._db["outbox_index"])
            if seq_key is None:
                return None
            raw = txn.get(seq_key, db=self._db["outbox"])
        if raw is None:
            raise _corrupt("outbox_index", message_id.hex(), "points to no outbox row")
        return self._decode_outbox(seq_key, raw)

    def is_queued_for(self, message_id: bytes, peer: str) -> bool:
        """Whether ``message_id`` is queued for ``peer`` (index lookups only, nothing decrypted).

        Raises:
            LocalProtocolError: a bad message id or peer id.
        """
        return bool(self.queued_for(peer, [message_id]))

    def queued_for(self, peer: str, message_ids: Iterable[bytes]) -> set[bytes]:
        """Those of ``message_ids`` queued for ``peer``, in one read (index lookups only).

        Raises:
            LocalProtocolError: a bad message id or peer id.
        """
        prefix = _peer_prefix(peer)
        keys = [(message_id, b"m" + _message_id(message_id)) for message_id in message_ids]
        found: set[bytes] = set()
        with self._log.snapshot() as txn:
            index = self._db["outbox_index"]
            for message_id, id_key in keys:
                seq_key = txn.get(id_key, db=index)
                if seq_key is not None and txn.get(prefix + seq_key, db=index) is not None:
                    found.add(message_id)
        return found

    def peers_with_pending(self) -> list[str]:
        """Peers with at least one queued message, sorted by id bytes."""
        peers: list[str] = []
        with self._log.snapshot() as txn:
            cursor = txn.cursor(db=self._db["outbox_index"])
            if cursor.set_range(b"p"):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(b"p"):
                        break
                    if len(key) < 2 + 8 or len(key) != 2 + key[1] + 8:
                        raise _corrupt("outbox_index", key.hex(), "malformed peer key")
                    peer = _text("outbox_index", key[2 : 2 + key[1]])
                    if not peers or peers[-1] != peer:
                        peers.append(peer)
        return peers

    def outbox_count(self) -> int:
        """How many messages are queued, for all peers."""
        with self._log.snapshot() as txn:
            return int(txn.stat(self._db["outbox"])["entries"])

    def remove(self, message_id: bytes, *, audit: AuditRecords = ()) -> bool:
        """Remove a queued message (its signed ACK arrived); idempotent.

        False, and nothing written (not even ``audit``), if it is not queued.

        Raises:
            LocalProtocolError: bad message id or audit record.
            StoreCorrupted: the stored row is damaged.
            AuditFull, StorageError: nothing removed.
        """
        return self.remove_many([(message_id, audit)])[0]

    def remove_many(self, removals: Sequence[tuple[bytes, AuditRecords]]) -> list[bool]:
        """Remove several queued messages in one transaction (group commit of ACKs).

        Each ``(message_id, audit)`` is handled as by :meth:`remove`: one that
        is not queued gives False and writes nothing, not even its audit.

        Raises:
            The same as :meth:`remove`.
        """
        keys = [b"m" + _message_id(message_id) for message_id, _ in removals]
        with self._lock:
            with self._log.snapshot() as txn:
                index = self._db["outbox_index"]
                present = [txn.get(key, db=index) is not None for key in keys]
            chosen = {key for key, there in zip(keys, present, strict=True) if there}
            if not chosen:
                return present

            def apply(txn: lmdb.Transaction[bytes]) -> None:
                index, outbox = self._db["outbox_index"], self._db["outbox"]
                for id_key in chosen:
                    seq_key = txn.get(id_key, db=index)
                    if seq_key is None:
                        raise _corrupt("outbox_index", id_key[1:].hex(), "vanished meanwhile")
                    raw = txn.get(seq_key, db=outbox)
                    if raw is None:
                        raise _corrupt("outbox_index", id_key[1:].hex(), "points to no outbox row")
                    peer = self._outbox_fields(seq_key, raw)["peer"]
                    txn.delete(seq_key, db=outbox)
                    txn.delete(id_key, db=index)
                    txn.delete(_peer_prefix(peer) + seq_key, db=index)

            records = [
                record
                for (_, audit), there in zip(removals, present, strict=True)
                if there
                for record in audit
            ]
            self._commit(records, apply)
        return present

    def record_attempt(
        self,
        message_id: bytes,
        now: float,
        *,
        session: bytes | None = None,
        audit: AuditRecords = (),
    ) -> OutboxItem | None:
        """Count a delivery attempt at ``now`` (seconds), for backoff; return the item.

        ``session`` is the session with the item's peer after encrypting this
        attempt: it commits in the same transaction, so a crash never reuses
        a message key. If the message is no longer queued, nothing is written
        (not even ``session`` or ``audit``) and None is returned; the caller
        then stores the session with :meth:`put_session`.

        Raises:
            LocalProtocolError: bad message id, session or audit record.
            StoreCorrupted: the stored row is damaged.
            AuditFull, StorageError: nothing was written.
        """
        id_key = b"m" + _message_id(message_id)
        at_ms = int(now * 1000)
        plain_session = None if session is None else _bytes("session", session)
        updated: OutboxItem | None = None

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            nonlocal updated
            outbox = self._db["outbox"]
            seq_key = txn.get(id_key, db=self._db["outbox_index"])
            raw = None if seq_key is None else txn.get(seq_key, db=outbox)
            if seq_key is None or raw is None:
                raise _Unchanged
            row = self._outbox_fields(seq_key, raw)
            row["n"] += 1
            row["last"] = at_ms
            txn.put(seq_key, canonical_dumps(row), db=outbox)
            updated = self._decode_outbox(seq_key, raw)
            updated = replace(updated, attempts=row["n"], last_attempt_ms=at_ms)
            if plain_session is not None:
                sealed = self._seal(plain_session, ("session", updated.peer))
                txn.put(_peer_key(updated.peer), sealed, db=self._db["sessions"])

        with self._lock:
            self._commit(audit, apply)
        return updated

    def record_attempts(
        self, peer: str, message_ids: Sequence[bytes], now: float, *, session: bytes
    ) -> list[bytes]:
        """Count one delivery attempt at ``now`` for each of ``message_ids`` (a window of
        messages to ``peer``) and store ``session`` (the session after encrypting them
        all), in one transaction. Ids no longer queued are skipped; the session is
        written in any case. Returns the ids whose attempt was counted, in order.

        Raises:
            LocalProtocolError: a bad message id or session.
            StoreCorrupted: a stored row is damaged.
            AuditFull, StorageError: nothing was written.
        """
        keys = [b"m" + _message_id(message_id) for message_id in message_ids]
        at_ms = int(now * 1000)
        sealed = self._seal(_bytes("session", session), ("session", peer))
        counted: list[bytes] = []

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            counted.clear()
            outbox = self._db["outbox"]
            for id_key in keys:
                seq_key = txn.get(id_key, db=self._db["outbox_index"])
                raw = None if seq_key is None else txn.get(seq_key, db=outbox)
                if seq_key is None or raw is None:
                    continue
                row = self._outbox_fields(seq_key, raw)
                row["n"] += 1
                row["last"] = at_ms
                txn.put(seq_key, canonical_dumps(row), db=outbox)
                counted.append(id_key[1:])
            txn.put(_peer_key(peer), sealed, db=self._db["sessions"])

        with self._lock:
            self._commit((), apply)
        return counted

    # -- peer cache ------------------------------------------------------------------

    def put_peer_record(self, record: bytes, *, audit: AuditRecords = ()) -> bool:
        """Cache a peer record the caller verified; False (nothing written) unless newer.

        A record replaces the cached one only with a higher sequence number.

        Raises:
            MalformedFrame, UnsupportedVersion: ``record`` is not a peer record.
            LocalProtocolError: bad audit record.
            AuditFull, StorageError: nothing was written.
        """
        parsed = PeerRecord.from_bytes(record)
        key = b"r" + _peer_key(parsed.agent_id)

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            old = txn.get(key, db=self._db["peers"])
            if old is not None:
                try:
                    if PeerRecord.from_bytes(old).sequence >= parsed.sequence:
                        raise _Unchanged
                except (MalformedFrame, UnsupportedVersion):
                    pass  # a damaged cached record is replaced by the verified one
            txn.put(key, record, db=self._db["peers"])

        with self._lock:
            return self._commit(audit, apply)

    def peer_record(self, agent_id: str) -> bytes | None:
        """The cached peer record of ``agent_id`` (verify it again before use), or None.

        Raises:
            StoreCorrupted: the cached record does not decode.
        """
        key = b"r" + _peer_key(agent_id)
        with self._log.snapshot() as txn:
            raw = txn.get(key, db=self._db["peers"])
        if raw is not None:
            try:
                PeerRecord.from_bytes(raw)
            except (MalformedFrame, UnsupportedVersion) as exc:
                raise _corrupt("peers", f"record {agent_id}", str(exc)) from None
        return raw

    def peer_records(self) -> list[bytes]:
        """Every cached peer record, in agent-id order (verify each before use)."""
        return [value for _, value in self._prefixed(b"r")]

    def put_keylog(self, agent_id: str, data: bytes, *, audit: AuditRecords = ()) -> None:
        """Cache ``agent_id``'s key event log (the caller verified it extends the old one).

        Raises:
            LocalProtocolError: bad agent id, data or audit record.
            AuditFull, StorageError: nothing was written.
        """
        key = b"k" + _peer_key(agent_id)
        data = _bytes("key log", data)
        with self._lock:
            self._commit(audit, self._putter("peers", key, data))

    def keylog(self, agent_id: str) -> bytes | None:
        """The cached key event log of ``agent_id`` (verify it before use), or None."""
        key = b"k" + _peer_key(agent_id)
        with self._log.snapshot() as txn:
            return txn.get(key, db=self._db["peers"])

    def _prefixed(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        with self._log.snapshot() as txn:
            cursor = txn.cursor(db=self._db["peers"])
            rows = []
            if cursor.set_range(prefix):
                for key, value in cursor.iternext():
                    if not key.startswith(prefix):
                        break
                    rows.append((key, value))
        return iter(rows)


# -- row helpers ---------------------------------------------------------------------


def _corrupt(db: str, key: str, reason: str) -> StoreCorrupted:
    return StoreCorrupted(
        f"agent state database {db!r}, key {key}: {reason}",
        where=f"agent state {db} {key}",
        what=reason,
    )


def _associated(parts: tuple[Any, ...]) -> bytes:
    return canonical_dumps(["talos/agent-state/v1", *parts])


def _decode_row(db: str, where: str, raw: bytes, fields: frozenset[str]) -> dict[str, Any]:
    try:
        return strict_versioned_map(
            raw, max_size=_MAX_ROW, fields=fields, version=FORMAT_VERSION, what=f"{db} row"
        )
    except (MalformedFrame, UnsupportedVersion) as exc:
        raise _corrupt(db, where, str(exc)) from None


def _outbox_row(item: OutboxItem, sealed: bytes) -> bytes:
    return canonical_dumps(
        {
            "v": FORMAT_VERSION,
            "peer": item.peer,
            "id": item.message_id,
            "ct": sealed,
            "cap": item.capability,
            "enq": item.enqueued_ms,
            "n": item.attempts,
            "last": item.last_attempt_ms,
        }
    )


def _peer_key(peer: str) -> bytes:
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


def _peer_prefix(peer: str) -> bytes:
    raw = _peer_key(peer)
    return b"p" + bytes((len(raw),)) + raw


def _message_id(message_id: bytes) -> bytes:
    if type(message_id) is not bytes or not 1 <= len(message_id) <= MAX_ID_SIZE:
        raise LocalProtocolError(f"message id must be 1..{MAX_ID_SIZE} bytes")
    return message_id


def _bytes(what: str, value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"{what} must be bytes")
    return bytes(value)


def _seq(seq: int) -> int:
    if type(seq) is not int or not 0 <= seq < 2**64:
        raise LocalProtocolError("inbox sequence must be an integer in 0..2**64-1")
    return seq


def _text(db: str, key: bytes) -> str:
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt(db, key.hex(), "key is not UTF-8") from None
