"""What became of each message sent: :class:`MessageOutcome`, and waiting for one.

Every message leaves the outbox exactly once, through
:meth:`~talos.client.delivery.Deliverer.finish`, which settles its outcome
here: delivered (its ACK's removal committed), failed (refused by the peer,
or given up by ``send(on_failure="raise")``), expired or cancelled. The last
:data:`REMEMBERED` outcomes stay in memory for :meth:`TalosClient.outcome`;
older ones, and those from before a restart, are looked up in the audit log
(:func:`from_audit`), where every one of them has its entry.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from talos.audit import AuditEntry, AuditKind
from talos.core.delivery import Outcome

__all__ = ["FINAL_KINDS", "REMEMBERED", "MessageOutcome", "Outcomes", "State", "from_audit"]

#: Outcomes kept in memory (the audit log holds every one).
REMEMBERED: Final = 10_000

State = Literal["queued", "delivered", "failed", "expired", "cancelled"]

#: The audit entry that records each final state.
FINAL_KINDS: Final[dict[str, State]] = {
    AuditKind.MESSAGE_DELIVERED: "delivered",
    AuditKind.PEER_REJECTED: "failed",
    AuditKind.DELIVERY_FAILED: "failed",
    AuditKind.MESSAGE_EXPIRED: "expired",
    AuditKind.MESSAGE_CANCELLED: "cancelled",
}

_STATES: Final[dict[Outcome, State]] = {
    Outcome.DELIVERED: "delivered",
    Outcome.REFUSED: "failed",
    Outcome.GIVEN_UP: "failed",
    Outcome.EXPIRED: "expired",
    Outcome.CANCELLED: "cancelled",
}


@dataclass(frozen=True, slots=True)
class MessageOutcome:
    """Where a sent message stands: still ``"queued"``, or its final state.

    ``"delivered"``: the peer's signed ACK arrived and the message left the
    outbox. ``"failed"``: the peer refused it (``reason`` is its signed
    reason), or ``send(on_failure="raise")`` gave up. ``"expired"``: its
    ``expires_in`` passed first. ``"cancelled"``: :meth:`TalosClient.cancel`.
    An expired or cancelled message that had been transmitted may still have
    reached the peer: both stop the sending; neither can unsend.
    """

    #: The message's id, hex text (as in :class:`SendResult`).
    message_id: str
    #: The agent it was sent to.
    peer: str
    #: ``"queued"``, ``"delivered"``, ``"failed"``, ``"expired"`` or ``"cancelled"``.
    state: State
    #: Why it failed (the peer's signed reason), or a note on an expired or
    #: cancelled message that may have reached the peer; else ``None``.
    reason: str | None = None

    @property
    def final(self) -> bool:
        """Whether this is the message's last state (anything but ``"queued"``)."""
        return self.state != "queued"


class Outcomes:
    """The recent final outcomes, and the calls waiting for one."""

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._remembered = remembered
        self._final: collections.OrderedDict[bytes, MessageOutcome] = collections.OrderedDict()
        self._waiting: dict[bytes, list[asyncio.Future[MessageOutcome]]] = {}

    def settle(
        self, message_id: bytes, peer: str | None, outcome: Outcome, reason: str | None
    ) -> MessageOutcome | None:
        """``message_id`` left the outbox with ``outcome``: remember it and tell whoever
        waits. An ``UNQUEUED`` message's outcome is settled by what removed it."""
        state = _STATES.get(outcome)
        if state is None:
            return None
        settled = MessageOutcome(message_id.hex(), peer or "", state, reason)
        self._final[message_id] = settled
        self._final.move_to_end(message_id)
        while len(self._final) > self._remembered:
            self._final.popitem(last=False)
        for future in self._waiting.pop(message_id, ()):
            if not future.done():
                future.set_result(settled)
        return settled

    def get(self, message_id: bytes) -> MessageOutcome | None:
        return self._final.get(message_id)

    def waiter(self, message_id: bytes) -> asyncio.Future[MessageOutcome]:
        """A future resolved with the message's final outcome."""
        future: asyncio.Future[MessageOutcome] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(message_id, []).append(future)
        return future

    def forget_waiter(self, message_id: bytes, future: asyncio.Future[MessageOutcome]) -> None:
        waiting = self._waiting.get(message_id)
        if waiting is not None and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self._waiting[message_id]

    def release(self) -> None:
        """The client closed: nobody will settle anything any more."""
        for futures in self._waiting.values():
            for future in futures:
                future.cancel()
        self._waiting.clear()


def from_audit(entries: Iterable[AuditEntry], message_id: bytes) -> MessageOutcome | None:
    """The outcome recorded for ``message_id`` among ``entries`` (final kinds), if any."""
    for entry in entries:
        state = FINAL_KINDS.get(entry.kind)
        if state is not None and entry.data.get("id") == message_id:
            reason = entry.data.get("reason")
            return MessageOutcome(
                message_id.hex(), entry.peer or "", state, reason if type(reason) is str else None
            )
    return None
