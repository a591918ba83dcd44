"""Committing the send side: queueing, counting attempts (with the session that
encrypted them) and removing acknowledged messages, each group in one transaction.

A session advanced by encrypting a message commits together with the attempt
it was used for, so a restarted agent never encrypts again with a chain state
it already used (docs/design/agent-state.md, "Sending and message keys").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from talos.core.clock import Clock, time_ms
from talos.errors import LocalProtocolError
from talos.storage.state.commit import AuditRecords, Unchanged, UnitOfWork
from talos.storage.state.outbox import Enqueue, Outbox, OutboxItem, Outcome, id_key
from talos.storage.state.rows import as_bytes
from talos.storage.state.sessions import Sessions

if TYPE_CHECKING:
    import lmdb


class Sending:
    """The send-side commits over the outbox and the sessions."""

    def __init__(
        self, work: UnitOfWork, clock: Clock, *, outbox: Outbox, sessions: Sessions
    ) -> None:
        self._work = work
        self._clock = clock
        self._outbox = outbox
        self._sessions = sessions

    def enqueue_many(
        self,
        requests: Sequence[Enqueue],
        queue_limit: int,
        attempted: Mapping[str, bytes],
        attempt_at: float | None,
    ) -> list[Outcome]:
        """:meth:`AgentState.enqueue_many`."""
        if type(queue_limit) is not int or queue_limit < 1:
            raise LocalProtocolError("queue_limit must be a positive integer")
        now = time_ms(self._clock)
        if attempted and attempt_at is None:
            raise LocalProtocolError("attempted sessions need attempt_at")
        attempt_ms = None if attempt_at is None else int(attempt_at * 1000)
        sessions = self._sessions.seal_many(attempted)
        work = self._work
        with work.lock:
            with work.log.snapshot() as txn:
                admission = self._outbox.admit(txn, requests, queue_limit)
            if not admission.accepted:
                return admission.outcomes()

            def apply(txn: lmdb.Transaction[bytes]) -> None:
                self._outbox.write(
                    txn,
                    admission,
                    queue_limit=queue_limit,
                    now=now,
                    attempted=attempted,
                    attempt_ms=attempt_ms,
                )
                self._sessions.put_many(txn, sessions)

            work.commit(
                [record for item in admission.accepted for record in item.request.audit], apply
            )
        return admission.outcomes()

    def remove_many(self, removals: Sequence[tuple[bytes, AuditRecords]]) -> list[bool]:
        """:meth:`AgentState.remove_many`."""
        keys = [id_key(message_id) for message_id, _ in removals]
        work = self._work
        with work.lock:
            with work.log.snapshot() as txn:
                present = self._outbox.present(txn, keys)
            chosen = {key for key, there in zip(keys, present, strict=True) if there}
            if not chosen:
                return present
            records = [
                record
                for (_, audit), there in zip(removals, present, strict=True)
                if there
                for record in audit
            ]
            work.commit(records, lambda txn: self._outbox.remove(txn, chosen))
        return present

    def record_attempt(
        self, message_id: bytes, now: float, session: bytes | None, audit: AuditRecords
    ) -> OutboxItem | None:
        """:meth:`AgentState.record_attempt`."""
        key = id_key(message_id)
        at_ms = int(now * 1000)
        plain_session = None if session is None else as_bytes("session", session)
        updated: OutboxItem | None = None

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            nonlocal updated
            updated = self._outbox.attempt(txn, key, at_ms)
            if updated is None:
                raise Unchanged
            if plain_session is not None:
                self._sessions.put(txn, *self._sessions.seal(updated.peer, plain_session))

        with self._work.lock:
            self._work.commit(audit, apply)
        return updated

    def record_attempts(
        self, peer: str, message_ids: Sequence[bytes], now: float, session: bytes
    ) -> list[bytes]:
        """:meth:`AgentState.record_attempts`."""
        keys = [id_key(message_id) for message_id in message_ids]
        at_ms = int(now * 1000)
        key, sealed = self._sessions.seal(peer, session)
        counted: list[bytes] = []

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            counted[:] = self._outbox.attempt_many(txn, keys, at_ms)
            self._sessions.put(txn, key, sealed)

        with self._work.lock:
            self._work.commit((), apply)
        return counted
