"""``send()``: authorize, queue durably, and (when the peer's delivery is idle)
encrypt on the way in (see ARCHITECTURE §5).

Authorize (local capability check) → persist to the outbox together with
its audit entry → encrypt (the new ratchet state is persisted before the
ciphertext leaves) → sign → transmit → wait for the recipient's signed ACK
→ remove from the outbox (with its audit entry). Sends made in the same
event-loop tick share one commit. On the fast path (an idle session on a
link that is open or opening) that one commit also counts the attempt and
stores the advanced ratchet, and the delivery loop transmits at once (once
the link is open). A session still awaiting confirmation takes it too, one
message at a time, each carrying the handshake: so the first message after
``establish_session()`` is committed once, not twice, before it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from talos.audit import AuditKind
from talos.client.arguments import (
    check_expires_in,
    check_peer_id,
    check_retry_count,
    check_timeout,
)
from talos.client.capability_arguments import check_token
from talos.client.delivery import Deliverer
from talos.client.revocations import Capabilities
from talos.client.sessions import Sessions
from talos.core import wire
from talos.core.capability import Capability
from talos.core.clock import Clock, time_ms
from talos.core.delivery import SEND_WINDOW_BYTES, expires_at_ms, window_size
from talos.core.message import encode_payload
from talos.core.rng import Rng
from talos.core.sessions import SessionEntry, encode_record
from talos.errors import (
    DeliveryTimeout,
    DiscoveryError,
    InvalidArgument,
    PeerUnknown,
    TalosError,
)
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.storage.agent_state import AgentState, Enqueue, OutboxItem

_log = logging.getLogger("talos.client")


@dataclass(slots=True)
class _FastSend:
    """One peer's messages encrypted on the send fast path."""

    #: The session they advanced (stored with the enqueue commit), and its handshake.
    entry: SessionEntry
    #: Message id -> (ratchet header, ciphertext).
    sealed: dict[bytes, tuple[bytes, bytes]]


_Through = dict[str, _FastSend]


@dataclass(frozen=True)
class SendResult:
    """What :meth:`TalosClient.send` achieved.

    ``status`` is ``"delivered"`` (the peer's signed ACK arrived) or
    ``"queued"`` (durable in the outbox; follow it with
    :meth:`TalosClient.outcome`). ``message_id`` is hex text, the same as the
    receiver's :attr:`Message.message_id`; :attr:`message_id_bytes` is the id
    on the wire.
    """

    #: ``"delivered"``: the peer's signed ACK arrived; ``"queued"``: durable in the outbox.
    status: Literal["delivered", "queued"]
    #: The message's id, hex text: what :meth:`TalosClient.outcome` and
    #: :meth:`TalosClient.cancel` take, and the receiver's ``Message.message_id``.
    message_id: str
    #: An id for this send, recorded with its ``MESSAGE_SENT`` audit entry.
    trace_id: str

    @property
    def message_id_bytes(self) -> bytes:
        """The message id as the bytes the envelope carries."""
        return bytes.fromhex(self.message_id)


@dataclass(frozen=True)
class Correlation:
    """What makes a message a request or a reply (docs/design/request-reply.md)."""

    #: The message id to use (a request's, chosen by the caller; a reply's, derived).
    message_id: bytes | None = None
    #: A request: until when (Unix ms) a reply is accepted.
    request_expires_ms: int | None = None
    #: A reply: the id of the request it answers.
    reply_to: bytes | None = None
    #: Audit records committed with the message (REPLY_SENT).
    audit: tuple[tuple[str, dict[str, Any], str | None], ...] = ()


class Sender:
    """The application's side of the outbox."""

    def __init__(
        self,
        *,
        agent_id: str,
        state: AgentState,
        sessions: Sessions,
        deliverer: Deliverer,
        capabilities: Capabilities,
        peers: PeerDirectory,
        metrics: AgentMetrics,
        clock: Clock,
        rng: Rng,
        queue_limit: int,
        offline: bool,
        closed: Callable[[], bool],
    ) -> None:
        self._me = agent_id
        self._state, self._sessions, self._deliverer = state, sessions, deliverer
        self._capabilities, self._peers, self._metrics = capabilities, peers, metrics
        self._clock, self._rng = clock, rng
        self._queue_limit, self._offline, self._closed = queue_limit, offline, closed
        #: send() calls waiting for the next group commit of the outbox.
        self._enqueues: list[tuple[Enqueue, asyncio.Future[None]]] = []
        #: Per peer, the send() call that queues next (see _in_call_order).
        self._turns: dict[str, asyncio.Future[None]] = {}
        #: Told (id, peer, expiry ms) of every message queued with an expiry.
        self.on_expiring: Callable[[bytes, str, int], None] | None = None

    async def send(
        self,
        peer_id: str,
        data: Any,
        *,
        timeout: float,  # noqa: ASYNC109 -- the seed's documented send() signature
        retry_count: int,
        on_failure: Literal["queue", "raise"],
        capability: str | Capability | None,
        wait: bool = True,
        expires_in: float | None = None,
        correlation: Correlation | None = None,
    ) -> SendResult:
        """See :meth:`TalosClient.send`; with ``correlation``, a request or a reply
        (:mod:`talos.client.requests`, :mod:`talos.client.replies`)."""
        peer_id = check_peer_id(peer_id)
        timeout = check_timeout(timeout)
        retry_count = check_retry_count(retry_count)
        expires = check_expires_in(expires_in)
        if on_failure not in ("queue", "raise"):
            raise InvalidArgument(f"on_failure must be 'queue' or 'raise', not {on_failure!r}")
        if type(wait) is not bool:
            raise InvalidArgument(f"wait must be True or False, not {wait!r}")
        # Parsed before the look-up: a token that does not decode must not cost a
        # registry request, nor a new peer one of its one-time prekeys.
        given = None if capability is None else check_token(capability)
        link = correlation or Correlation()
        payload = encode_payload(
            data, request_expires_ms=link.request_expires_ms, reply_to=link.reply_to
        )
        started = self._clock.monotonic()
        async with self._in_call_order(peer_id):
            await self._look_up(peer_id)
            token = None
            if link.reply_to is None:  # a reply needs no capability (request-reply.md)
                await self._capabilities.fetch_issuers(peer_id, given)
                token = self._capabilities.for_sending(peer_id, given)
            message_id = link.message_id or wire.new_message_id(self._rng)
            trace_id = self._rng.bytes(8).hex()
            expires_ms = None if expires is None else expires_at_ms(time_ms(self._clock), expires)
            queued = self._submit(
                Enqueue(
                    peer_id,
                    message_id,
                    payload,
                    None if token is None else token.to_bytes(),
                    audit=[
                        (
                            AuditKind.MESSAGE_SENT,
                            {
                                "id": message_id,
                                "sha256": hashlib.sha256(payload).digest(),
                                "size": len(payload),
                                "trace": trace_id,
                            },
                            peer_id,
                        ),
                        *link.audit,
                    ],
                    expires_ms=expires_ms,
                )
            )
        await queued
        result = SendResult("queued", message_id.hex(), trace_id)
        if self._closed():
            return result  # committed by close(); delivered after the next start
        self._metrics.message_sent(len(payload))
        self._deliverer.accepted(message_id, started)
        if expires_ms is not None and self.on_expiring is not None:
            self.on_expiring(message_id, peer_id, expires_ms)
        if self._offline:
            return result
        if not wait:
            self._deliverer.kick(peer_id)
            return result
        acked = self._deliverer.waiter(message_id, peer_id)
        self._deliverer.kick(peer_id)
        deliverer = self._deliverer
        if await deliverer.await_delivery(message_id, acked, timeout, retry_count):
            return SendResult("delivered", result.message_id, trace_id)
        if on_failure == "raise":
            error = self._timeout(peer_id, message_id, timeout, retry_count, started)
            deliverer.give_up(message_id, peer_id, "timeout")
            raise error
        return result

    async def _look_up(self, peer_id: str) -> None:
        """The peer's key log, to check a capability's issuer locally (fetched from
        discovery on first contact, with what the session needs: Sessions.look_up).

        Raises:
            PeerUnknown: every discovery source said no such agent (not offline).
        """
        try:
            if self._offline:
                await self._peers.keylog(peer_id)
            else:
                await self._sessions.look_up(peer_id)
        except PeerUnknown:
            if not self._offline:  # offline: nobody was asked, the message waits
                raise
        except DiscoveryError:
            pass  # a source is down: queued, delivered once the peer is found

    def _timeout(
        self, peer: str, message_id: bytes, timeout: float, retry_count: int, started: float
    ) -> DeliveryTimeout:
        """The DeliveryTimeout of a send() that gave up: what it waited for, for how long
        (on the agent's clock), and the last failure."""
        waited = self._clock.monotonic() - started
        record = self._deliverer.core.get(message_id)
        failures = 0 if record is None else record.failures
        last = None if record is None else record.last_failure
        if failures > retry_count:
            what = f"{failures} attempts failed (retry_count={retry_count})"
        else:
            what = f"no ACK within timeout={timeout:g} s"
        if last is not None:
            detail = f"; last failure: {last}"
        elif record is not None and record.sent_at is not None:
            detail = "; the message was sent and not acknowledged"
        else:
            detail = "; the message was not transmitted (no link or session yet)"
        return DeliveryTimeout(
            f"not delivered to {peer} after {waited:.2f} s: {what}{detail}; "
            "removed from the outbox (on_failure='raise')",
            waited=waited,
            attempts=failures,
            last_failure=last,
        )

    @contextlib.asynccontextmanager
    async def _in_call_order(self, peer_id: str) -> AsyncIterator[None]:
        """One send() call to ``peer_id`` at a time up to its enqueue, in call order.

        Whatever a call awaits before it queues (the peer's key log, fetched
        from discovery on first contact) must not let a later call queue
        first: the outbox order is the delivery order, and it is the order
        of the calls. Each call waits for the previous call to the same peer
        to have queued (or failed); with the key log cached nothing waits.
        """
        previous = self._turns.get(peer_id)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._turns[peer_id] = mine
        try:
            if previous is not None and not previous.done():
                await asyncio.shield(previous)
            yield
        finally:
            mine.set_result(None)
            if self._turns.get(peer_id) is mine:
                del self._turns[peer_id]

    def _submit(self, request: Enqueue) -> asyncio.Future[None]:
        """Queue durably with the next group commit (the sends of this event-loop tick
        share one); await the returned future for the commit.

        A caller cancelled before the commit withdraws its message; after
        it, the message stays queued (like any queued message).

        Raises (from the future):
            QueueFull, LocalProtocolError, AuditFull, StorageError: as
            :meth:`AgentState.enqueue`; nothing of this message was written.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueues.append((request, future))
        if len(self._enqueues) == 1:
            asyncio.get_running_loop().call_soon(self.flush)
        return future

    def flush(self) -> None:
        """Commit the sends of this tick (also called by close())."""
        batch = [(r, f) for r, f in self._enqueues if not f.done()]
        self._enqueues = []
        if not batch:
            return
        requests = [request for request, _ in batch]
        now = self._clock.time()
        try:
            through = self._encrypt_through(requests, now)
        except TalosError as exc:  # the delivery loop encrypts them instead
            _log.warning("send fast path not taken: %s", exc)
            through = {}
        try:
            results = self._state.enqueue_many(
                requests,
                queue_limit=self._queue_limit,
                attempted={peer: encode_record(fast.entry) for peer, fast in through.items()},
                attempt_at=now,
            )
        except Exception as exc:  # handed to every sender in the batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for result in results:
            if isinstance(result, OutboxItem) and result.peer in through:
                try:
                    fast = through[result.peer]
                    self._deliverer.hand_over(
                        result, fast.sealed[result.message_id], now, fast.entry.handshake
                    )
                except TalosError as exc:  # queued: the delivery loop takes it from here
                    _log.warning("send fast path not taken for a message: %s", exc)
        # The delivery loops first: woken before the send() calls, they transmit the
        # frames in the next turn of the event loop, ahead of the callers' bookkeeping.
        for peer in through:
            self._deliverer.kick(peer)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, OutboxItem):
                future.set_result(None)
            else:
                future.set_exception(result)

    def _encrypt_through(self, requests: list[Enqueue], now: float) -> _Through:
        """The send fast path: encrypt now the messages to peers whose delivery is idle.

        A peer qualifies when its session is established (and not advanced by
        a receive not yet committed), its link is open or being opened,
        everything queued for it is in flight already (so order is kept) and
        the window has room (one message while the session awaits the peer's
        confirmation). Its messages are encrypted here, in order, so that
        queueing them, counting the attempt and persisting the ratchet is one
        commit instead of two.
        """
        if self._offline or self._closed():
            return {}
        wanted: dict[str, list[Enqueue]] = {}
        for request in requests:
            wanted.setdefault(request.peer, []).append(request)
        if self._state.outbox_count() + len(requests) > self._queue_limit:
            return {}  # some may be refused: leave them all to the delivery loop
        through: _Through = {}
        for peer, mine in wanted.items():
            entry = self._sessions.table.for_fast_send(peer)
            window = self._deliverer.core.window(peer)
            if (
                entry is None
                or not self._deliverer.linked(peer)
                or len(window) + len(mine) > window_size(entry.confirmed)
                or window.bytes_in_flight() + sum(len(r.payload) for r in mine) > SEND_WINDOW_BYTES
            ):
                continue
            if self._state.pending(peer, after=window.last_seq(), limit=1):
                continue  # older messages wait for the delivery loop: keep the order
            session = entry.session
            sealed = {r.message_id: session.encrypt(r.payload, now=now) for r in mine}
            through[peer] = _FastSend(entry, sealed)
        return through
