"""Outbound delivery as a state machine: what is in flight, to whom, until when.

The asyncio driver (:mod:`talos.client.delivery`) does the I/O: it reads the
outbox, encrypts, transmits, waits and commits. This module decides, from
events the driver reports, what those messages' state is and what the
driver must do next. It reads no clock: every event carries ``now``.

One :class:`Pending` record per message someone waits on (a ``send()``
call, or the delivery loop that transmitted it) replaces a set of parallel
maps keyed by message id. A record leaves :class:`Delivery` exactly once,
through :meth:`Delivery.finish`, with its :class:`Outcome`.

Rules:

1. A peer has a :class:`Window`: the messages transmitted and not yet
   acknowledged, oldest first, bounded by :data:`SEND_WINDOW` messages and
   :data:`SEND_WINDOW_BYTES` bytes of payload (one message always fits).
   Until the peer confirms the session the window is one message: each
   X3DH initial message would start a new session.
2. An ACK names ids; those the outbox still holds for that peer are
   *being removed* until the removal commits. Only then are their
   records finished as delivered (persist before release).
3. A refusal ``UNAVAILABLE`` (try later) or ``DECRYPT_FAILED`` marks the
   message *nacked*: the window stops and is sent again after the backoff.
   ``DECRYPT_FAILED`` also resets the session, at most once per
   :data:`RESET_INTERVAL` per peer. Any other refusal is final.
4. A window with a nacked message, or one past its ACK deadline, has failed:
   everything still queued is sent again from the oldest (the receiver
   answers DUPLICATE for what it already has).
5. A message queued with ``expires_in`` expires at ``enqueued + expires_in``
   (:func:`expires_at_ms`): once ``now`` reaches that time it is dropped from
   the outbox, unless its ACK came first (:class:`Expiries` says which are due).
   An expired message may have reached the peer (sent, not yet acknowledged):
   expiry stops the sending; it cannot unsend.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from talos.core import wire
from talos.errors import DeliveryTimeout, SessionError, TalosError

__all__ = [
    "ACK_TIMEOUT",
    "RESET_INTERVAL",
    "SEND_WINDOW",
    "SEND_WINDOW_BYTES",
    "Delivery",
    "Expiries",
    "Outcome",
    "Pending",
    "RefusalAction",
    "Window",
    "expires_at_ms",
]

#: How long one transmission waits for its ACK before it is retried.
ACK_TIMEOUT: Final = 10.0
#: Messages in flight to one peer at a time (sent back to back, one commit).
SEND_WINDOW: Final = 256
#: Payload bytes in flight to one peer at a time (one message always may be):
#: large messages must not wait behind so many others that their ACK_TIMEOUT
#: runs out on a slow link (4 MiB at 1 MB/s is 4 s).
SEND_WINDOW_BYTES: Final = 4 * 1024 * 1024
#: Least time between two automatic session resets for one peer.
RESET_INTERVAL: Final = 5.0


class Outcome(enum.Enum):
    """How a pending message left :class:`Delivery`."""

    DELIVERED = "delivered"  # acknowledged, and its removal from the outbox committed
    REFUSED = "refused"  # the peer refused it for good
    GIVEN_UP = "given up"  # send(on_failure="raise") ran out of time or retries
    UNQUEUED = "unqueued"  # no longer in the outbox when it was to be sent
    CANCELLED = "cancelled"  # the application cancelled it (TalosClient.cancel)
    EXPIRED = "expired"  # its expires_in passed before its ACK (rule 5)


@dataclass(slots=True, eq=False)
class Pending:
    """A message someone waits on, from the send() call or transmission that tracked
    it until its :class:`Outcome`."""

    message_id: bytes
    peer: str
    #: Outbox sequence number and payload size (known once transmitted).
    seq: int = -1
    size: int = 0
    #: ACK deadline (monotonic seconds) of the current transmission, if in flight.
    deadline: float | None = None
    #: Wall-clock time of the last transmission, for clock samples from the ACK.
    sent_at: float | None = None
    #: The X3DH header it was last sent with (an ACK to it confirms that handshake).
    handshake: bytes | None = None
    #: Failed delivery attempts with this message at the head of its peer's queue,
    #: and what the last one failed with ("RegistryUnavailable: ...").
    failures: int = 0
    last_failure: str | None = None
    #: The peer asked for it again (UNAVAILABLE or DECRYPT_FAILED): the window stops.
    nacked: bool = False


@dataclass(frozen=True, slots=True)
class RefusalAction:
    """What the driver does about a signed ERROR for one of its messages (rule 3)."""

    retry: bool  # wake the peer's loop: the window fails and is sent again
    reset_session: bool  # drop the session first (DECRYPT_FAILED, rate-limited)
    final: bool  # remove from the outbox and finish as REFUSED


@dataclass(frozen=True, slots=True)
class Check:
    """The result of :meth:`Window.tick`."""

    progressed: bool  # some in-flight messages finished (room was freed)
    failure: TalosError | None  # the window failed (rule 4): raise it, back off, resend


class Window:
    """One peer's messages in flight, oldest first (rule 1), and the frames the send
    fast path encrypted for the delivery loop to transmit next."""

    __slots__ = ("inflight", "outgoing")

    def __init__(self) -> None:
        self.inflight: dict[bytes, Pending] = {}
        self.outgoing: list[tuple[bytes, bytes]] = []

    def __len__(self) -> int:
        return len(self.inflight)

    def last_seq(self) -> int | None:
        """The outbox sequence number of the newest message in flight."""
        return max((p.seq for p in self.inflight.values()), default=None)

    def bytes_in_flight(self) -> int:
        return sum(p.size for p in self.inflight.values())

    def head(self) -> bytes | None:
        return next(iter(self.inflight), None)

    def transmitted(
        self, record: Pending, *, seq: int, size: int, sent_at: float, deadline: float
    ) -> None:
        """``record`` left (again) at wall time ``sent_at``; its ACK is due by ``deadline``."""
        record.seq, record.size = seq, size
        record.sent_at, record.deadline, record.nacked = sent_at, deadline, False
        self.inflight[record.message_id] = record

    def take_outgoing(self) -> list[tuple[bytes, bytes]]:
        outgoing, self.outgoing = self.outgoing, []
        return outgoing

    def failed(self) -> None:
        """The window failed or the link dropped (rule 4): nothing is in flight now."""
        self.inflight.clear()
        self.outgoing = []

    def tick(self, now: float, delivery: Delivery) -> Check:
        """Forget finished messages; fail the window on a nack or a passed deadline.

        A message whose ACK is being committed leaves the window at once, unless it
        carried an X3DH header: its ACK confirms the session only once its removal
        has committed, and until then the next message would go out with the same
        header (rule 1), which the peer cannot accept twice.
        """
        done = [
            message_id
            for message_id, record in self.inflight.items()
            if delivery.get(message_id) is None
            or (delivery.being_removed(message_id) and record.handshake is None)
        ]
        for message_id in done:
            del self.inflight[message_id]
        for record in self.inflight.values():
            if record.nacked:
                return Check(
                    bool(done),
                    SessionError(
                        f"{record.peer} could not decrypt or accept a message yet; retrying"
                    ),
                )
            if record.deadline is not None and now >= record.deadline:
                return Check(
                    bool(done),
                    DeliveryTimeout(f"no ACK from {record.peer} within {ACK_TIMEOUT:g} s"),
                )
        return Check(bool(done), None)

    def next_deadline(self) -> float | None:
        """The earliest ACK deadline in flight: when :meth:`tick` must run next."""
        return min(
            (p.deadline for p in self.inflight.values() if p.deadline is not None), default=None
        )


def window_size(confirmed: bool) -> int:
    """Rule 1: one message until the peer holds the session, then :data:`SEND_WINDOW`."""
    return SEND_WINDOW if confirmed else 1


class Delivery:
    """Every pending message and every peer's window; the removals ACKs started."""

    __slots__ = ("_last_reset", "_records", "_removal_running", "_removing", "_windows")

    def __init__(self) -> None:
        self._records: dict[bytes, Pending] = {}
        self._windows: dict[str, Window] = {}
        self._removing: dict[bytes, wire.Envelope] = {}
        self._removal_running: dict[bytes, wire.Envelope] = {}
        self._last_reset: dict[str, float] = {}

    # -- records ---------------------------------------------------------------------

    def track(self, message_id: bytes, peer: str) -> Pending:
        """The record of ``message_id``, created when nobody tracked it yet."""
        record = self._records.get(message_id)
        if record is None:
            record = self._records[message_id] = Pending(message_id, peer)
        return record

    def get(self, message_id: bytes) -> Pending | None:
        return self._records.get(message_id)

    def finish(self, message_id: bytes) -> Pending | None:
        """``message_id`` is done (the driver tells its waiter the :class:`Outcome`);
        returns its record if it was tracked."""
        return self._records.pop(message_id, None)

    def count_failure(self, message_id: bytes, reason: str | None = None) -> bool:
        """A delivery attempt failed with ``message_id`` at the head (because of
        ``reason``); True if tracked."""
        record = self._records.get(message_id)
        if record is None:
            return False
        record.failures += 1
        record.last_failure = reason
        return True

    def window(self, peer: str) -> Window:
        window = self._windows.get(peer)
        if window is None:
            window = self._windows[peer] = Window()
        return window

    # -- ACKs and their removals (rule 2) ---------------------------------------------

    def being_removed(self, message_id: bytes) -> bool:
        return message_id in self._removing or message_id in self._removal_running

    def acked(self, ack: wire.Envelope, queued: Iterable[bytes]) -> None:
        """``ack`` acknowledges ``queued``, ids the outbox holds for its sender."""
        for ref in queued:
            if not self.being_removed(ref):
                self._removing[ref] = ack

    def has_removals(self) -> bool:
        return bool(self._removing)

    def start_removal(self) -> dict[bytes, wire.Envelope]:
        """The removals to commit now (ACKs arriving meanwhile form the next batch)."""
        batch, self._removing = self._removing, {}
        self._removal_running = batch
        return batch

    def removal_committed(self) -> None:
        self._removal_running = {}

    def removal_failed(self, batch: dict[bytes, wire.Envelope]) -> set[str]:
        """The removal of ``batch`` did not commit: still queued, but below what the
        windows hold; the peers' windows restart from the oldest (rule 4)."""
        peers = {ack.sender for ack in batch.values()}
        for peer in peers:
            window = self._windows.get(peer)
            if window is not None:
                window.failed()
        return peers

    # -- refusals (rule 3) ------------------------------------------------------------

    def refused(
        self, message_id: bytes, peer: str, code: wire.ErrorCode | None, now: float
    ) -> RefusalAction:
        """A signed ERROR from ``peer`` for ``message_id`` (which it still has queued)."""
        if code is wire.ErrorCode.UNAVAILABLE or code is wire.ErrorCode.DECRYPT_FAILED:
            reset = code is wire.ErrorCode.DECRYPT_FAILED and self.may_reset(peer, now)
            record = self._records.get(message_id)
            if record is not None:
                record.nacked = True
            return RefusalAction(retry=record is not None, reset_session=reset, final=False)
        return RefusalAction(retry=True, reset_session=False, final=True)

    def may_reset(self, peer: str, now: float) -> bool:
        """Whether ``peer``'s session may be reset now (at most once per RESET_INTERVAL)."""
        if now - self._last_reset.get(peer, -RESET_INTERVAL) < RESET_INTERVAL:
            return False
        self._last_reset[peer] = now
        return True


# -- expiry (rule 5) -------------------------------------------------------------------


def expires_at_ms(enqueued_ms: int, expires_in: float) -> int:
    """Rule 5: when a message queued at ``enqueued_ms`` with ``expires_in`` seconds expires."""
    return enqueued_ms + max(1, round(expires_in * 1000))


@dataclass(order=True, slots=True)
class _Expiring:
    at_ms: int
    message_id: bytes = field(compare=False)
    peer: str = field(compare=False)


class Expiries:
    """The queued messages that expire, soonest first (rule 5).

    The driver adds every message queued with an expiry (and, at start, those
    the outbox holds) and asks :meth:`due` at :meth:`next_at`; whether a due
    message is still queued is for the outbox to say (its ACK may have come first).
    """

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[_Expiring] = []

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, message_id: bytes, peer: str, at_ms: int) -> None:
        heapq.heappush(self._heap, _Expiring(at_ms, message_id, peer))

    def next_at(self) -> float | None:
        """Wall-clock seconds of the soonest expiry, or None."""
        return self._heap[0].at_ms / 1000 if self._heap else None

    def due(self, now: float) -> list[tuple[bytes, str, int]]:
        """(message id, peer, expiry ms) of every message expired at ``now``, soonest
        first; they leave this set."""
        now_ms = now * 1000
        due: list[tuple[bytes, str, int]] = []
        while self._heap and self._heap[0].at_ms <= now_ms:
            entry = heapq.heappop(self._heap)
            due.append((entry.message_id, entry.peer, entry.at_ms))
        return due
