"""Delivering the outbox: the asyncio driver of :mod:`talos.core.delivery`.

One loop per peer delivers its queue in order, retrying with backoff until
it is empty: a sliding window of messages in flight that ACKs free room in
(what comes back is handled by :mod:`talos.client.acks`). Every message
ends through :meth:`Deliverer.finish`, which tells its waiting ``send()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from talos.audit import AuditKind
from talos.client import timing
from talos.client.outcomes import Outcomes
from talos.client.own_keys import OwnIdentity
from talos.client.revocations import Capabilities
from talos.client.sessions import Sessions
from talos.core import wire
from talos.core.backoff import Backoff
from talos.core.clock import Clock
from talos.core.delivery import (
    ACK_TIMEOUT,
    SEND_WINDOW_BYTES,
    Delivery,
    Outcome,
    Pending,
    Window,
    window_size,
)
from talos.core.rng import Rng
from talos.core.sessions import encode_record
from talos.errors import (
    DeliveryError,
    PeerUnreachable,
    SessionError,
    TalosError,
)
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.storage.agent_state import AgentState, OutboxItem
from talos.transport import Link, Transport

_log = logging.getLogger("talos.client")


class Deliverer:
    """Per-peer delivery loops, outgoing links, and the outcome of every message."""

    def __init__(
        self,
        *,
        own: OwnIdentity,
        instance: bytes,
        state: AgentState,
        sessions: Sessions,
        peers: PeerDirectory,
        transport: Transport,
        capabilities: Capabilities,
        metrics: AgentMetrics,
        clock: Clock,
        rng: Rng,
        backoff: Backoff,
        closed: Callable[[], bool],
        offline: bool,
    ) -> None:
        self._own, self._instance = own, instance
        self._state, self._sessions, self._peers = state, sessions, peers
        self._transport, self._capabilities = transport, capabilities
        self._metrics = metrics
        self._clock, self._rng, self._backoff = clock, rng, backoff
        #: Whether the client closed; in offline mode nothing is delivered.
        self._closed, self._offline = closed, offline
        self.core = Delivery()
        #: Every message's final outcome, for TalosClient.outcome().
        self.outcomes = Outcomes()
        #: Outgoing links by peer (only links this agent opened carry its messages).
        self.links: dict[str, Link] = {}
        #: send() calls waiting for their message's outcome.
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        #: The wake-up of each send() call waiting for its ACK, called whenever a
        #: delivery attempt fails: it then checks its retry count (_news_or_deadline).
        self._failure_watchers: set[Callable[[], None]] = set()
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        #: Also called on every link this agent opens (the key log offer, see wiring).
        self.on_connected: Callable[[Link, str], Awaitable[None]] | None = None
        #: Called once per link this agent opens, as soon as that peer's delivery
        #: loop has sent what was waiting (our audit checkpoint, see wiring):
        #: background work that must not hold up the first messages.
        self.on_settled: Callable[[Link, str], Awaitable[None]] | None = None
        #: Set while a peer's delivery loop waits with nothing to transmit.
        self._idle: dict[str, asyncio.Event] = {}
        #: Background offers waiting for their link to settle.
        self._settling: set[asyncio.Task[None]] = set()
        #: When send() was called (monotonic), by message id, until its outcome.
        self._accepted: dict[bytes, float] = {}
        #: Links being opened, by peer: one connection attempt at a time per peer.
        self._opening: dict[str, asyncio.Future[Link]] = {}
        #: Links opened ahead of the first message (see prepare_link).
        self._preparing: set[asyncio.Task[None]] = set()

    # -- send() calls --------------------------------------------------------------------

    def accepted(self, message_id: bytes, started: float) -> None:
        """send() took ``message_id`` at monotonic ``started``: its ACK observes
        ``talos_message_send_seconds``."""
        self._accepted[message_id] = started

    def waiter(self, message_id: bytes, peer: str) -> asyncio.Future[None]:
        """The future a send() call awaits: its message's outcome."""
        self.core.track(message_id, peer)
        future = self._waiters.get(message_id)
        if future is None:
            future = self._waiters[message_id] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieve)
        return future

    async def await_delivery(
        self, message_id: bytes, acked: asyncio.Future[None], seconds: float, retry_count: int
    ) -> bool:
        """Wait for the ACK until ``seconds`` pass or more than ``retry_count`` attempts failed.

        Raises:
            PeerRejected: the peer refused the message.
        """
        deadline = self._clock.monotonic() + seconds
        while True:
            if acked.done():
                acked.result()  # raises the peer's refusal
                return True
            record = self.core.get(message_id)
            if record is not None and record.failures > retry_count:
                return False
            if deadline - self._clock.monotonic() <= 0:
                return False
            await self._news_or_deadline(acked, deadline)

    async def _news_or_deadline(self, acked: asyncio.Future[None], deadline: float) -> None:
        """Until ``acked`` is done, any delivery attempt fails (to look at the retry
        count again), or ``deadline`` on the agent's clock. No polling, which cost
        thousands of wake-ups a second when thousands of send() calls wait at once;
        and nothing shared whose callbacks grow with the number of calls waiting
        (a callback of every waiter on one future made each wake-up O(waiters))."""
        news: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(_: object = None) -> None:
            if not news.done():
                news.set_result(None)

        acked.add_done_callback(wake)
        self._failure_watchers.add(wake)
        try:
            await timing.wait_own(self._clock, deadline, news)
        finally:
            self._failure_watchers.discard(wake)
            acked.remove_done_callback(wake)

    def finish(
        self,
        message_id: bytes,
        outcome: Outcome,
        error: Exception | None = None,
        *,
        peer: str | None = None,
        reason: str | None = None,
    ) -> None:
        """``message_id`` is done: settle its outcome, tell its send() call if one waits."""
        record = self.core.finish(message_id)
        accepted = self._accepted.pop(message_id, None)
        if outcome is Outcome.DELIVERED and accepted is not None:
            self._metrics.message_send_seconds.observe(self._clock.monotonic() - accepted)
        if peer is None and record is not None:
            peer = record.peer
        if reason is None and error is not None:
            reason = str(error)
        self.outcomes.settle(message_id, peer, outcome, reason)
        future = self._waiters.pop(message_id, None)
        if future is None or future.done() or outcome is Outcome.UNQUEUED:
            return  # an unqueued message's send() call gave up or was answered already
        if outcome is Outcome.DELIVERED:
            future.set_result(None)
        elif error is not None:
            future.set_exception(error)
        else:
            future.cancel()

    def give_up(self, message_id: bytes, peer: str, reason: str) -> None:
        if self._state.remove(
            message_id,
            audit=[(AuditKind.DELIVERY_FAILED, {"id": message_id, "reason": reason}, peer)],
        ):
            self.finish(message_id, Outcome.GIVEN_UP, peer=peer, reason=reason)
        else:  # it left the outbox meanwhile (its ACK, a refusal): that is its outcome
            self.finish(message_id, Outcome.UNQUEUED)

    # -- the delivery loops ---------------------------------------------------------------

    def kick(self, peer: str) -> None:
        """Make sure a delivery loop runs for ``peer`` and wake it."""
        if self._offline or self._closed():
            return
        self._wakeups.setdefault(peer, asyncio.Event()).set()
        # Not idle until the loop has looked at what woke it (see _when_settled).
        self._idle.setdefault(peer, asyncio.Event()).clear()
        task = self._loops.get(peer)
        if task is None or task.done():
            self._loops[peer] = asyncio.create_task(self._deliver_loop(peer))

    def wake(self, peers: set[str]) -> None:
        for peer in peers:
            wake = self._wakeups.get(peer)
            if wake is not None:
                wake.set()

    async def _deliver_loop(self, peer: str) -> None:
        """Deliver ``peer``'s queue in order, retrying with backoff until it is empty.

        Up to the window's size are in flight; as ACKs free room, the next
        messages are encrypted and transmitted, a quarter window or more at a
        time so that each transmission's commit serves several messages. A
        refusal to decrypt, a dropped link or a missing ACK fails the window:
        after the backoff everything still queued is sent again from the oldest.
        """
        attempt = 0
        wake = self._wakeups.setdefault(peer, asyncio.Event())
        idle = self._idle.setdefault(peer, asyncio.Event())
        window = self.core.window(peer)
        while not self._closed():
            wake.clear()
            idle.clear()
            head = window.head()
            try:
                outgoing = window.take_outgoing()
                if outgoing:  # encrypted by the send fast path, in flight already
                    link = self.links.get(peer)
                    waited = peer in self._opening
                    if waited:  # handed over while the link opened
                        link = await self.link(peer)
                    if link is None or not link.is_open:
                        raise PeerUnreachable(f"the connection to {peer} closed")
                    # Checked once for the batch: a message given up while an earlier
                    # group waits for the socket to drain is sent all the same (as any
                    # transmitted message, it may be delivered).
                    frames: list[bytes] = []
                    for message_id, frame in outgoing:
                        record = self.core.get(message_id)
                        if record is None:  # given up or refused
                            continue
                        if waited:  # its ACK is due from now, not from the hand-over
                            record.sent_at = self._clock.time()
                            record.deadline = self._clock.monotonic() + ACK_TIMEOUT
                        frames.append(frame)
                    await link.send_many(frames)
                check = window.tick(self._clock.monotonic(), self.core)
                if check.failure is not None:
                    raise check.failure
                if check.progressed:
                    attempt = 0
                size = self._window_size(peer)
                room = size - len(window)
                if room > 0 and (not window.inflight or room >= max(1, size // 4)):
                    items = _within_bytes(
                        self._state.pending(peer, after=window.last_seq(), limit=room),
                        SEND_WINDOW_BYTES - window.bytes_in_flight(),
                        at_least_one=not window.inflight,
                    )
                    if items:
                        head = head or items[0].message_id
                        if await self._transmit(peer, items, window):
                            continue
                idle.set()
                if not window.inflight:
                    # Nothing to send, or only messages whose ACK is being committed:
                    # an ACK, a refusal or a new message wakes this loop.
                    await wake.wait()
                    continue
                await self._await_progress(peer, wake, window)
            except TalosError as exc:
                window.failed()  # still queued: encrypted again on retry
                if head is None:
                    pending = self._state.pending(peer, limit=1)
                    head = pending[0].message_id if pending else None
                # Counted per message for send(retry_count=...): in order, the
                # message that failed is the oldest one this attempt was about.
                failure = f"{type(exc).__name__}: {exc}"
                if head is not None and self.core.count_failure(head, failure):
                    for watcher in list(self._failure_watchers):  # send() calls look again
                        watcher()
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                idle.set()
                level = logging.INFO if attempt < 5 else logging.WARNING
                _log.log(
                    level,
                    "delivery to %s failed (%s); retry in %.2f s",
                    peer,
                    exc,
                    delay,
                    extra={"event": "delivery_retry", "peer_id": peer, "attempt": attempt},
                )
                await timing.sleep(self._clock, delay, wake)

    def _window_size(self, peer: str) -> int:
        entry = self._sessions.table.committed(peer)
        return window_size(entry is not None and entry.confirmed)

    async def _await_progress(self, peer: str, wake: asyncio.Event, window: Window) -> None:
        """Wait for news about ``peer`` (an ACK, an ERROR, a new message) or the
        oldest ACK deadline.

        Raises:
            PeerUnreachable: the connection dropped with messages in flight.
        """
        link = self.links.get(peer)
        if link is None or not link.is_open:
            raise PeerUnreachable(f"the connection to {peer} closed before the ACKs")
        woken = asyncio.ensure_future(wake.wait())
        dropped = asyncio.ensure_future(link.closed.wait())
        try:
            await timing.wait_first(self._clock, window.next_deadline(), (woken, dropped))
        finally:
            woken.cancel()
            dropped.cancel()
        if dropped.done() and not dropped.cancelled():
            raise PeerUnreachable(f"the connection to {peer} closed before the ACKs")

    async def _transmit(self, peer: str, items: list[OutboxItem], window: Window) -> int:
        """Encrypt ``items`` (one commit), note them in flight and transmit them back to
        back (:meth:`Link.send_many`); returns how many were transmitted.

        Raises:
            PeerUnreachable, DiscoveryError, SessionError: no link or session (retried).
        """
        items = [item for item in items if not self.core.being_removed(item.message_id)]
        if not items:
            return 0
        records = {item.message_id: self.core.track(item.message_id, peer) for item in items}
        link = await self.link(peer)
        # Only what is still queued when the attempts commit is sent (a message given
        # up or refused since the queue was read is not).
        sealed = await self._encrypt(peer, items, records)
        for gone in records.keys() - {item.message_id for item, _ in sealed}:
            # Given up or refused meanwhile: nobody waits on it any more. (One whose ACK
            # is being committed right now is finished by that removal, as delivered.)
            if not self.core.being_removed(gone):
                self.finish(gone, Outcome.UNQUEUED)
        deadline = self._clock.monotonic() + ACK_TIMEOUT
        for item, _ in sealed:
            window.transmitted(
                records[item.message_id],
                seq=item.seq,
                size=len(item.payload),
                sent_at=self._clock.time(),
                deadline=deadline,
            )
        await link.send_many([frame for _, frame in sealed])
        return len(sealed)

    async def _encrypt(
        self, peer: str, items: list[OutboxItem], records: dict[bytes, Pending]
    ) -> list[tuple[OutboxItem, bytes]]:
        """Encrypt and sign ``items`` for ``peer``; the advanced ratchet and the attempts
        are durable (one commit) before any of the frames is returned. Items no longer
        queued by then (e.g. given up while a session was opened) are left out."""
        entry = self._sessions.current(peer)
        if entry is None:
            await self._sessions.establish(peer)
            self.kick(peer)
            entry = self._sessions.current(peer)
            if entry is None:
                raise SessionError(f"no session with {peer}")
        now = self._clock.time()
        sealed = [entry.session.encrypt(item.payload, now=now) for item in items]
        # Persist the advanced ratchet (with the attempts) before a ciphertext leaves.
        counted = set(
            self._state.record_attempts(
                peer, [item.message_id for item in items], now, session=encode_record(entry)
            )
        )
        if entry.handshake is not None:
            for item in items:  # an ACK to these confirms this handshake, no other
                records[item.message_id].handshake = entry.handshake
        return [
            (item, self.seal(item, header, ciphertext, entry.handshake))
            for item, (header, ciphertext) in zip(items, sealed, strict=True)
            if item.message_id in counted
        ]

    def seal(self, item: OutboxItem, header: bytes, ciphertext: bytes, x3dh: bytes | None) -> bytes:
        return wire.seal(
            wire.Envelope(
                type=wire.EnvelopeType.INITIAL if x3dh else wire.EnvelopeType.MESSAGE,
                message_id=item.message_id,
                sender=self._own.agent_id,
                sender_instance=self._instance,
                recipient=item.peer,
                # The time it was queued, on every retry: the receiver's replay
                # window then refuses (STALE) rather than re-accepts a message
                # retried after the window forgot its id.
                timestamp_ms=item.enqueued_ms,
                ratchet_header=header,
                ciphertext=ciphertext,
                capability_ref=item.capability,
                x3dh_header=x3dh,
            ),
            self._own.current.signing_key,
        )

    def linked(self, peer: str) -> bool:
        """Whether the link to ``peer`` is open, or being opened (a frame handed over
        now is sent once it is)."""
        link = self.links.get(peer)
        return (link is not None and link.is_open) or peer in self._opening

    def hand_over(
        self, item: OutboxItem, sealed: tuple[bytes, bytes], now: float, handshake: bytes | None
    ) -> None:
        """Sign a fast-path message (its ratchet is durable) and give it to the delivery
        loop to transmit, as in flight; with the session's ``handshake`` while the
        peer has not confirmed it (an ACK to this message confirms it)."""
        header, ciphertext = sealed
        frame = self.seal(item, header, ciphertext, handshake)
        record = self.core.track(item.message_id, item.peer)
        if handshake is not None:
            record.handshake = handshake
        window = self.core.window(item.peer)
        window.transmitted(
            record,
            seq=item.seq,
            size=len(item.payload),
            sent_at=now,
            deadline=self._clock.monotonic() + ACK_TIMEOUT,
        )
        window.outgoing.append((item.message_id, frame))

    async def link(self, peer: str) -> Link:
        """The open link to ``peer``, connecting first if there is none (one attempt
        at a time per peer: a caller arriving meanwhile waits for the same one).

        Raises:
            PeerUnreachable, DiscoveryError: as :meth:`_connect`.
        """
        link = self.links.get(peer)
        if link is not None and link.is_open and peer not in self._opening:
            return link
        # An attempt in progress has published its link already but may not have
        # sent its offers yet (the key log first: nothing may overtake it).
        return await asyncio.shield(self._open(peer))

    def _open(self, peer: str) -> asyncio.Future[Link]:
        """The connection attempt to ``peer`` in progress, or a new one (scheduled now).

        Raises:
            PeerUnreachable: the client is closing (no new connection then).
        """
        opening = self._opening.get(peer)
        if opening is None:
            if self._closed():
                raise PeerUnreachable(f"not connecting to {peer}: the client is closing")
            opening = asyncio.ensure_future(self._connect(peer))
            self._opening[peer] = opening
            opening.add_done_callback(functools.partial(self._opened, peer))
        return opening

    def _opened(self, peer: str, opening: asyncio.Future[Link]) -> None:
        if self._opening.get(peer) is opening:
            del self._opening[peer]
        if not opening.cancelled():
            opening.exception()  # retrieved: every waiter got it (or none was left)

    def prepare_link(self, peer: str) -> None:
        """Open the link to ``peer`` in the background (after a session is set up, so
        that the first message does not wait for the endpoint lookup and the
        connection). A failure is only logged: the delivery loop connects again
        when there is something to send, and counts its failures there."""
        if self._offline or self._closed():
            return
        link = self.links.get(peer)
        if link is not None and link.is_open:
            return
        # The attempt is scheduled now, ahead of whatever the caller does next
        # (its first send() commits before the loop turns).
        task = asyncio.create_task(self._prepare(self._open(peer), peer))
        self._preparing.add(task)
        task.add_done_callback(self._preparing.discard)

    async def _prepare(self, opening: asyncio.Future[Link], peer: str) -> None:
        try:
            await asyncio.shield(opening)
        except Exception as exc:  # the delivery loop meets it again, and counts it
            _log.debug("link to %s not opened ahead: %r", peer, exc)

    async def _connect(self, peer: str) -> Link:
        """Look ``peer``'s endpoint up and connect (once more after a fresh lookup if the
        cached endpoint does not answer).

        Raises:
            PeerUnreachable: no connection could be made.
            DiscoveryError: the peer's endpoint cannot be found.
        """
        record = await self._peers.endpoint(peer)
        try:
            link = await self._transport.connect(record.endpoint, hello=self._own.agent_id)
        except PeerUnreachable:
            record = await self._peers.endpoint(peer, refresh=True)
            link = await self._transport.connect(record.endpoint, hello=self._own.agent_id)
        link.peer = peer
        self.links[peer] = link
        await self._capabilities.offer(link, peer)
        if self.on_connected is not None:
            await self.on_connected(link, peer)
        if self.on_settled is not None:
            task = asyncio.create_task(self._when_settled(link, peer, self.on_settled))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        return link

    async def _when_settled(
        self, link: Link, peer: str, then: Callable[[Link, str], Awaitable[None]]
    ) -> None:
        """Call ``then(link, peer)`` once ``peer``'s delivery loop has transmitted what
        was waiting for this link (at once if no loop runs), if the link is still open."""
        await asyncio.sleep(0)  # the caller of link() gets the link first
        while True:
            loop, idle = self._loops.get(peer), self._idle.get(peer)
            if loop is None or loop.done() or idle is None or idle.is_set():
                break
            waiting = asyncio.ensure_future(idle.wait())
            try:
                await asyncio.wait((waiting, loop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
        if link.is_open and not self._closed():
            await then(link, peer)

    def resend(self, peer: str) -> None:
        """The sessions with ``peer`` were discarded (it rotated its keys): what is in
        flight will never be acknowledged under them, so fail the window now and send
        it again, re-encrypted under a new session (the receiver's replay window
        acknowledges, as duplicates, copies it had accepted)."""
        for record in self.core.window(peer).inflight.values():
            record.nacked = True
        self.kick(peer)

    # -- closing ---------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop every delivery loop (and the connection attempts in progress: none
        starts once the client is closing, see :meth:`_open`)."""
        tasks: list[asyncio.Future[Any]] = [*self._loops.values()]
        while tasks:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            pending: list[asyncio.Future[Any]] = [
                *self._preparing,
                *self._opening.values(),
                *self._settling,
            ]
            tasks = [task for task in pending if not task.done()]

    def release_waiters(self) -> None:
        """The client closed: every waiting send() learns its message stays queued."""
        self.outcomes.release()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(
                    DeliveryError("the client closed; the message stays queued for next time")
                )
                future.exception()  # retrieved here; a waiting send() sees it too


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's outcome as seen (queued sends may be refused much later)."""
    if not future.cancelled():
        future.exception()


def _within_bytes(items: list[OutboxItem], budget: int, *, at_least_one: bool) -> list[OutboxItem]:
    """The longest prefix of ``items`` whose payloads fit in ``budget`` bytes (at
    least the first when ``at_least_one``: a message larger than the budget still goes,
    alone)."""
    taken = 0
    for count, item in enumerate(items):
        taken += len(item.payload)
        if taken > budget:
            return items[: max(count, 1 if at_least_one else 0)]
    return items
