"""``request()``: a message that waits for its answer (docs/design/request-reply.md).

The requester's side. :class:`OpenRequests` is the table of requests this
agent waits on, in memory (a request is an in-process call: after a
restart nobody waits any more). The receive path asks it two things:
before decrypting, whether a message without a capability may be a reply
(:meth:`OpenRequests.awaiting`: we wait on its sender), and after, whether
a message that says it is a reply is one (:meth:`OpenRequests.judge`).
The rules, in order (each refusal is answered REJECTED, audited
``REPLY_REFUSED`` and logged ``reply_refused``):

1. *unsolicited*: no request of ours has this id;
2. *foreign*: the request went to another agent than the reply's sender;
3. *second*: the request has its reply already, or the reply's id is not
   the one derived from the request (:func:`~talos.core.message.reply_message_id`),
   which makes every reply but the first a different message;
4. *late*: the requester stopped waiting (``request()`` timed out or was cancelled);
5. *expired*: the request's expiry has passed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Final

from talos.audit import AuditKind
from talos.client import timing
from talos.client.arguments import check_peer_id, check_retry_count, check_timeout
from talos.client.inbox import to_message
from talos.client.sending import Correlation, Sender
from talos.core import incoming, wire
from talos.core.capability import Capability
from talos.core.clock import Clock, time_ms
from talos.core.message import Message, reply_message_id
from talos.core.rng import Rng
from talos.errors import DeliveryTimeout, ReplyTimeout, ScopeMismatch
from talos.storage.agent_state import InboxMessage

__all__ = ["OpenRequests", "Requester", "correlation_refusal", "hand_over"]

_log = logging.getLogger("talos.client")

#: Requests remembered after they ended (answered or given up), to tell a
#: second or late reply from an unsolicited one.
REMEMBERED: Final = 10_000


@dataclass(slots=True)
class _Open:
    peer: str
    expires_ms: int
    future: asyncio.Future[Message]


class OpenRequests:
    """The requests this agent waits on, and those that ended recently."""

    def __init__(self, me: str) -> None:
        self._me = me
        self._open: dict[bytes, _Open] = {}
        self._peers: collections.Counter[str] = collections.Counter()
        #: request id -> (peer, "answered" | "given up"), oldest first.
        self._ended: collections.OrderedDict[bytes, tuple[str, str]] = collections.OrderedDict()

    def open(self, request_id: bytes, peer: str, expires_ms: int) -> asyncio.Future[Message]:
        """Wait for the reply to ``request_id`` (sent to ``peer``)."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._open[request_id] = _Open(peer, expires_ms, future)
        self._peers[peer] += 1
        return future

    def awaiting(self, peer: str) -> bool:
        """Whether a request to ``peer`` waits for its reply."""
        return self._peers[peer] > 0

    def judge(self, sender: str, message_id: bytes, reply_to: bytes, now_ms: int) -> str | None:
        """Why a reply from ``sender`` to ``reply_to`` is refused (rules 1-5), or None."""
        current = self._open.get(reply_to)
        ended = self._ended.get(reply_to)
        peer = current.peer if current is not None else None if ended is None else ended[0]
        if peer is None:
            return "unsolicited"
        if peer != sender:
            return "foreign"
        if (ended is not None and ended[1] == "answered") or message_id != reply_message_id(
            reply_to, self._me
        ):
            return "second"
        if current is None:
            return "late"
        if now_ms > current.expires_ms:
            return "expired"
        return None

    def answer(self, reply_to: bytes, message: Message) -> bool:
        """Hand a committed reply to its waiting ``request()``; False if nobody waits."""
        current = self._open.get(reply_to)
        if current is None or current.future.done():
            return False
        current.future.set_result(message)
        self._end(reply_to, "answered")
        return True

    def waits(self, reply_to: bytes) -> bool:
        current = self._open.get(reply_to)
        return current is not None and not current.future.done()

    def end(self, request_id: bytes) -> None:
        """``request()`` stopped waiting (its reply came, or it gave up)."""
        if request_id in self._open:
            self._end(request_id, "given up")

    def _end(self, request_id: bytes, how: str) -> None:
        current = self._open.pop(request_id)
        self._peers[current.peer] -= 1
        if self._peers[current.peer] <= 0:
            del self._peers[current.peer]
        self._ended[request_id] = (current.peer, how)
        while len(self._ended) > REMEMBERED:
            self._ended.popitem(last=False)


#: Why a reply was refused: the reason a replier reads in its PeerRejected.
REASONS: Final = {
    "unsolicited": "no request of this agent has that id",
    "foreign": "the request was sent to another agent",
    "second": "the request has its reply already (one reply per request)",
    "late": "the requester stopped waiting for it (request() timed out or was cancelled)",
    "expired": "the request's expiry has passed",
}


class Requester:
    """``request()``: send a request, then wait for its reply on the agent's clock."""

    def __init__(self, *, sender: Sender, requests: OpenRequests, clock: Clock, rng: Rng) -> None:
        self._sender, self._requests, self._clock, self._rng = sender, requests, clock, rng

    async def request(
        self,
        peer_id: str,
        data: Any,
        *,
        timeout: float,  # noqa: ASYNC109 -- like send(timeout=...)
        retry_count: int,
        capability: str | Capability | None,
    ) -> Message:
        """See :meth:`TalosClient.request`."""
        peer_id = check_peer_id(peer_id)
        seconds = check_timeout(timeout)
        retry_count = check_retry_count(retry_count)
        started = self._clock.monotonic()
        deadline = started + seconds
        request_id = wire.new_message_id(self._rng)
        expires_ms = time_ms(self._clock) + math.ceil(seconds * 1000)
        reply = self._requests.open(request_id, peer_id, expires_ms)
        sending = asyncio.ensure_future(
            self._sender.send(
                peer_id,
                data,
                timeout=seconds,
                retry_count=retry_count,
                on_failure="raise",
                capability=capability,
                correlation=Correlation(message_id=request_id, request_expires_ms=expires_ms),
            )
        )
        try:
            await timing.wait_first(self._clock, deadline, [sending, reply])
            if not reply.done():
                # Not answered yet: the request's own outcome first (a DeliveryTimeout,
                # PeerRejected, ... says the peer does not have it).
                result = await sending
                await timing.wait_first(self._clock, deadline, [reply])
                if not reply.done():
                    raise self._timeout(peer_id, request_id, result.status, started)
            return reply.result()
        finally:
            if not sending.done():
                sending.cancel()  # queued already: stays queued (its reply is refused as late)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sending  # (its outcome is retrieved either way)
            self._requests.end(request_id)

    def _timeout(
        self, peer: str, request_id: bytes, status: str, started: float
    ) -> DeliveryTimeout | ReplyTimeout:
        waited = self._clock.monotonic() - started
        if status != "delivered":  # offline, or closing: the request waits in the outbox
            return DeliveryTimeout(
                f"request {request_id.hex()} to {peer} not acknowledged within "
                f"{waited:.2f} s (it is queued; a reply after this is refused)",
                waited=waited,
            )
        return ReplyTimeout(
            f"request {request_id.hex()} was delivered to {peer}, but no reply came within "
            f"{waited:.2f} s; a reply after this is refused",
            request_id=request_id.hex(),
            waited=waited,
        )


def correlation_refusal(
    requests: OpenRequests | None,
    envelope: wire.Envelope,
    reply_to: bytes | None,
    now_ms: int,
    *,
    required: bool,
) -> incoming.Refusal | None:
    """The receive path's rule for replies: a reply must answer a request of ours
    (rules 1-5 above); a message let through without a capability as a possible
    reply (``required``: this agent requires capabilities) must be one."""
    if reply_to is None:
        if not required:
            return None
        return incoming.capability_refusal(
            envelope, ScopeMismatch("no capability attached; this agent requires one")
        )
    why: str | None = "unsolicited"
    if requests is not None:
        why = requests.judge(envelope.sender, envelope.message_id, reply_to, now_ms)
    if why is None:
        return None
    return incoming.Refusal(
        wire.ErrorCode.CAPABILITY_DENIED,
        f"reply refused: {REASONS[why]}",
        (AuditKind.REPLY_REFUSED, {"id": envelope.message_id, "re": reply_to, "reason": why}),
        "reply_refused",
    )


def hand_over(requests: OpenRequests | None, reply_to: bytes | None, item: InboxMessage) -> None:
    """Give a committed reply to its request() call. One that stopped waiting in the
    moment since the reply was judged gets nothing: the reply was acknowledged and
    is dropped (logged ``reply_unclaimed``)."""
    if requests is None or reply_to is None:
        return
    message = dataclasses.replace(to_message(item), in_reply_to=reply_to.hex())
    if not requests.answer(reply_to, message):
        _log.info(
            "reply %s from %s came as its request() stopped waiting: dropped",
            item.message_id.hex(),
            item.sender,
            extra={"event": "reply_unclaimed", "peer_id": item.sender},
        )
