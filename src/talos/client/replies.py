"""``message.reply()``: answering a request once (docs/design/request-reply.md).

The replier's side. A request is noted when it is received: its
``REQUEST_RECEIVED`` audit entry (request id, expiry) commits with the
message itself, so after a restart a request still in the inbox can be
answered. ``reply()`` queues the answer under an id derived from the
request (:func:`~talos.core.message.reply_message_id`) with a
``REPLY_SENT`` entry (reply id, request id) in the same commit: the reply
is durable in the outbox until the requester's signed ACK, and the audit
log says the request has its reply. A second ``reply()`` (an at-least-once
application handling the request again after a crash) sends nothing and
returns the first reply's id; a redelivered copy of the request is dropped
by the replay window (the application is not called again) and, if its
reply still waits in the outbox, sends that reply at once.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, Final

from talos.audit import AuditKind, AuditLog
from talos.client.arguments import MAX_EXPIRES_IN, MAX_TIMEOUT
from talos.client.sending import Correlation, Sender, SendResult
from talos.core.clock import Clock, time_ms
from talos.core.message import Message, reply_message_id
from talos.core.replay import DEFAULT_MAX_SKEW_MS
from talos.errors import RequestExpired, TalosError

__all__ = ["Replies"]

#: Requests (and replies) remembered in memory; older ones are looked up in the audit log.
REMEMBERED: Final = 10_000
#: How far before a request's sending time its REQUEST_RECEIVED entry is looked for
#: (the entry is stamped on arrival, which a skewed sender's clock may put earlier).
LOOKBACK_MS: Final = 10 * 60 * 1000
#: Retries of a reply's delivery before it counts as failed (the outbox keeps it
#: until the request's expiry anyway).
REPLY_RETRIES: Final = 10

_Key = tuple[str, bytes]


class Replies:
    """Requests received and the replies sent to them."""

    def __init__(
        self, *, log: AuditLog, sender: Sender, clock: Clock, kick: Callable[[str], None]
    ) -> None:
        self._log, self._sender, self._clock, self._kick = log, sender, clock, kick
        #: Requests sent before this agent started may have been answered before it
        #: too: only for those is the audit log asked (REPLY_SENT); the others are
        #: all in memory.
        self._started_ms = time_ms(clock)
        #: (requester, request id) -> the reply's id.
        self._replied: collections.OrderedDict[_Key, bytes] = collections.OrderedDict()

    def received(self, sender: str, request_id: bytes, expires_ms: int) -> tuple[str, Any, str]:
        """A request arrived: the audit record to commit with it."""
        return (AuditKind.REQUEST_RECEIVED, {"id": request_id, "rq": expires_ms}, sender)

    def attach(self, message: Message) -> Message:
        """``message`` able to :meth:`Message.reply` if it is a request (its payload's
        ``rq``, read by :func:`talos.client.inbox.to_message`: no lookup per message)."""
        if message.request_expires_at is None:
            return message
        replied = self._has_replied(message.sender, message.message_id_bytes, message)
        return dataclasses.replace(message, replied=replied, _replier=self.reply)

    def duplicate(self, sender: str, request_id: bytes) -> None:
        """A copy of a request arrived again: its reply, if still queued, goes now."""
        if (sender, request_id) in self._replied:
            self._kick(sender)

    async def reply(self, message: Message, data: Any) -> SendResult:
        """See :meth:`TalosClient.reply`."""
        requester, request_id = message.sender, message.message_id_bytes
        reply_id = reply_message_id(request_id, requester)
        if self._has_replied(requester, request_id, message):
            return SendResult("queued", reply_id.hex(), "")
        expires_at = message.request_expires_at
        left = 0.0 if expires_at is None else expires_at - self._clock.time()
        if left <= 0:
            raise RequestExpired(
                f"request {message.message_id} from {requester} expired "
                f"{-left:.2f} s ago; its sender no longer waits, nothing was sent"
            )
        # Claimed before the await: a concurrent reply() to the same request sends nothing.
        _remember(self._replied, (requester, request_id), reply_id)
        try:
            result = await self._sender.send(
                requester,
                data,
                # A requester may name an expiry past what send() accepts: the
                # reply is kept for as long as send() allows.
                timeout=min(left, MAX_TIMEOUT),
                retry_count=REPLY_RETRIES,
                on_failure="queue",
                capability=None,
                wait=False,
                expires_in=min(left, MAX_EXPIRES_IN),
                correlation=Correlation(
                    message_id=reply_id,
                    reply_to=request_id,
                    audit=((AuditKind.REPLY_SENT, {"id": reply_id, "re": request_id}, requester),),
                ),
            )
        except TalosError:
            # Refused before anything was queued: it may be tried again. (A cancelled
            # call keeps its claim: its reply may be committed already.)
            del self._replied[(requester, request_id)]
            raise
        return result

    def _has_replied(self, requester: str, request_id: bytes, message: Message) -> bool:
        if (requester, request_id) in self._replied:
            return True
        if not self._before_start(message) and len(self._replied) < REMEMBERED:
            return False  # every reply of this run is in memory (none forgotten yet)
        since = max(0, int(message.sent_at * 1000) - LOOKBACK_MS)
        for entry in self._log.query(kind=AuditKind.REPLY_SENT, peer=requester, since=since):
            if entry.data.get("re") == request_id:
                _remember(self._replied, (requester, request_id), entry.data["id"])
                return True
        return False

    def _before_start(self, message: Message) -> bool:
        # The sender's clock may run ahead of ours by up to the replay window's tolerance.
        return int(message.sent_at * 1000) <= self._started_ms + DEFAULT_MAX_SKEW_MS


def _remember(table: collections.OrderedDict[_Key, Any], key: _Key, value: Any) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > REMEMBERED:
        table.popitem(last=False)
