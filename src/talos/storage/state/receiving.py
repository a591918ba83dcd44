"""Committing received messages: replay entries, sessions, prekeys and inbox rows at once.

Owns the in-memory :class:`~talos.core.replay.ReplayWindow` (the one cache of
the agent state): it is checked before the transaction and recorded into only
after the commit returned, under the writer lock, with the same ``now``, so it
never holds an id the disk does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from talos.core.clock import Clock, time_ms
from talos.core.replay import ReplayWindow
from talos.errors import DuplicateMessage, LocalProtocolError
from talos.storage.state.commit import AuditRecords, UnitOfWork
from talos.storage.state.inbox import Inbox, InboxMessage
from talos.storage.state.replay import ReplayRows
from talos.storage.state.sessions import Sessions

if TYPE_CHECKING:
    import lmdb


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


class Receiving:
    """The receive commit over the replay rows, the sessions and the inbox."""

    def __init__(
        self,
        work: UnitOfWork,
        clock: Clock,
        window: ReplayWindow,
        *,
        replay: ReplayRows,
        sessions: Sessions,
        inbox: Inbox,
    ) -> None:
        self._work = work
        self._clock = clock
        self.window = window
        self._replay = replay
        self._sessions = sessions
        self._inbox = inbox

    def commit(self, batch: Sequence[Received], taken: int) -> list[int]:
        """:meth:`AgentState.commit_receive_many`."""
        if type(taken) is not int or not 0 <= taken <= len(batch):
            raise LocalProtocolError("taken must count messages of the batch")
        with self._work.lock:
            now = time_ms(self._clock)
            floor = self._check(batch, now)
            # A peer's session ends as its last.
            sessions = self._sessions.seal_many({item.peer: item.session for item in batch})
            sealed_prekeys = None
            for item in batch:
                if item.prekeys is not None:
                    sealed_prekeys = self._sessions.seal_prekeys(item.prekeys)
            rows = [self._inbox.row(item.message) for item in batch[taken:]]
            seqs: list[int] = []

            def apply(txn: lmdb.Transaction[bytes]) -> None:
                for item in batch:
                    self._replay.put(txn, item.replay_id, item.timestamp_ms, floor)
                self._sessions.put_many(txn, sessions)
                if sealed_prekeys is not None:
                    self._sessions.put_prekeys(txn, sealed_prekeys)
                seqs[:] = self._inbox.append(txn, rows)

            self._work.commit([record for item in batch for record in item.audit], apply)
            for item in batch:
                self.window.record(
                    item.replay_id, item.timestamp_ms, min(now, item.message.received_at_ms)
                )
            return seqs

    def _check(self, batch: Sequence[Received], now: int) -> int:
        """Check the batch against the window; the floor to store with it.

        Raises:
            DuplicateMessage, StaleMessage: as :meth:`ReplayWindow.check`, or an id
                twice in ``batch``.
        """
        seen: set[bytes] = set()
        for item in batch:
            # As of its arrival (the caller checked then; a batch waits a moment).
            at = min(now, item.message.received_at_ms)
            self.window.check(item.replay_id, item.timestamp_ms, at)
            if item.replay_id in seen:
                raise DuplicateMessage("message id was already received")
            seen.add(item.replay_id)
        return max(self.window.floor_ms, now - self.window.window_ms)
