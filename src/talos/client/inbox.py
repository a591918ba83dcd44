"""Handing received messages to the application: ``receive()`` and ``acknowledge()``.

Messages wait in the durable inbox. ``receive(auto_ack=True)`` takes the
oldest out (one commit) before returning it; a call already waiting is
handed the next message by the very commit that receives it (see
:class:`~talos.client.receiving.ReceiveBatch`), so it costs no commit of its
own. ``receive(auto_ack=False)`` reads in order without removing; once it
has read the inbox to its end, later receive commits hand it their rows in
memory too (bounded by READ_AHEAD_LIMIT and READ_AHEAD_BYTES).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from talos.client import timing
from talos.client.arguments import check_wait
from talos.core.clock import Clock
from talos.core.message import Message, decode_payload_fields
from talos.errors import LocalProtocolError, TalosError
from talos.storage.agent_state import AgentState, InboxMessage

_log = logging.getLogger("talos.client")

#: Messages, and payload bytes, receive(auto_ack=False) may have waiting in memory.
READ_AHEAD_LIMIT: Final = 4096
READ_AHEAD_BYTES: Final = 8 * 1024 * 1024
#: An acknowledge() of fewer messages rides the next commit of the agent state
#: (see ACKNOWLEDGE_LINGER), a larger one commits in a worker thread. An
#: application acknowledging one request as it answers it does so just as the next
#: request arrives: committed on its own, on the loop (twelfth session) or in a
#: thread (before), the acknowledgement held that request back by about a commit
#: (docs/design/performance.md). Removals on an ACK use the same bound
#: (:data:`talos.client.acks.INLINE_REMOVALS`).
INLINE_ACKNOWLEDGEMENTS: Final = 8
#: How long (seconds, on the event loop's clock) a small acknowledge() waits for a
#: commit of the agent state to carry it (typically the receipt of the next
#: message) before it commits alone.
ACKNOWLEDGE_LINGER: Final = 0.002


class InboxReader:
    """The application's side of the inbox."""

    def __init__(self, state: AgentState, clock: Clock, closed: Callable[[], bool]) -> None:
        self._state, self._clock, self._closed = state, clock, closed
        #: Set whenever the inbox may have grown (or the client closes).
        self.ready = asyncio.Event()
        #: receive(auto_ack=True) calls waiting for a message, oldest first.
        self.takers: collections.deque[asyncio.Future[InboxMessage]] = collections.deque()
        #: The last inbox sequence number receive(auto_ack=False) returned, and,
        #: once it has read the inbox to its end, the rows written since, in memory.
        self._cursor = -1
        #: acknowledge() commits running in worker threads (close() waits for them).
        self._commits: set[asyncio.Future[Any]] = set()
        #: Small acknowledge() calls waiting for a commit to carry them: woken by every
        #: durable commit of the agent state (see _ride).
        self._riders: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.read_ahead: collections.deque[tuple[int, InboxMessage]] | None = None
        self._read_ahead_bytes = 0
        #: Makes a request able to reply (``Replies.attach``, set once request/reply is up).
        self.attach: Callable[[Message], Message] = lambda message: message

    async def receive(self, wait: float | None, *, auto_ack: bool) -> Message | None:
        """See :meth:`TalosClient.receive`.

        Raises:
            InvalidArgument: a ``wait`` (receive's ``timeout``) negative, NaN or infinite.
        """
        seconds = None if wait is None else check_wait(wait)
        message = await self._next(seconds, auto_ack=auto_ack)
        return None if message is None else self.attach(message)

    async def _next(self, seconds: float | None, *, auto_ack: bool) -> Message | None:
        deadline = None if seconds is None else self._clock.monotonic() + seconds
        while not self._closed():
            if auto_ack:
                taken = self._state.take(1)
                if taken:
                    self.read_ahead = None  # it may hold the row just taken
                    return to_message(taken[0])
            elif self.read_ahead is not None:
                if self.read_ahead:
                    seq, item = self.read_ahead.popleft()
                    self._read_ahead_bytes -= len(item.data)
                    self._cursor = seq
                    return to_message(item, seq)
            else:
                for seq, item in self._state.inbox(after=self._cursor, limit=1):
                    self._cursor = seq
                    return to_message(item, seq)
                # Everything after the cursor is read: from now on the receive commits
                # hand their rows over in memory too (see follow).
                self.read_ahead = collections.deque()
                self._read_ahead_bytes = 0
            self.ready.clear()
            if deadline is not None and deadline - self._clock.monotonic() <= 0:
                return None
            if auto_ack:
                handed = await self._wait_as_taker(deadline)
                if handed is not None:
                    return to_message(handed)
                continue
            if deadline is None:
                await self.ready.wait()
                continue
            ready = asyncio.ensure_future(self.ready.wait())
            try:
                await timing.wait_first(self._clock, deadline, [ready])
            finally:
                ready.cancel()
        return None

    async def _wait_as_taker(self, deadline: float | None) -> InboxMessage | None:
        """Wait until ``deadline`` for the next receive commit to hand over a message
        (taken in that commit: no separate removal), or for the inbox to fill."""
        taker: asyncio.Future[InboxMessage] = asyncio.get_running_loop().create_future()
        self.takers.append(taker)
        ready = asyncio.ensure_future(self.ready.wait())
        waiters: set[asyncio.Future[Any]] = {taker, ready}
        try:
            await timing.wait_first(self._clock, deadline, waiters)
        except asyncio.CancelledError:
            if taker.done() and not taker.cancelled():
                # Taken by the receive commit for this call, which will not return it:
                # back into the durable inbox, for the next call.
                try:
                    seqs = self._state.return_to_inbox([taker.result()])
                    self.follow(seqs, [taker.result()])
                except TalosError as exc:
                    _log.error(
                        "a received message handed to a cancelled receive() could not be "
                        "put back in the inbox: %s",
                        exc,
                        extra={
                            "event": "message_lost",
                            "message_id": taker.result().message_id.hex(),
                        },
                    )
                self.ready.set()
            raise
        finally:
            ready.cancel()
            if not taker.done():
                taker.cancel()
            with contextlib.suppress(ValueError):
                self.takers.remove(taker)
        return None if taker.cancelled() else taker.result()

    def waiting_takers(self, most: int) -> list[asyncio.Future[InboxMessage]]:
        """Up to ``most`` receive() calls waiting now, oldest first."""
        while self.takers and self.takers[0].done():
            self.takers.popleft()
        return [taker for taker in self.takers if not taker.done()][:most]

    def follow(self, seqs: list[int], messages: list[InboxMessage]) -> None:
        """Messages just written at the end of the inbox: when receive(auto_ack=False)
        has read everything before them, it gets these from memory (they are in the
        inbox, durable, until acknowledged) instead of reading and decrypting the
        rows back. Past READ_AHEAD_LIMIT messages or READ_AHEAD_BYTES unread it lets
        them go and reads the inbox again."""
        ahead = self.read_ahead
        if ahead is None:
            return
        size = self._read_ahead_bytes + sum(len(message.data) for message in messages)
        if (
            len(seqs) != len(messages)
            or len(ahead) + len(seqs) > READ_AHEAD_LIMIT
            or size > READ_AHEAD_BYTES
        ):
            self.read_ahead = None
            return
        ahead.extend(zip(seqs, messages, strict=True))
        self._read_ahead_bytes = size

    async def acknowledge(self, *messages: Message) -> None:
        """See :meth:`TalosClient.acknowledge`: one commit, in a worker thread unless
        fewer than :data:`INLINE_ACKNOWLEDGEMENTS` messages."""
        seqs = []
        for message in messages:
            if not isinstance(message, Message) or message.inbox_seq is None:
                raise LocalProtocolError(
                    "only messages received with auto_ack=False are acknowledged"
                )
            seqs.append(message.inbox_seq)
        if not seqs:
            return
        if len(seqs) < INLINE_ACKNOWLEDGEMENTS:
            await self._ride(seqs)
        else:
            commit = asyncio.ensure_future(asyncio.to_thread(self._state.acknowledge, *seqs))
            self._commits.add(commit)
            commit.add_done_callback(self._commits.discard)
            await asyncio.shield(commit)

    async def _ride(self, seqs: list[int]) -> None:
        """Acknowledge ``seqs`` with the next commit of the agent state, or alone after
        :data:`ACKNOWLEDGE_LINGER`; return once that commit is durable.

        An application that answers a request and then acknowledges it does so as
        the next request arrives: the receive commit of that request carries the
        acknowledgement, which costs neither a commit of its own nor the time the
        request would wait behind one. Until it returns nothing is promised (a
        crash then delivers the messages again, as at least once allows); if it
        raises or is cancelled before a commit carried it, nothing is removed.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._state.on_commit(self._committed)
        key = self._state.acknowledge_later(*seqs)
        # On the event loop's clock, not the agent's: the linger is about the disk,
        # and a test clock that stands still must not hold an acknowledgement back.
        loop = self._loop
        deadline = loop.time() + ACKNOWLEDGE_LINGER
        try:
            while True:
                # Listening before looking: a commit after the look wakes this call,
                # one before it shows in the look.
                woken = loop.create_future()
                self._riders.add(woken)
                try:
                    if not self._state.is_waiting(key):
                        break
                    if loop.time() >= deadline:
                        self._state.flush()  # alone: no other commit came
                        continue
                    timer = loop.call_at(deadline, _resolve, woken)
                    try:
                        await woken
                    finally:
                        timer.cancel()
                finally:
                    self._riders.discard(woken)
        finally:
            self._state.withdraw(key)  # not carried by a commit: not written

    def _committed(self) -> None:
        """A commit of the agent state is durable (called in the thread that made it,
        under the state's lock): the waiting acknowledge() calls look again."""
        if not self._riders or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake_riders()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._wake_riders)

    def _wake_riders(self) -> None:
        for woken in list(self._riders):
            _resolve(woken)

    async def stop(self) -> None:
        """Wait for acknowledge() commits running in worker threads."""
        if self._commits:
            await asyncio.wait(set(self._commits))

    async def messages(self, *, auto_ack: bool = True) -> AsyncIterator[Message]:
        while not self._closed():
            message = await self.receive(None, auto_ack=auto_ack)
            if message is not None:
                yield message


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def to_message(item: InboxMessage, inbox_seq: int | None = None) -> Message:
    # The stored plaintext is the signed payload: a request says so itself (its
    # ``rq``), also for one received before a restart.
    payload = decode_payload_fields(item.data)
    expires_ms = payload.request_expires_ms
    return Message(
        sender=item.sender,
        message_id=item.message_id.hex(),
        data=payload.data,
        sent_at=item.sent_at_ms / 1000,
        capability_id=item.capability_id,
        inbox_seq=inbox_seq,
        request_expires_at=None if expires_ms is None else expires_ms / 1000,
    )
