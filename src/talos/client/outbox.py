"""The outbox as the application manages it: list, cancel, expire, follow outcomes.

* :meth:`OutboxControl.listing` — what :meth:`TalosClient.outbox` shows:
  queued messages per peer, with attempts and age (nothing decrypted).
* :meth:`OutboxControl.cancel` — take a queued message out, with its
  ``MESSAGE_CANCELLED`` audit entry in the same commit; its outcome is
  ``"cancelled"``. A message with an outcome already cannot be cancelled.
* :meth:`OutboxControl.run_expiry` — drop the messages whose ``expires_in``
  passed (rule 5 of :mod:`talos.core.delivery`), each with its
  ``MESSAGE_EXPIRED`` audit entry; outcome ``"expired"``.
* :meth:`OutboxControl.outcome` — wait for a message's outcome; after a
  restart, found in the persisted outbox (still queued) or the audit log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from talos.audit import AuditLog
from talos.client import timing
from talos.client.arguments import check_message_id, check_timeout
from talos.client.delivery import Deliverer
from talos.client.outcomes import FINAL_KINDS, MessageOutcome, from_audit
from talos.core.clock import Clock, time_ms
from talos.core.delivery import Expiries, Outcome
from talos.errors import (
    CannotCancel,
    MessageCancelled,
    MessageExpired,
    MessageNotFound,
)
from talos.metrics import AgentMetrics
from talos.storage.agent_state import AgentState

__all__ = ["AUDIT_LOOKBACK", "OutboxControl", "QueuedEntry"]

_log = logging.getLogger("talos.client")
T = TypeVar("T")

#: Final audit entries of each kind searched for an outcome not in memory.
AUDIT_LOOKBACK: Final = 1000


@dataclass(frozen=True, slots=True)
class QueuedEntry:
    """One message waiting in the outbox, as :meth:`TalosClient.outbox` lists it."""

    #: The message's id, hex text (as in :class:`SendResult`).
    message_id: str
    #: The agent it is queued for.
    peer: str
    #: Delivery attempts so far (transmissions; each retry counts).
    attempts: int
    #: Seconds since it was queued, and since the last attempt (None: none yet).
    age: float
    last_attempt_age: float | None
    #: Seconds until it expires (None: never; 0: due now).
    expires_in: float | None
    #: Sealed size at rest in bytes (the payload plus a fixed overhead).
    size: int


class OutboxControl:
    """Listing, cancelling and expiring queued messages; their outcomes."""

    def __init__(
        self,
        *,
        state: AgentState,
        log: AuditLog,
        deliverer: Deliverer,
        metrics: AgentMetrics,
        clock: Clock,
        closed: Callable[[], bool],
    ) -> None:
        self._state, self._log, self._deliverer = state, log, deliverer
        self._metrics, self._clock, self._closed = metrics, clock, closed
        self._expiries = Expiries()
        self._wake = asyncio.Event()
        #: Commits running in worker threads (close() waits for them: a thread
        #: cannot be cancelled, and the store must not close under it).
        self._commits: set[asyncio.Future[Any]] = set()
        for queued in state.queued_messages():
            if queued.expires_ms is not None:
                self._expiries.add(queued.message_id, queued.peer, queued.expires_ms)

    # -- listing ------------------------------------------------------------------------

    def listing(self) -> dict[str, list[QueuedEntry]]:
        """Queued messages by peer, oldest first (peers in order of their oldest)."""
        now_ms = time_ms(self._clock)
        by_peer: dict[str, list[QueuedEntry]] = {}
        for queued in self._state.queued_messages():
            last = queued.last_attempt_ms
            by_peer.setdefault(queued.peer, []).append(
                QueuedEntry(
                    message_id=queued.message_id.hex(),
                    peer=queued.peer,
                    attempts=queued.attempts,
                    age=max(0, now_ms - queued.enqueued_ms) / 1000,
                    last_attempt_age=None if last is None else max(0, now_ms - last) / 1000,
                    expires_in=(
                        None
                        if queued.expires_ms is None
                        else max(0, queued.expires_ms - now_ms) / 1000
                    ),
                    size=queued.sealed_size,
                )
            )
        return by_peer

    # -- cancelling ---------------------------------------------------------------------

    async def cancel(self, message: str | bytes) -> MessageOutcome:
        """See :meth:`TalosClient.cancel`."""
        message_id = check_message_id(message)
        item = self._state.outbox_item(message_id)
        if item is not None and not self._deliverer.core.being_removed(message_id):
            removed = await self._in_thread(
                functools.partial(
                    self._state.remove,
                    message_id,
                    audit=[(_kind("cancelled"), {"id": message_id}, item.peer)],
                )
            )
            if removed:
                return self._removed(message_id, item.peer, Outcome.CANCELLED, item.attempts)
        known = await self.recorded(message_id)
        if known is None:
            if self._deliverer.core.being_removed(message_id):
                raise CannotCancel(
                    f"message {message_id.hex()} was acknowledged by its peer; "
                    "it cannot be cancelled",
                    outcome=MessageOutcome(message_id.hex(), "", "delivered"),
                )
            raise MessageNotFound(f"no message {message_id.hex()} is queued or recorded")
        if known.state == "cancelled":
            return known  # cancelling twice: the same answer
        raise CannotCancel(
            f"message {message_id.hex()} to {known.peer} was {known.state} already"
            f"{f' ({known.reason})' if known.reason else ''}; it cannot be cancelled",
            outcome=known,
        )

    def _removed(
        self, message_id: bytes, peer: str, outcome: Outcome, attempts: int
    ) -> MessageOutcome:
        """``message_id`` left the outbox by ``outcome`` (committed with its audit entry)."""
        verb = "cancelled" if outcome is Outcome.CANCELLED else "expired"
        reason = f"{verb} after {attempts} attempt(s)"
        if attempts:
            reason += ": it was transmitted, and the peer may have received it"
        error_type = MessageCancelled if outcome is Outcome.CANCELLED else MessageExpired
        self._deliverer.finish(
            message_id,
            outcome,
            error_type(f"message {message_id.hex()} to {peer} {reason}"),
            peer=peer,
            reason=reason,
        )
        event = "message_cancelled" if outcome is Outcome.CANCELLED else "message_expired"
        _log.info(
            "message %s to %s %s",
            message_id.hex(),
            peer,
            reason,
            extra={"event": event, "peer_id": peer, "message_id": message_id.hex()},
        )
        self._metrics.message_dropped(verb)
        self._deliverer.wake({peer})
        settled = self._deliverer.outcomes.get(message_id)
        return settled or MessageOutcome(message_id.hex(), peer, verb, reason)  # type: ignore[arg-type]

    # -- expiry (rule 5) ------------------------------------------------------------------

    def expiring(self, message_id: bytes, peer: str, expires_ms: int) -> None:
        """A message was queued that expires at ``expires_ms``."""
        soonest = self._expiries.next_at()
        self._expiries.add(message_id, peer, expires_ms)
        if soonest is None or expires_ms / 1000 < soonest:
            self._wake.set()

    async def run_expiry(self) -> None:
        """Drop expired messages as they expire, until the client closes."""
        while not self._closed():
            self._wake.clear()
            due = [
                expired
                for expired in self._expiries.due(self._clock.time())
                if not self._deliverer.core.being_removed(expired[0])  # its ACK came first
            ]
            if due:
                for mid, peer, attempts in await self._in_thread(
                    functools.partial(self._expire, due)
                ):
                    self._removed(mid, peer, Outcome.EXPIRED, attempts)
                continue
            next_at = self._expiries.next_at()
            if next_at is None:
                await self._wake.wait()
            else:
                await timing.sleep(self._clock, max(0.0, next_at - self._clock.time()), self._wake)

    def _expire(self, due: list[tuple[bytes, str, int]]) -> list[tuple[bytes, str, int]]:
        """Remove the due messages still queued, each with its audit entry (one commit);
        (id, peer, attempts) of those removed. Runs in a worker thread."""
        items = {mid: self._state.outbox_item(mid) for mid, _, _ in due}
        removals = [
            (mid, [(_kind("expired"), {"id": mid, "expired_ms": at_ms}, peer)])
            for mid, peer, at_ms in due
            if items[mid] is not None
        ]
        removed = self._state.remove_many(removals) if removals else []
        return [
            (mid, item.peer, item.attempts)
            for (mid, _), gone in zip(removals, removed, strict=True)
            if gone and (item := items[mid]) is not None
        ]

    async def _in_thread(self, work: Callable[[], T]) -> T:
        """Run ``work`` (a commit) in a worker thread; close() waits for it."""
        future = asyncio.ensure_future(asyncio.to_thread(work))
        self._commits.add(future)
        future.add_done_callback(self._commits.discard)
        return await asyncio.shield(future)

    async def stop(self) -> None:
        """Wait for the commits running in worker threads (before the store closes)."""
        if self._commits:
            await asyncio.wait(set(self._commits))

    # -- outcomes -------------------------------------------------------------------------

    async def recorded(self, message_id: bytes) -> MessageOutcome | None:
        """The final outcome in memory, else in the audit log's recent entries."""
        known = self._deliverer.outcomes.get(message_id)
        if known is not None:
            return known
        return await asyncio.to_thread(self._from_audit, message_id)

    def _from_audit(self, message_id: bytes) -> MessageOutcome | None:
        for kind in FINAL_KINDS:
            found = from_audit(
                reversed(self._log.query(kind=kind, last=AUDIT_LOOKBACK)), message_id
            )
            if found is not None:
                return found
        return None

    async def outcome(self, message: str | bytes, wait: float | None) -> MessageOutcome:
        """See :meth:`TalosClient.outcome`."""
        seconds = None if wait is None else check_timeout(wait)
        message_id = check_message_id(message)
        known = self._deliverer.outcomes.get(message_id)
        if known is not None:
            return known
        item = self._state.outbox_item(message_id)
        if item is None:
            known = await self.recorded(message_id)
            if known is None:
                raise MessageNotFound(
                    f"no message {message_id.hex()} is queued, and no outcome of it is "
                    f"among the last {AUDIT_LOOKBACK} of each kind in the audit log"
                )
            return known
        future = self._deliverer.outcomes.waiter(message_id)
        deadline = None if seconds is None else self._clock.monotonic() + seconds
        try:
            await timing.wait_first(self._clock, deadline, (future,))
        finally:
            self._deliverer.outcomes.forget_waiter(message_id, future)
        if future.done() and not future.cancelled():
            return future.result()
        return MessageOutcome(message_id.hex(), item.peer, "queued")


def _kind(state: str) -> str:
    """The audit kind that records ``state``."""
    return next(kind for kind, named in FINAL_KINDS.items() if named == state)
