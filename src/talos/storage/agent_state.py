"""The durable state of one agent: :class:`AgentState`, the façade over :mod:`talos.storage.state`.

Sessions, prekeys, the replay set, the outbox, the inbox and the peer cache
live in named databases of the audit log's LMDB environment (pass
:attr:`AgentState.DATABASES` as ``extra_databases`` to ``AuditLog.open``), so
a state change and the audit entry that records it commit in **one** durable
transaction (ARCHITECTURE §5). The façade composes the parts, each owning
some databases and their row formats, and keeps the public API; the rules it
keeps are in :mod:`talos.storage.state` and docs/design/agent-state.md.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from talos.core.clock import Clock, time_ms
from talos.core.peer_record import PeerRecord
from talos.core.replay import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_SKEW_MS,
    DEFAULT_WINDOW_MS,
    ReplayWindow,
)
from talos.core.rng import Rng
from talos.errors import ConfigurationError, LocalProtocolError, QueueFull
from talos.storage.state.commit import Apply, AuditRecords, Unchanged, UnitOfWork
from talos.storage.state.inbox import Inbox, InboxMessage, seq_keys
from talos.storage.state.meta import Meta
from talos.storage.state.outbox import Enqueue, Outbox, OutboxItem, QueuedMessage
from talos.storage.state.peers import PeerCache, keylog_key, record_key
from talos.storage.state.receiving import Received, Receiving
from talos.storage.state.replay import PRUNE_BATCH, ReplayRows
from talos.storage.state.rows import (
    FORMAT_VERSION,
    LAYOUT_VERSION,
    MAX_PAYLOAD_SIZE,
    U64,
    as_bytes,
    peer_key,
)
from talos.storage.state.sealing import Sealer, derive_storage_key
from talos.storage.state.sending import Sending
from talos.storage.state.sessions import Sessions
from talos.system import SYSTEM_RNG

if TYPE_CHECKING:
    import lmdb

    from talos.audit.log import AuditLog
    from talos.storage.environment import Environment

__all__ = [
    "FORMAT_VERSION",
    "LAYOUT_VERSION",
    "MAX_DEFERRED",
    "MAX_PAYLOAD_SIZE",
    "PRUNE_BATCH",
    "AgentState",
    "AuditRecords",
    "Enqueue",
    "InboxMessage",
    "OutboxItem",
    "QueuedMessage",
    "Received",
    "derive_storage_key",
]


#: Writes that may wait for a commit (:meth:`AgentState.put_contact`,
#: :meth:`AgentState.confirm_session`): one more commits them.
MAX_DEFERRED: Final = 64


class _Contact(NamedTuple):
    """A first contact waiting for a commit: what the cache reads answer meanwhile."""

    keylog: bytes
    record: bytes | None
    #: The record's sequence (-1 without one): a cached newer record still wins.
    sequence: int


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
        sealer = Sealer(storage_key, rng)
        try:
            db = {name: log.database(name) for name in self.DATABASES}
        except LocalProtocolError:
            raise ConfigurationError(
                "open the audit log with extra_databases=AgentState.DATABASES"
            ) from None
        self._log = log
        meta = Meta(db["agent"], sealer)
        self._sessions = Sessions(db["sessions"], meta, sealer)
        self._inbox = Inbox(db["inbox"], meta, sealer)
        self._outbox = Outbox(db["outbox"], db["outbox_index"], meta, sealer)
        self._peers = PeerCache(db["peers"])
        replay = ReplayRows(db["replay"], meta)
        window = ReplayWindow(
            window_ms=replay_window_ms, max_skew_ms=clock_skew_ms, max_entries=replay_max_entries
        )
        with log.snapshot() as txn:
            initialized = meta.check_header(txn)
            window = replay.load(txn, window, time_ms(clock))
        self._work = UnitOfWork(log, meta, initialized=initialized)
        self._receiving = Receiving(
            self._work, clock, window, replay=replay, sessions=self._sessions, inbox=self._inbox
        )
        self._sending = Sending(self._work, clock, outbox=self._outbox, sessions=self._sessions)
        self._acknowledgements = itertools.count()

    @classmethod
    def start_after_loss(cls, environment: Environment, *, floor_ms: int) -> None:
        """Make the empty state in ``environment`` refuse every message older than ``floor_ms``.

        For a restore or rebuild that found the agent state unusable: nothing
        is rolled back, sessions are re-established, and the replay window
        starts with its floor at ``floor_ms`` (the time of the restore), so
        a message accepted before it is refused as stale rather than
        accepted again (docs/design/audit-recovery.md).

        Raises:
            LocalProtocolError: ``environment`` was not opened with :attr:`DATABASES`.
            StorageError: LMDB failed.
        """
        agent = environment.database("agent")
        with environment.write() as txn:
            txn.put(b"replay_floor", U64.pack(floor_ms), db=agent)

    def _commit(self, audit: AuditRecords, apply: Apply) -> bool:
        with self._work.lock:
            return self._work.commit(audit, apply)

    # -- sessions and prekeys --------------------------------------------------------

    def session(self, peer: str) -> bytes | None:
        """The stored session with ``peer`` (``Session.to_bytes``), or None.

        Raises:
            LocalProtocolError: ``peer`` is not a valid peer id.
            StoreCorrupted: the stored session is damaged.
        """
        key = peer_key(peer)
        with self._work.settled(("session", peer)):
            waiting = self._work.deferred(("session", peer))
            if isinstance(waiting, bytes):
                return waiting
            with self._log.snapshot() as txn:
                return self._sessions.get(txn, key, peer)

    def session_peers(self) -> list[str]:
        """The peers this agent holds a session with, sorted."""
        with self._log.snapshot() as txn:
            return self._sessions.peers(txn)

    def put_session(self, peer: str, session: bytes, *, audit: AuditRecords = ()) -> None:
        """Store the session with ``peer`` (establish, or after encrypting a send).

        Raises:
            LocalProtocolError: bad peer or audit record.
            AuditFull, StorageError: nothing was written.
        """
        key, sealed = self._sessions.seal(peer, session)
        self._commit(audit, lambda txn: self._sessions.put(txn, key, sealed))

    def confirm_session(self, peer: str, session: bytes) -> None:
        """Store the session with ``peer`` once the peer confirmed it (an ACK to a
        message carrying its handshake), with the next commit of this state:
        losing it to a crash only makes the next message repeat the handshake,
        which the peer knows. :meth:`session` answers it meanwhile; a later
        commit writes it before its own rows (a newer session, a reset).

        Raises:
            LocalProtocolError: bad peer.
            AuditFull, StorageError: as :meth:`put_contact` (when more than
                :data:`MAX_DEFERRED` writes wait).
        """
        key, sealed = self._sessions.seal(peer, session)
        plain = as_bytes("session", session)
        with self._work.lock:
            waiting = self._work.defer(
                ("session", peer), plain, lambda txn: self._sessions.put(txn, key, sealed)
            )
            if waiting > MAX_DEFERRED:
                self._work.flush()

    def drop_session(self, peer: str, *, audit: AuditRecords = ()) -> bool:
        """Forget the session with ``peer`` (reset); False, and nothing written, if none.

        Raises:
            LocalProtocolError: bad peer or audit record.
            AuditFull, StorageError: nothing was written.
        """
        key = peer_key(peer)
        return self._commit(audit, lambda txn: self._sessions.delete(txn, key))

    def prekeys(self) -> bytes | None:
        """The stored prekey store (``PrekeyStore.to_bytes``), or None.

        Raises:
            StoreCorrupted: the stored value is damaged.
        """
        with self._log.snapshot() as txn:
            return self._sessions.prekeys(txn)

    def put_prekeys(self, data: bytes, *, audit: AuditRecords = ()) -> None:
        """Replace the prekey store.

        Raises:
            LocalProtocolError: bad data or audit record.
            AuditFull, StorageError: nothing was written.
        """
        sealed = self._sessions.seal_prekeys(data)
        self._commit(audit, lambda txn: self._sessions.put_prekeys(txn, sealed))

    # -- receiving -------------------------------------------------------------------

    @property
    def replay_window(self) -> ReplayWindow:
        """The replay set as committed (check with ``.check``; do not record into it)."""
        return self._receiving.window

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
        return self._receiving.commit(batch, taken)

    def commit_duplicate(self, *, audit: AuditRecords) -> None:
        """Audit a dropped duplicate (REPLAY_DROPPED): audit entries only, no state change.

        Raises:
            LocalProtocolError: bad audit record.
            AuditFull, StorageError: nothing was written.
        """
        self._commit(audit, lambda txn: None)

    # -- inbox -----------------------------------------------------------------------

    def inbox(self, after: int = -1, limit: int = 1000) -> list[tuple[int, InboxMessage]]:
        """Up to ``limit`` messages with sequence above ``after``, in arrival order.

        They stay in the inbox until :meth:`acknowledge` (at-least-once) or
        :meth:`take` removes them.

        Raises:
            StoreCorrupted: a stored message is damaged.
        """
        with self._log.snapshot() as txn:
            return self._inbox.read(txn, after, limit)

    def inbox_count(self) -> int:
        """How many messages wait in the inbox."""
        with self._log.snapshot() as txn:
            return self._inbox.count(txn)

    def return_to_inbox(self, messages: Sequence[InboxMessage]) -> list[int]:
        """Put messages taken from the inbox back (at its end), in one commit.

        For messages taken for an application that, as it turned out, was no
        longer there to get them (e.g. a cancelled ``receive()``). Returns
        their new sequence numbers.

        Raises:
            LocalProtocolError: a bad message.
            AuditFull, StorageError: nothing was written.
        """
        rows = [self._inbox.row(message) for message in messages]
        seqs: list[int] = []

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            seqs[:] = self._inbox.append(txn, rows)

        if rows:
            self._commit((), apply)
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
            taken[:] = self._inbox.take(txn, limit)

        if not self._commit(audit, apply):
            return []
        return taken

    def acknowledge(self, *seqs: int, audit: AuditRecords = ()) -> bool:
        """Remove inbox messages ``seqs`` after processing them, in one commit.

        True if any was still there (or if acknowledgements waiting for a commit,
        see :meth:`acknowledge_later`, ran in this one: they may have removed
        them); False, and nothing written (not even ``audit``), if none was.

        Raises:
            LocalProtocolError: a bad sequence number or audit record.
            AuditFull, StorageError: nothing removed.
        """
        keys = seq_keys(seqs)
        work = self._work
        with work.lock:
            # Waiting acknowledgements run first in this transaction and may remove
            # these very rows: then this one is done, not Unchanged (which would
            # throw their deletions away with it).
            riding = work.waiting_kind("acknowledge")

            def apply(txn: lmdb.Transaction[bytes]) -> None:
                if not self._inbox.delete_present(txn, keys) and not riding:
                    raise Unchanged

            return work.commit(audit, apply)

    def acknowledge_later(self, *seqs: int) -> Hashable:
        """Have the next commit of this state remove inbox messages ``seqs`` (an
        application's acknowledgement riding a commit made anyway, e.g. the receipt
        of the next message); returns the key to follow it with
        :meth:`is_waiting`, :meth:`withdraw` and :meth:`flush`.

        Nothing is durable until a commit carries it; more than
        :data:`MAX_DEFERRED` waiting writes commit at once.

        Raises:
            LocalProtocolError: a bad sequence number.
            AuditFull, StorageError: the commit made for too many waiting writes
                failed (the others still wait; this one is withdrawn).
        """
        keys = seq_keys(seqs)

        def write(txn: lmdb.Transaction[bytes]) -> None:
            self._inbox.delete_present(txn, keys)

        with self._work.lock:
            key = ("acknowledge", next(self._acknowledgements))  # see waiting_kind
            waiting = self._work.defer(key, True, write)
            if waiting > MAX_DEFERRED:
                try:
                    self._work.flush()
                except BaseException:
                    self._work.withdraw(key)  # the caller is told it failed: not later
                    raise
        return key

    def is_waiting(self, key: Hashable) -> bool:
        """Whether the write deferred as ``key`` still waits for a commit."""
        return self._work.waiting(key)

    def withdraw(self, key: Hashable) -> bool:
        """Take back the write deferred as ``key`` if no commit carried it yet (then
        True: it will not be written)."""
        if not self._work.waiting(key):
            return False  # carried already (or never deferred): no need for the lock
        with self._work.lock:
            return self._work.withdraw(key)

    def on_commit(self, listener: Callable[[], None] | None) -> None:
        """Have ``listener`` called after every durable commit of this state, in the
        thread that made it and with the state's lock held (so: quick, and no call
        back into this state); None stops it."""
        self._work.on_commit = listener

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
        return self._sending.enqueue_many(requests, queue_limit, attempted or {}, attempt_at)

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
            return self._outbox.read(txn, peer, after=after, limit=limit)

    def outbox_item(self, message_id: bytes) -> OutboxItem | None:
        """The queued message ``message_id`` (decrypted), or None.

        Raises:
            StoreCorrupted: the stored row is damaged.
        """
        with self._log.snapshot() as txn:
            return self._outbox.item(txn, message_id)

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
        with self._log.snapshot() as txn:
            return self._outbox.queued_for(txn, peer, message_ids)

    def peers_with_pending(self) -> list[str]:
        """Peers with at least one queued message, sorted by id bytes."""
        with self._log.snapshot() as txn:
            return self._outbox.peers(txn)

    def queued_messages(self) -> list[QueuedMessage]:
        """Every queued message in enqueue order, nothing decrypted (for listing).

        Raises:
            StoreCorrupted: a stored row is damaged.
        """
        with self._log.snapshot() as txn:
            return self._outbox.summaries(txn)

    def outbox_count(self) -> int:
        """How many messages are queued, for all peers."""
        with self._log.snapshot() as txn:
            return self._outbox.count(txn)

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
        return self._sending.remove_many(removals)

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
        return self._sending.record_attempt(message_id, now, session, audit)

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
        return self._sending.record_attempts(peer, message_ids, now, session)

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
        key = record_key(parsed.agent_id)
        sequence = parsed.sequence
        return self._commit(audit, lambda txn: self._peers.put_record(txn, key, record, sequence))

    def put_contact(self, agent_id: str, keylog: bytes, record: bytes | None) -> None:
        """Cache a first contact's key log and record (both verified by the caller) with
        the next commit of this state (or :meth:`flush`); the record only if it is
        newer than a cached one, as in :meth:`put_peer_record`.

        Meanwhile :meth:`keylog` and :meth:`peer_record` answer them. Only what is
        fetched again when lost may wait: a first contact (a crash before the next
        commit forgets it, and the peer is looked up again); an update of a key
        log we hold (a rotation) is written at once with :meth:`put_keylog`. No
        more than :data:`MAX_DEFERRED` contacts wait: one more commits them.

        Raises:
            MalformedFrame, UnsupportedVersion: ``record`` is not a peer record.
            LocalProtocolError: bad agent id or data.
            AuditFull, StorageError: when they were committed at once: nothing was
                written, and they still wait.
        """
        log_key = keylog_key(agent_id)
        keylog = as_bytes("key log", keylog)
        parsed = None if record is None else PeerRecord.from_bytes(record)

        def write(txn: lmdb.Transaction[bytes]) -> None:
            self._peers.put_keylog(txn, log_key, keylog)
            if parsed is not None and record is not None:
                with contextlib.suppress(Unchanged):
                    key = record_key(parsed.agent_id)
                    self._peers.put_record(txn, key, record, parsed.sequence)

        with self._work.lock:
            sequence = -1 if parsed is None else parsed.sequence
            contact = _Contact(keylog, record, sequence)
            waiting = self._work.defer(("contact", agent_id), contact, write)
            if waiting > MAX_DEFERRED:
                self._work.flush()

    def flush(self) -> None:
        """Commit the first contacts still waiting for a commit (before closing).

        Raises:
            AuditFull, StorageError: nothing was written.
        """
        with self._work.lock:
            self._work.flush()

    def _contact(self, agent_id: str) -> _Contact | None:
        waiting = self._work.deferred(("contact", agent_id))
        return waiting if isinstance(waiting, _Contact) else None

    def peer_record(self, agent_id: str) -> bytes | None:
        """The cached peer record of ``agent_id`` (verify it again before use), or None.

        Raises:
            StoreCorrupted: the cached record does not decode.
        """
        key = record_key(agent_id)
        with self._work.settled(("contact", agent_id)):
            with self._log.snapshot() as txn:
                cached = self._peers.record(txn, key, agent_id)
            contact = self._contact(agent_id)
        if contact is None or contact.record is None:
            return cached
        if cached is not None and PeerRecord.from_bytes(cached).sequence >= contact.sequence:
            return cached
        return contact.record

    def peer_records(self) -> list[bytes]:
        """Every cached peer record, in agent-id order (verify each before use)."""
        with self._log.snapshot() as txn:
            return self._peers.records(txn)

    def put_keylog(self, agent_id: str, data: bytes, *, audit: AuditRecords = ()) -> None:
        """Cache ``agent_id``'s key event log (the caller verified it extends the old one).

        Raises:
            LocalProtocolError: bad agent id, data or audit record.
            AuditFull, StorageError: nothing was written.
        """
        key = keylog_key(agent_id)
        data = as_bytes("key log", data)
        self._commit(audit, lambda txn: self._peers.put_keylog(txn, key, data))

    def keylog(self, agent_id: str) -> bytes | None:
        """The cached key event log of ``agent_id`` (verify it before use), or None."""
        key = keylog_key(agent_id)
        with self._work.settled(("contact", agent_id)):
            contact = self._contact(agent_id)
            if contact is not None:
                return contact.keylog
            with self._log.snapshot() as txn:
                return self._peers.keylog(txn, key)
