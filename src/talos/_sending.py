"""The send path of :class:`~talos.client.TalosClient` (see ARCHITECTURE §5).

Authorize (local capability check) → persist to the outbox together with
its audit entry → encrypt (the new ratchet state is persisted before the
ciphertext leaves) → sign → transmit → wait for the recipient's signed ACK
→ remove from the outbox (with its audit entry). Failures retry with
exponential backoff and jitter capped at ``reconnect_interval``; what is not
delivered stays queued and is delivered, in order, when the peer returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal

from talos._client_base import ClientBase, InFlight, _session_record
from talos.audit import AuditKind
from talos.core import wire
from talos.core.capability import Capability, CapabilityPolicy, verify
from talos.core.clocksync import offset_from
from talos.core.keylog import IssuerKeys
from talos.core.message import encode_payload
from talos.core.ratchet import Session
from talos.core.revocation import RevocationMode, RevocationPolicy
from talos.errors import (
    CapabilityDenied,
    ConfigurationError,
    DeliveryTimeout,
    DiscoveryError,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    PeerRejected,
    PeerUnreachable,
    ScopeMismatch,
    SessionError,
    TalosError,
    UnsupportedVersion,
)
from talos.storage.agent_state import Enqueue, OutboxItem
from talos.transport import Link

_log = logging.getLogger("talos.client")

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


@dataclass(frozen=True)
class SendResult:
    """What :meth:`TalosClient.send` achieved."""

    status: Literal["delivered", "queued"]
    message_id: str
    trace_id: str


class SendingMixin(ClientBase):
    """Send, queue and deliver messages; handle the peer's ACKs and ERRORs."""

    # -- sending ----------------------------------------------------------------------

    async def send(
        self,
        peer_id: str,
        data: Any,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 -- the seed's documented send() signature
        retry_count: int = 3,
        on_failure: Literal["queue", "raise"] = "queue",
        capability: str | Capability | None = None,
    ) -> SendResult:
        """Send ``data`` (bytes, str or JSON-able) to ``peer_id``; durable before it returns.

        ``timeout`` bounds the whole call; within it up to ``retry_count``
        retries follow the backoff schedule. Then ``on_failure="queue"``
        leaves the message queued for background delivery (status
        ``"queued"``), ``"raise"`` removes it and raises.

        Raises:
            CapabilityDenied: the capability to attach is invalid (nothing sent or queued).
            QueueFull: ``queue_limit`` messages are queued already (nothing queued).
            PeerRejected: the peer refused the message, with its signed reason.
            DeliveryTimeout: not delivered in time with ``on_failure="raise"``.
            LocalProtocolError: ``data`` cannot be encoded.
        """
        if on_failure not in ("queue", "raise"):
            raise ConfigurationError("on_failure must be 'queue' or 'raise'")
        payload = encode_payload(data)
        with contextlib.suppress(PeerNotFound, DiscoveryError):
            await self._peers.keylog(peer_id)  # to check the capability's issuer locally
        token = self._capability_for(peer_id, capability)
        message_id = wire.new_message_id(self._rng)
        trace_id = secrets.token_hex(8)
        await self._enqueue(
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
                    )
                ],
            )
        )
        result = SendResult("queued", message_id.hex(), trace_id)
        if self._closed:
            return result  # committed by close(); delivered after the next start
        self.metrics.message_sent(len(payload))
        self.metrics.set_queue_depth(self.queue_depth())
        if self._offline:
            return result
        acked = self._acks.setdefault(message_id, asyncio.get_running_loop().create_future())
        self._kick(peer_id)
        acked.add_done_callback(_retrieve)
        if await self._await_delivery(message_id, acked, timeout, retry_count):
            return SendResult("delivered", result.message_id, trace_id)
        self._failures.pop(message_id, None)
        if on_failure == "raise":
            await self._give_up(message_id, peer_id, "timeout")
            raise DeliveryTimeout(
                f"not delivered to {peer_id} within {timeout:g} s and {retry_count} retries"
            )
        return result

    async def _enqueue(self, request: Enqueue) -> None:
        """Queue durably; sends made in the same event-loop tick share one commit.

        A caller cancelled before the commit withdraws its message; after
        it, the message stays queued (like any queued message).

        Raises:
            QueueFull, LocalProtocolError, AuditFull, StorageError: as
            :meth:`AgentState.enqueue`; nothing of this message was written.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueues.append((request, future))
        if len(self._enqueues) == 1:
            asyncio.get_running_loop().call_soon(self._flush_enqueues)
        await future

    def _flush_enqueues(self) -> None:
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
                attempted={
                    peer: _session_record(session, None) for peer, (session, _) in through.items()
                },
                attempt_at=now,
            )
        except Exception as exc:  # handed to every sender in the batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, OutboxItem) and result.peer in through:
                try:
                    self._hand_over(result, through[result.peer][1][result.message_id], now)
                except TalosError as exc:  # queued: the delivery loop takes it from here
                    _log.warning("send fast path not taken for a message: %s", exc)
            if future.done():
                continue
            if isinstance(result, OutboxItem):
                future.set_result(None)
            else:
                future.set_exception(result)
        for peer in through:
            self._kick(peer)

    def _encrypt_through(
        self, requests: list[Enqueue], now: float
    ) -> dict[str, tuple[Session, dict[bytes, tuple[bytes, bytes]]]]:
        """The send fast path: encrypt now the messages to peers whose delivery is idle.

        A peer qualifies when its session is established and acknowledged,
        its link is open, everything queued for it is in flight already (so
        order is kept) and the window has room. Its messages are encrypted
        here, in order, so that queueing them, counting the attempt and
        persisting the ratchet is one commit instead of two. Returns, per
        peer, the advanced session and each message's (header, ciphertext).
        """
        if self._offline or self._closed:
            return {}
        wanted: dict[str, list[Enqueue]] = {}
        for request in requests:
            wanted.setdefault(request.peer, []).append(request)
        if self.queue_depth() + len(requests) > self._queue_limit:
            return {}  # some may be refused: leave them all to the delivery loop
        through: dict[str, tuple[Session, dict[bytes, tuple[bytes, bytes]]]] = {}
        for peer, mine in wanted.items():
            current = self._sessions.get(peer)
            link = self._links.get(peer)
            inflight = self._inflight.setdefault(peer, {})
            if (
                current is None
                or current[1] is not None
                or peer in self._staged_sessions
                or link is None
                or not link.is_open
                or len(inflight) + len(mine) > SEND_WINDOW
                or _bytes_in_flight(inflight) + sum(len(r.payload) for r in mine)
                > SEND_WINDOW_BYTES
            ):
                continue
            after = max((seq for seq, _, _ in inflight.values()), default=None)
            if self._state.pending(peer, after=after, limit=1):
                continue  # older messages wait for the delivery loop: keep the order
            session = current[0]
            through[peer] = (
                session,
                {r.message_id: session.encrypt(r.payload, now=now) for r in mine},
            )
        return through

    def _hand_over(self, item: OutboxItem, sealed: tuple[bytes, bytes], now: float) -> None:
        """Sign a fast-path message (its ratchet is durable) and give it to the delivery
        loop to transmit, as in flight."""
        header, ciphertext = sealed
        frame = self._seal_message(item, header, ciphertext, None)
        loop = asyncio.get_running_loop()
        self._acks.setdefault(item.message_id, loop.create_future())
        self._nacks.setdefault(item.message_id, asyncio.Event()).clear()
        self._sent_at[item.message_id] = now
        self._inflight.setdefault(item.peer, {})[item.message_id] = (
            item.seq,
            loop.time() + ACK_TIMEOUT,
            len(item.payload),
        )
        self._outgoing.setdefault(item.peer, []).append((item.message_id, frame))

    async def _await_delivery(
        self, message_id: bytes, acked: asyncio.Future[None], seconds: float, retry_count: int
    ) -> bool:
        """Wait for the ACK until ``seconds`` pass or more than ``retry_count`` attempts failed.

        Raises:
            PeerRejected: the peer refused the message.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            if acked.done():
                acked.result()  # raises the peer's refusal
                return True
            if self._failures.get(message_id, 0) > retry_count:
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            # Woken by the ACK, or by any failed attempt (rare) to look at the count
            # again: no polling, which cost thousands of wake-ups a second when
            # thousands of send() calls wait at once.
            tick = self._failure_tick
            if tick is None or tick.done():
                tick = self._failure_tick = loop.create_future()
            await asyncio.wait(
                (acked, tick), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )

    def _capability_for(self, peer: str, given: str | Capability | None) -> Capability | None:
        """The token to attach: the one given, else a held one for message.send to ``peer``.

        Raises:
            CapabilityDenied: the token does not authorize sending to ``peer`` now.
            MalformedFrame: ``given`` is not a token.
        """
        if isinstance(given, str):
            given = Capability.from_text(given)
        candidates = [given] if given is not None else self._held_tokens(peer)
        denial: CapabilityDenied | None = None
        for token in candidates:
            try:
                self._check_token(token, audience=peer, holder=self.agent_id)
            except CapabilityDenied as exc:
                denial = exc
                continue
            return token
        if given is not None and denial is not None:
            raise denial
        return None

    def _held_tokens(self, peer: str) -> list[Capability]:
        assert self._tokens is not None  # noqa: S101 -- open while the client is
        tokens = []
        for data in self._tokens.held():
            with contextlib.suppress(MalformedFrame, UnsupportedVersion):
                token = Capability.from_bytes(data)
                if token.audience == peer:
                    tokens.append(token)
        return tokens

    def _check_token(self, token: Capability, *, audience: str, holder: str) -> None:
        """Verify ``token`` for sending to ``audience`` as ``holder``.

        The resource is the recipient's inbox, ``inbox/<audience>``. A token
        is only good for its audience if the audience issued its root: nobody
        can authorize themselves to write to someone else's inbox.

        Raises:
            CapabilityDenied: it does not authorize the message now.
        """
        root = token.chain()[0]
        if root.issuer != audience:
            raise ScopeMismatch(f"capability chain starts at {root.issuer}, not at {audience}")
        now = self._clock.time()
        # This agent's own revocation list is the authority: always current.
        self._revocations.mark_synced(self.agent_id, now)
        keys = IssuerKeys(
            [
                log
                for a in {token.issuer for token in token.chain()}
                if (log := self._peers.known_log(a)) is not None
            ]
        )
        policy = CapabilityPolicy(
            audience=audience,
            revocation=(
                self._revocation_policy
                if audience == self.agent_id
                else RevocationPolicy(mode=RevocationMode.OFFLINE)
            ),
        )
        verify(
            token,
            action="message.send",
            resource=f"inbox/{audience}",
            now=now,
            revocations=self._revocations,
            policy=policy,
            keys=keys,
            holder=holder,
        )

    def _kick(self, peer: str) -> None:
        """Make sure a delivery loop runs for ``peer`` and wake it."""
        if self._offline or self._closed:
            return
        self._wakeups.setdefault(peer, asyncio.Event()).set()
        task = self._flushers.get(peer)
        if task is None or task.done():
            self._flushers[peer] = asyncio.create_task(self._deliver_loop(peer))

    async def _deliver_loop(self, peer: str) -> None:
        """Deliver ``peer``'s queue in order, retrying with backoff until it is empty.

        A sliding window: up to :meth:`_window_size` messages are in flight
        (transmitted, not yet acknowledged); as ACKs free room, the next
        messages are encrypted and transmitted, a quarter window or more at a
        time so that each transmission's commit serves several messages. A
        refusal to decrypt, a dropped link or a missing ACK ends the window:
        after the backoff everything still queued is sent again from the
        oldest (the receiver answers DUPLICATE for what it already has).
        """
        attempt = 0
        wake = self._wakeups.setdefault(peer, asyncio.Event())
        inflight = self._inflight.setdefault(peer, {})
        while not self._closed:
            wake.clear()
            head: bytes | None = next(iter(inflight), None)
            try:
                outgoing = self._outgoing.pop(peer, None)
                if outgoing:  # encrypted by the send fast path, in flight already
                    link = self._links.get(peer)
                    if link is None or not link.is_open:
                        raise PeerUnreachable(f"the connection to {peer} closed")
                    for message_id, frame in outgoing:
                        if message_id in self._acks:  # not given up or refused meanwhile
                            await link.send(frame)
                if self._settle_inflight(peer, inflight):
                    attempt = 0
                window = self._window_size(peer)
                room = window - len(inflight)
                if room > 0 and (not inflight or room >= max(1, window // 4)):
                    after = max((seq for seq, _, _ in inflight.values()), default=None)
                    items = _within_bytes(
                        self._state.pending(peer, after=after, limit=room),
                        SEND_WINDOW_BYTES - _bytes_in_flight(inflight),
                        at_least_one=not inflight,
                    )
                    if items:
                        head = head or items[0].message_id
                        if await self._transmit(peer, items, inflight):
                            continue
                if not inflight:
                    # Nothing to send, or only messages whose ACK is being committed:
                    # an ACK, a refusal or a new message wakes this loop.
                    await wake.wait()
                    continue
                await self._await_progress(peer, wake, inflight)
            except TalosError as exc:
                inflight.clear()
                self._outgoing.pop(peer, None)  # still queued: encrypted again on retry
                if head is None:
                    pending = self._state.pending(peer, limit=1)
                    head = pending[0].message_id if pending else None
                if head is not None:
                    # Counted per message for send(retry_count=...): in order, the
                    # message that failed is the oldest one this attempt was about.
                    self._failures[head] = self._failures.get(head, 0) + 1
                    if self._failure_tick is not None and not self._failure_tick.done():
                        self._failure_tick.set_result(None)  # send() calls look again
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                level = logging.INFO if attempt < 5 else logging.WARNING
                _log.log(
                    level,
                    "delivery to %s failed (%s); retry in %.2f s",
                    peer,
                    exc,
                    delay,
                    extra={"event": "delivery_retry", "peer_id": peer, "attempt": attempt},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)

    def _window_size(self, peer: str) -> int:
        """How many messages may be in flight to ``peer``: one until the peer holds
        the session (each X3DH initial message would start a new one), then SEND_WINDOW."""
        current = self._sessions.get(peer)
        return SEND_WINDOW if current is not None and current[1] is None else 1

    def _settle_inflight(self, peer: str, inflight: InFlight) -> bool:
        """Forget in-flight messages that are done (acknowledged, refused or given up);
        True if any was.

        Raises:
            SessionError: the peer could not decrypt or accept one yet (retried).
            DeliveryTimeout: one waited longer than ACK_TIMEOUT for its ACK.
        """
        done = [
            message_id
            for message_id in inflight
            if self._being_removed(message_id)
            or (future := self._acks.get(message_id)) is None
            or future.done()
        ]
        for message_id in done:
            del inflight[message_id]
        now = asyncio.get_running_loop().time()
        for message_id, (_, deadline, _) in inflight.items():
            nack = self._nacks.get(message_id)
            if nack is not None and nack.is_set():
                raise SessionError(f"{peer} could not decrypt or accept a message yet; retrying")
            if now >= deadline:
                raise DeliveryTimeout(f"no ACK from {peer} within {ACK_TIMEOUT:g} s")
        return bool(done)

    async def _await_progress(self, peer: str, wake: asyncio.Event, inflight: InFlight) -> None:
        """Wait for news about ``peer`` (an ACK, an ERROR, a new message) or the
        oldest ACK deadline.

        Raises:
            PeerUnreachable: the connection dropped with messages in flight.
        """
        link = self._links.get(peer)
        if link is None or not link.is_open:
            raise PeerUnreachable(f"the connection to {peer} closed before the ACKs")
        loop = asyncio.get_running_loop()
        timeout = max(0.0, min(deadline for _, deadline, _ in inflight.values()) - loop.time())
        woken = asyncio.ensure_future(wake.wait())
        dropped = asyncio.ensure_future(link.closed.wait())
        try:
            await asyncio.wait(
                {woken, dropped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            woken.cancel()
            dropped.cancel()
        if dropped.done() and not dropped.cancelled():
            raise PeerUnreachable(f"the connection to {peer} closed before the ACKs")

    async def _transmit(self, peer: str, items: list[OutboxItem], inflight: InFlight) -> int:
        """Encrypt ``items`` (one commit), transmit them back to back and note them in
        flight; returns how many were transmitted.

        Raises:
            PeerUnreachable, DiscoveryError, SessionError: no link or session (retried).
        """
        loop = asyncio.get_running_loop()
        items = [
            item
            for item in items
            if not self._being_removed(item.message_id)
            and not self._acks.setdefault(item.message_id, loop.create_future()).done()
        ]
        if not items:
            return 0
        link = await self._link(peer)
        # Only what is still queued when the attempts commit is sent (a message given
        # up or refused since the queue was read is not).
        sealed = await self._encrypt(peer, items)
        for gone in {item.message_id for item in items} - {item.message_id for item, _ in sealed}:
            self._acks.pop(gone, None)  # nobody waits on it any more
        deadline = loop.time() + ACK_TIMEOUT
        for item, frame in sealed:
            self._nacks.setdefault(item.message_id, asyncio.Event()).clear()
            self._sent_at[item.message_id] = self._clock.time()
            inflight[item.message_id] = (item.seq, deadline, len(item.payload))
            await link.send(frame)
        return len(sealed)

    async def _encrypt(self, peer: str, items: list[OutboxItem]) -> list[tuple[OutboxItem, bytes]]:
        """Encrypt and sign ``items`` for ``peer``; the advanced ratchet and the attempts
        are durable (one commit) before any of the frames is returned. Items no longer
        queued by then (e.g. given up while a session was opened) are left out."""
        current = self._session(peer)
        if current is None:
            await self.establish_session(peer)
            current = self._session(peer)
            if current is None:
                raise SessionError(f"no session with {peer}")
        session, x3dh = current
        now = self._clock.time()
        sealed = [session.encrypt(item.payload, now=now) for item in items]
        # Persist the advanced ratchet (with the attempts) before a ciphertext leaves.
        counted = set(
            self._state.record_attempts(
                peer,
                [item.message_id for item in items],
                now,
                session=_session_record(session, x3dh),
            )
        )
        if x3dh is not None:
            for item in items:  # an ACK to these confirms this handshake, no other
                self._handshake_of[item.message_id] = x3dh
        return [
            (item, self._seal_message(item, header, ciphertext, x3dh))
            for item, (header, ciphertext) in zip(items, sealed, strict=True)
            if item.message_id in counted
        ]

    def _seal_message(
        self, item: OutboxItem, header: bytes, ciphertext: bytes, x3dh: bytes | None
    ) -> bytes:
        return wire.seal(
            wire.Envelope(
                type=wire.EnvelopeType.INITIAL if x3dh else wire.EnvelopeType.MESSAGE,
                message_id=item.message_id,
                sender=self.agent_id,
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
            self._identity.signing_key,
        )

    async def _link(self, peer: str) -> Link:
        link = self._links.get(peer)
        if link is not None and link.is_open:
            return link
        record = await self._peers.endpoint(peer)
        assert self._transport is not None  # noqa: S101 -- open while the client is
        try:
            link = await self._transport.connect(record.endpoint)
        except PeerUnreachable:
            record = await self._peers.endpoint(peer, refresh=True)
            link = await self._transport.connect(record.endpoint)
        link.peer = peer
        self._links[peer] = link
        await self._offer_revocations(link, peer)
        return link

    async def _give_up(self, message_id: bytes, peer: str, reason: str) -> None:
        self._state.remove(
            message_id,
            audit=[(AuditKind.DELIVERY_FAILED, {"id": message_id, "reason": reason}, peer)],
        )
        self._nacks.pop(message_id, None)
        self._failures.pop(message_id, None)
        self._sent_at.pop(message_id, None)
        self._handshake_of.pop(message_id, None)
        future = self._acks.pop(message_id, None)
        if future is not None and not future.done():
            future.cancel()

    def _queued_for(self, ref: bytes | None, peer: str) -> bool:
        """Whether ``ref`` is a message we queued for ``peer`` and still wait on."""
        if ref is None:
            return False
        try:
            return self._state.is_queued_for(ref, peer)
        except LocalProtocolError:
            return False  # not an id (or peer id) this agent could have queued

    def _on_ack(self, envelope: wire.Envelope) -> None:
        """Note every id ``envelope`` acknowledges that we queued for its sender and
        still wait on; they are removed from the outbox together (see _remove_acked)."""
        fresh = [ref for ref in envelope.ref_ids or () if not self._being_removed(ref)]
        try:
            queued = self._state.queued_for(envelope.sender, fresh) if fresh else set()
        except LocalProtocolError:
            queued = set()  # not a peer id this agent could have queued for
        for ref in fresh:
            if ref in queued:  # ours, for the peer that acknowledges it, not yet removed
                self._removing[ref] = envelope
        if self._removing and not self._closed and (self._remover is None or self._remover.done()):
            self._remover = asyncio.create_task(self._removal_loop())

    def _being_removed(self, ref: bytes) -> bool:
        return ref in self._removing or ref in self._removal_running

    async def _removal_loop(self) -> None:
        """Remove acknowledged messages from the outbox, one commit per batch of ACKs.

        The commit runs in a worker thread (LMDB releases the GIL while it
        syncs), so frames that arrive meanwhile are verified and decrypted
        instead of waiting behind it; ACKs that arrive meanwhile form the next
        batch. Senders are released once their removal is durable.
        """
        while self._removing:
            acks, self._removing = self._removing, {}
            self._removal_running = acks
            commit = asyncio.ensure_future(asyncio.to_thread(self._remove_acked, acks))
            try:
                # A thread cannot be cancelled: whatever happens to this task, the
                # outcome of its commit is acted on once it is known (wait() neither
                # raises the commit's error nor cancels it).
                await asyncio.wait({commit})
            except asyncio.CancelledError:
                commit.add_done_callback(functools.partial(self._removal_done, acks))
                raise
            self._removal_done(acks, commit)

    def _removal_done(self, acks: dict[bytes, wire.Envelope], commit: asyncio.Future[bool]) -> None:
        self._removal_running = {}
        if commit.cancelled():
            removed = False
        elif (error := commit.exception()) is not None:
            _log.error("removing acknowledged messages failed: %r", error)
            removed = False
        else:
            removed = commit.result()
        self._after_removal(acks, removed=removed)

    def _flush_acks(self) -> None:
        """Remove the acknowledged messages not yet removed now, on this thread (close)."""
        acks, self._removing = self._removing, {}
        if acks:
            self._after_removal(acks, removed=self._remove_acked(acks))

    def _remove_acked(self, acks: dict[bytes, wire.Envelope]) -> bool:
        """One commit removing ``acks`` from the outbox with their audit entries."""
        try:
            self._state.remove_many(
                [
                    (
                        ref,
                        [
                            (
                                AuditKind.MESSAGE_DELIVERED,
                                {"id": ref, "status": int(ack.status or 0)},
                                ack.sender,
                            )
                        ],
                    )
                    for ref, ack in acks.items()
                ]
            )
        except TalosError as exc:
            # Still queued: the retry is answered DUPLICATE and removal is tried again.
            _log.warning("acknowledged messages not removed from the outbox: %s", exc)
            return False
        return True

    def _after_removal(self, acks: dict[bytes, wire.Envelope], *, removed: bool) -> None:
        """Release the senders of removed messages; wake the delivery loops either way."""
        if not removed:
            # Still queued, but below what the delivery loops have in flight: they
            # start again from the oldest message (the peer answers DUPLICATE).
            peers = {ack.sender for ack in acks.values()}
            for peer in peers:
                self._inflight.get(peer, {}).clear()
                self._outgoing.pop(peer, None)
            self._wake(peers)
            return
        envelopes: dict[int, tuple[wire.Envelope, list[bytes]]] = {}
        for ref, ack in acks.items():
            self._release(ref)
            envelopes.setdefault(id(ack), (ack, []))[1].append(ref)
        for ack, refs in envelopes.values():
            try:
                self._delivered(ack, refs)
            except TalosError as exc:  # removed and released already; the rest goes on
                _log.warning("after an ACK from %s: %s", ack.sender, exc)
        self._wake({ack.sender for ack, _ in envelopes.values()})
        self.metrics.set_queue_depth(self.queue_depth())

    def _wake(self, peers: set[str]) -> None:
        for peer in peers:
            wake = self._wakeups.get(peer)
            if wake is not None:
                wake.set()

    def _release(self, ref: bytes) -> None:
        """Release the sender of ``ref`` (its removal is committed)."""
        self._failures.pop(ref, None)
        self._nacks.pop(ref, None)
        future = self._acks.pop(ref, None)
        if future is not None and not future.done():
            future.set_result(None)
        self.metrics.message_delivered()

    def _delivered(self, envelope: wire.Envelope, refs: list[bytes]) -> None:
        """Note what an ACK (for ``refs``, removed and released) proves about the
        session and the peer's clock."""
        self._clock_sample(envelope, refs)
        handshakes = {self._handshake_of.pop(ref, None) for ref in refs}
        current = self._sessions.get(envelope.sender)
        if current is not None and current[1] is not None:
            self._settle()  # a staged receive may have advanced (and confirmed) the session
            current = self._sessions.get(envelope.sender)
        # Only an ACK to a message sent with this session's X3DH header proves the peer
        # holds it (the session may have been reset and opened again since).
        if current is not None and current[1] is not None and current[1] in handshakes:
            # The peer holds the session now: later messages need no X3DH header.
            session = current[0]
            self._state.put_session(envelope.sender, _session_record(session, None))
            self._sessions[envelope.sender] = (session, None)

    def _clock_sample(self, envelope: wire.Envelope, refs: list[bytes]) -> None:
        """Estimate the peer's clock offset from a signed ACK to messages we timed
        (the one sent last bounds the offset most tightly)."""
        times = [t for ref in refs if (t := self._sent_at.pop(ref, None)) is not None]
        if not times:
            return
        sent = max(times)
        theirs = envelope.timestamp_ms / 1000
        best = self._peer_clocks.add(
            envelope.sender, offset_from(sent, theirs, theirs, self._clock.time())
        )
        self._warn_clock(envelope.sender, -best.offset)
        if self.registry_offset is None:
            offsets = sorted(-s.offset for s in self._peer_clocks.estimates().values())
            self.metrics.set_clock_offset(offsets[len(offsets) // 2])

    async def _on_error(self, envelope: wire.Envelope) -> None:
        ref, peer = envelope.ref_id, envelope.sender
        if ref is None or not self._queued_for(ref, peer):
            return
        if envelope.error_code is wire.ErrorCode.UNAVAILABLE:
            nack = self._nacks.get(ref)
            if nack is not None:
                nack.set()  # not a refusal: the delivery task retries with backoff
                self._wake({peer})
            return
        if envelope.error_code is wire.ErrorCode.DECRYPT_FAILED:
            now = self._clock.time()
            if now - self._last_reset.get(peer, -RESET_INTERVAL) >= RESET_INTERVAL:
                self._last_reset[peer] = now
                self._settle()
                self._sessions.pop(peer, None)
                self.metrics.session_reset()
                self._state.drop_session(
                    peer,
                    audit=[(AuditKind.SESSION_RESET, {"reason": "peer could not decrypt"}, peer)],
                )
            nack = self._nacks.get(ref)
            if nack is not None:
                nack.set()  # the waiting delivery retries with a fresh session
                self._wake({peer})
            return
        reason = envelope.reason or envelope.error_code.name if envelope.error_code else "refused"
        self.metrics.message_rejected(envelope.error_code or "other")
        self._state.remove(
            ref,
            audit=[(AuditKind.PEER_REJECTED, {"id": ref, "reason": str(reason)[:200]}, peer)],
        )
        self._nacks.pop(ref, None)
        self._failures.pop(ref, None)
        self._sent_at.pop(ref, None)
        self._handshake_of.pop(ref, None)
        future = self._acks.pop(ref, None)
        if future is not None and not future.done():
            future.set_exception(PeerRejected(f"{peer} refused the message: {reason}"))
        self._wake({peer})


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's outcome as seen (queued sends may be refused much later)."""
    if not future.cancelled():
        future.exception()


def _bytes_in_flight(inflight: InFlight) -> int:
    return sum(size for _, _, size in inflight.values())


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
