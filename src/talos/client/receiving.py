"""The receive path (see ARCHITECTURE §5 and :mod:`talos.core.incoming`).

Decode → verify the signature with the sender's verified key log (a frame
that fails is verified again under the sender's newer log, if it rotated,
before it counts: :mod:`talos.client.keylogs`) →
freshness (replay window, clock skew) → capability → decrypt → one
transaction {ratchet state, replay entry, audit entry, inbox message} →
signed ACK → wake the application. Anything refused changes no state and
is answered with a signed ERROR naming the reason (except forgeries, which
are only audited). Messages on an established session are staged and
committed together with whatever else arrives in the same event-loop tick
(:class:`ReceiveBatch`): one fsync for all. Every line a frame can cause
before its signature is verified is rate-limited (:class:`~talos.logs.LimitedLog`),
and a link that keeps sending frames that cannot be decoded (or are for
another agent) is closed by the transport (:meth:`~talos.transport.Link.reject_malformed`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from talos.audit import AuditKind
from talos.client.control import Auditor, Signer
from talos.client.inbox import InboxReader
from talos.client.keylogs import KeyLogs
from talos.client.replies import Replies
from talos.client.requests import OpenRequests, correlation_refusal, hand_over
from talos.client.revocations import Capabilities
from talos.client.sessions import Sessions
from talos.client.witnessing import Witnessing
from talos.core import incoming, wire
from talos.core.clock import Clock, time_ms
from talos.core.clocksync import InstanceTracker
from talos.core.keylog import KeyLog
from talos.core.message import decode_payload_fields
from talos.core.ratchet import Session
from talos.core.ratelimit import RateLimiter
from talos.core.rng import Rng
from talos.core.sessions import SessionEntry, SessionTable, encode_record
from talos.core.x3dh import InitialHeader, PrekeyStore, respond
from talos.errors import (
    CapabilityDenied,
    CryptoError,
    PeerNotFound,
    RemoteProtocolError,
    ScopeMismatch,
    SessionError,
    SignatureInvalid,
    TalosError,
)
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.storage.agent_state import AgentState, InboxMessage, Received
from talos.transport import Link

_log = logging.getLogger("talos.client")

#: Capability-free messages that were not replies, per peer we wait on, before its
#: capability-free messages are refused unread again (burst, then per second).
UNSOLICITED_BURST: Final = 20
UNSOLICITED_RATE: Final = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Staged:
    """A decrypted message waiting for the group commit, and where to ACK it."""

    received: Received
    link: Link
    envelope: wire.Envelope
    #: A reply: the request it answers (handed to its request() at the commit).
    reply_to: bytes | None = None


class ReceiveBatch:
    """Received messages decrypted but not yet committed, the sessions they advanced
    (staged in the :class:`SessionTable`) and their replay ids."""

    def __init__(
        self,
        *,
        table: SessionTable,
        state: AgentState,
        inbox: InboxReader,
        signer: Signer,
        metrics: AgentMetrics,
    ) -> None:
        self._table, self._state, self._inbox = table, state, inbox
        self._signer, self._metrics = signer, metrics
        self._staged: list[_Staged] = []
        self.ids: set[bytes] = set()
        #: The requests this agent waits on (set by talos.client.resources).
        self.requests: OpenRequests | None = None
        #: ACKs of committed batches being sent (close() lets them finish).
        self.acknowledging: set[asyncio.Task[None]] = set()

    def stage(
        self,
        link: Link,
        envelope: wire.Envelope,
        received: Received,
        successor: Session,
        reply_to: bytes | None = None,
    ) -> None:
        """Hold a decrypted message for the next group commit (nothing is output yet).

        Until then ``successor`` is the session later frames from this sender
        are decrypted with (so a batch chains), but nothing else may use it:
        every other reader of sessions settles the batch first (:meth:`settle`).
        """
        self._table.stage(envelope.sender, successor)
        self.ids.add(received.replay_id)
        self._staged.append(_Staged(received, link, envelope, reply_to))
        if len(self._staged) == 1:
            asyncio.get_running_loop().call_soon(self.settle)

    def discard(self) -> None:
        """Forget what is staged: not acknowledged either, so the senders retry."""
        self._staged, self.ids = [], set()
        self._table.discard_staged()

    def settle(self) -> None:
        """Commit the staged receives in one transaction, then acknowledge them.

        If the commit fails nothing is acknowledged and the staged sessions
        are forgotten: the sender retries, and the messages are decrypted
        again from the committed state.
        """
        staged, self._staged = self._staged, []
        sessions = self._table.take_staged()
        self.ids = set()
        if not staged:
            return
        records = {peer: encode_record(SessionEntry(s)) for peer, s in sessions.items()}
        # Replies go to their request() calls, not the inbox: committed as taken, first.
        replies = [s for s in staged if s.reply_to is not None]
        staged = replies + [s for s in staged if s.reply_to is None]
        # Messages for receive() calls already waiting are taken in this same commit
        # (unless older ones wait in the inbox: order is kept).
        takers = self._inbox.waiting_takers(len(staged) - len(replies))
        if takers and self._state.inbox_count():
            takers = []
        try:
            seqs = self._state.commit_receive_many(
                [dataclasses.replace(s.received, session=records[s.received.peer]) for s in staged],
                taken=len(replies) + len(takers),
            )
        except TalosError as exc:
            # Kind and hint go with the line: a full disk (AuditFull, also logged as
            # audit_full by the audit log) must read as one, not as a bare error.
            _log.warning(
                "%d received messages not committed (the senders will retry): %s: %s%s",
                len(staged),
                type(exc).__name__,
                exc,
                f" (hint: {exc.hint})" if exc.hint else "",
            )
            return
        for peer, session in sessions.items():
            self._table.commit(peer, SessionEntry(session))
        # The ACKs first: their task runs in the next turn of the event loop, before
        # the receive() and request() calls woken below (an application that answers
        # at once would otherwise hold the ACK back while it encrypts and commits).
        task = asyncio.create_task(self._acknowledge([(s.link, s.envelope) for s in staged]))
        self.acknowledging.add(task)
        task.add_done_callback(self.acknowledging.discard)
        for reply in replies:
            hand_over(self.requests, reply.reply_to, reply.received.message)
        staged_rest = staged[len(replies) :]
        for taker, item in zip(takers, staged_rest, strict=False):
            taker.set_result(item.received.message)
        self._inbox.follow(seqs, [s.received.message for s in staged_rest[len(takers) :]])
        for item in staged:
            self._metrics.message_received(len(item.received.message.data))

    async def _acknowledge(self, answers: list[tuple[Link, wire.Envelope]]) -> None:
        """ACK committed messages (one signed ACK per link and sender for the whole
        batch), then tell receive() they are there (so an application that stops once
        it has them does not cut the ACKs short)."""
        groups: dict[tuple[int, str], tuple[Link, list[bytes]]] = {}
        for link, envelope in answers:
            groups.setdefault((id(link), envelope.sender), (link, []))[1].append(
                envelope.message_id
            )
        try:
            for (_, sender), (link, ids) in groups.items():
                for start in range(0, len(ids), wire.MAX_ACK_REFS):
                    chunk = ids[start : start + wire.MAX_ACK_REFS]
                    await self._signer.answer(link, sender, chunk, wire.AckStatus.ACCEPTED)
        finally:
            self._inbox.ready.set()


class Receiver:
    """Handles every frame that arrives on any link."""

    def __init__(
        self,
        *,
        agent_id: str,
        state: AgentState,
        sessions: Sessions,
        batch: ReceiveBatch,
        inbox: InboxReader,
        peers: PeerDirectory,
        capabilities: Capabilities | None,
        signer: Signer,
        auditor: Auditor,
        metrics: AgentMetrics,
        clock: Clock,
        rng: Rng,
        on_ack: Callable[[wire.Envelope], None],
        on_error: Callable[[wire.Envelope], Awaitable[None]],
        on_revocations: Callable[[Link, wire.Envelope, KeyLog], Awaitable[None]],
        keylogs: KeyLogs,
        witnessing: Witnessing | None = None,
        on_mirror: Callable[[Link, wire.Envelope, KeyLog], Awaitable[None]] | None = None,
    ) -> None:
        self._me = agent_id
        self.on_mirror = on_mirror
        self._state, self._sessions, self._batch, self._inbox = state, sessions, batch, inbox
        self._peers, self._capabilities = peers, capabilities
        self._signer, self._auditor, self._metrics = signer, auditor, metrics
        self._clock, self._rng = clock, rng
        self._on_ack, self._on_error, self._on_revocations = on_ack, on_error, on_revocations
        self._keylogs = keylogs
        self._witnessing = witnessing
        self._unknown_lookups = RateLimiter(rate=2.0, burst=20)
        #: Capability-free messages from a peer we wait on are decrypted to see if they
        #: are replies; those that are not spend this peer's bucket, and once it is
        #: empty its capability-free messages are refused unread again (a refused
        #: frame never enters the replay window, so a replayed one would cost a
        #: decryption each time).
        self._unsolicited = RateLimiter(rate=UNSOLICITED_RATE, burst=UNSOLICITED_BURST)
        #: Request/reply (set by talos.client.resources): the requests we wait on,
        #: and the requests we received.
        self.requests: OpenRequests | None = None
        self.replies: Replies | None = None
        self._logs = LimitedLog(_log, clock)
        self.instances = InstanceTracker()
        #: PRESENCE challenges (talos.client.presence), set by wiring.
        self.on_presence: Callable[[Link, wire.UnverifiedEnvelope], Awaitable[None]] | None = None

    async def on_frame(self, link: Link, frame: bytes) -> None:
        try:
            unverified = wire.decode(frame)
        except RemoteProtocolError as exc:
            self._malformed(link, "malformed_frame", "a malformed frame", exc)
            return
        if unverified.recipient != self._me:
            self._malformed(
                link, "misaddressed_frame", "a frame for another agent", unverified.recipient
            )
            return
        if unverified.type is wire.EnvelopeType.PRESENCE:
            # Before the sender lookup and the instance tracker: a challenge comes
            # from this identity itself (talos diagnose), not from a peer instance.
            if self.on_presence is not None:
                await self.on_presence(link, unverified)
            return
        sender = unverified.sender
        if self._peers.known_log(sender) is None and not self._unknown_lookups.allow(
            "lookup", self._clock.monotonic()
        ):
            self._logs.log(
                logging.DEBUG,
                "unknown_sender",
                "dropping a frame from unknown %s: lookup rate limit",
                sender,
                source=link.remote_host,
                peer_id=sender,
            )
            return
        try:
            log = await self._peers.keylog(sender)
        except (PeerNotFound, TalosError) as exc:
            self._logs.warning(
                "unknown_sender",
                "dropping a frame from unknown agent %s: %s",
                sender,
                exc,
                source=link.remote_host,
                peer_id=sender,
                remote=link.remote,
            )
            return
        try:
            envelope = wire.verify(unverified, log.state.signing_key)
        except SignatureInvalid:
            # Not counted yet: the sender may have rotated (talos.client.keylogs).
            newer = await self._keylogs.reverify(unverified, log, link)
            if newer is None:
                return
            envelope, log = newer
        await self._keylogs.answer(link, sender)
        if self.instances.observe(sender, envelope.sender_instance):
            self._metrics.duplicate_instance_detected()
            _log.warning(
                "%s is sending from two instances at once (split brain?)",
                sender,
                extra={
                    "event": "duplicate_instance",
                    "peer_id": sender,
                    "instance_id": envelope.sender_instance.hex(),
                },
            )
        # A valid frame proves who signed it, not who holds the socket (it may
        # be a replay): replies go back on this link, but outgoing traffic
        # only ever uses links this agent opened to a verified endpoint.
        kind = envelope.type
        if kind in (wire.EnvelopeType.MESSAGE, wire.EnvelopeType.INITIAL):
            await self._receive_message(link, envelope, log.state)
        elif kind is wire.EnvelopeType.ACK:
            self._on_ack(envelope)
        elif kind is wire.EnvelopeType.ERROR:
            await self._on_error(envelope)
        elif kind is wire.EnvelopeType.REVOCATIONS:
            await self._on_revocations(link, envelope, log)
        elif kind is wire.EnvelopeType.KEYLOG:
            await self._keylogs.on_keylog(link, envelope, log)
        elif kind is wire.EnvelopeType.CHECKPOINT and self._witnessing is not None:
            await _background()
            await self._witnessing.on_checkpoint(link, envelope, log)
        elif kind is wire.EnvelopeType.COSIGNATURE and self._witnessing is not None:
            await _background()
            await self._witnessing.on_cosignature(link, envelope, log)
        elif kind is wire.EnvelopeType.MIRROR and self.on_mirror is not None:
            await self.on_mirror(link, envelope, log)  # talos.client.mirroring
        if self._witnessing is not None:
            # After the frame's own answer (an ACK goes first): our checkpoint, once per link.
            await self._witnessing.answer(link, sender)

    def _malformed(self, link: Link, event: str, what: str, detail: object) -> None:
        """Drop a frame no peer of ours would send; the transport may close its link."""
        closed = link.reject_malformed()
        self._metrics.frame_malformed(link_closed=closed)
        self._logs.warning(
            event,
            "dropping %s from %s: %s",
            what,
            link.remote,
            detail,
            source=link.remote_host,
            remote=link.remote,
        )

    async def _refuse(self, link: Link, envelope: wire.Envelope, refusal: incoming.Refusal) -> None:
        if refusal.audit is not None:
            kind, fields = refusal.audit
            # A captured refused frame can be replayed at will (refusals do not
            # enter the replay window): its audit entries are rate-limited.
            self._auditor.audit_noisy(kind, fields, envelope.sender)
        await self._signer.refuse(link, envelope, refusal)

    async def _receive_message(self, link: Link, envelope: wire.Envelope, sender_keys: Any) -> None:
        sender = envelope.sender
        replay_id = hashlib.sha256(sender.encode() + envelope.message_id).digest()
        verdict = incoming.check_fresh(
            self._state.replay_window, replay_id, envelope, time_ms(self._clock), self._batch.ids
        )
        if isinstance(verdict, incoming.Ignore):
            return  # a copy is being committed; its ACK follows the commit
        if isinstance(verdict, incoming.Duplicate):
            self._metrics.replay_dropped()
            self._auditor.noisy_event(
                AuditKind.REPLAY_DROPPED,
                "replay_dropped",
                "dropped a replayed message from %s (acknowledged again)",
                envelope.message_id,
                sender,
            )
            await self._signer.answer(link, sender, [envelope.message_id], wire.AckStatus.DUPLICATE)
            if self.replies is not None:
                self.replies.duplicate(sender, envelope.message_id)
            return
        if verdict is not None:
            await self._refuse(link, envelope, verdict)
            return
        capability_id = None
        # A reply needs no capability: one without may be decrypted if we wait on its
        # sender, and must then be a reply to our request (docs/design/request-reply.md).
        # An open agent decrypts every message anyway: no budget to spend, none throttled.
        maybe_reply = (
            self._capabilities is not None
            and envelope.capability_ref is None
            and self.requests is not None
            and self.requests.awaiting(sender)
        )
        if maybe_reply and not self._unsolicited.available(sender, self._clock.monotonic()):
            maybe_reply = False
            self._logs.warning(
                "unsolicited_throttled",
                "capability-free messages from %s refused unread: too many were not replies",
                sender,
                source=sender,
                peer_id=sender,
            )
        if self._capabilities is not None and not maybe_reply:
            try:
                capability_id = await self._capabilities.authorize(envelope)
            except CapabilityDenied as exc:
                refusal = incoming.capability_refusal(envelope, exc)
                self._metrics.capability_denied(exc)
                await self._refuse(link, envelope, refusal)
                return
        if incoming.keeps_own_handshake(envelope, self._me, self._awaiting_confirmation):
            await self._refuse(link, envelope, incoming.simultaneous_open_refusal())
            return
        # The checks above may have waited: look again, just before decrypting (nothing
        # awaits from here until the message is staged or committed).
        if replay_id in self._batch.ids:
            return  # a copy arrived meanwhile and is being committed
        if envelope.type is not wire.EnvelopeType.MESSAGE:
            self._batch.settle()  # X3DH consumes prekeys and replaces the session: not batched
        if incoming.check_fresh(
            self._state.replay_window, replay_id, envelope, time_ms(self._clock), frozenset()
        ):
            return  # changed while we waited: the retry gets the answer
        try:
            plaintext, successor, prekeys, established = self._decrypt(envelope, sender_keys)
            payload = decode_payload_fields(plaintext)  # refuses undecodable payloads
        except (CryptoError, SessionError, RemoteProtocolError) as exc:
            self._metrics.session_failed("decrypt_failed")
            await self._refuse(link, envelope, incoming.decrypt_refusal(envelope, exc))
            return
        unanswerable = correlation_refusal(
            self.requests,
            envelope,
            payload.reply_to,
            time_ms(self._clock),
            required=maybe_reply and self._capabilities is not None,
        )
        if unanswerable is not None:  # always CAPABILITY_DENIED: counted as a ScopeMismatch
            if maybe_reply:
                self._unsolicited.allow(sender, self._clock.monotonic())
            self._metrics.capability_denied(ScopeMismatch(unanswerable.reason))
            await self._refuse(link, envelope, unanswerable)
            return
        # Signed, fresh, not a replay, authorized, decrypted: this link is a peer's and
        # keeps its place against floods of idle connections (see Transport).
        link.mark_verified(sender)
        message, received_audit = self._inboxed(envelope, plaintext, capability_id)
        audit: list[Any] = [received_audit]
        if payload.request_expires_ms is not None and self.replies is not None:
            audit.append(
                self.replies.received(sender, envelope.message_id, payload.request_expires_ms)
            )
        if not established:
            # Committed with whatever else arrives in this event-loop tick (one
            # fsync for all), then acknowledged. The session record is filled in at
            # the commit: only each sender's last counts.
            received = Received(sender, b"", replay_id, envelope.timestamp_ms, message, audit=audit)
            self._batch.stage(link, envelope, received, successor, payload.reply_to)
            return
        audit.append((AuditKind.SESSION_ESTABLISHED, {"role": "responder"}, sender))
        entry = SessionEntry(successor)
        received = Received(
            sender,
            encode_record(entry),
            replay_id,
            envelope.timestamp_ms,
            message,
            None if prekeys is None else prekeys.to_bytes(),
            audit,
        )
        reply = payload.reply_to is not None
        seqs = self._state.commit_receive_many([received], taken=1 if reply else 0)
        if reply:
            hand_over(self.requests, payload.reply_to, message)
        else:
            self._inbox.follow(seqs, [message])
        self._sessions.table.commit(sender, entry)
        self._metrics.message_received(len(plaintext))
        self._metrics.session_established()
        if prekeys is not None:
            self._sessions.prekeys = prekeys
        await self._signer.answer(link, sender, [envelope.message_id], wire.AckStatus.ACCEPTED)
        self._inbox.ready.set()

    def _awaiting_confirmation(self, peer: str) -> bool:
        current = self._sessions.current(peer)
        return current is not None and not current.confirmed

    def _inboxed(
        self, envelope: wire.Envelope, plaintext: bytes, capability_id: bytes | None
    ) -> tuple[InboxMessage, tuple[str, dict[str, Any], str | None]]:
        """A received message's inbox row and its MESSAGE_RECEIVED audit record."""
        message = InboxMessage(
            sender=envelope.sender,
            message_id=envelope.message_id,
            data=plaintext,
            sent_at_ms=envelope.timestamp_ms,
            received_at_ms=time_ms(self._clock),
            capability_id=capability_id,
        )
        digest = hashlib.sha256(plaintext).digest()
        fields = {"id": envelope.message_id, "sha256": digest}
        return message, (AuditKind.MESSAGE_RECEIVED, fields, envelope.sender)

    def _decrypt(
        self, envelope: wire.Envelope, sender_keys: Any
    ) -> tuple[bytes, Session, PrekeyStore | None, bool]:
        """Decrypt without committing: plaintext, successor session, new prekeys, new session?"""
        now = self._clock.time()
        if envelope.type is wire.EnvelopeType.INITIAL:
            header = InitialHeader.from_bytes(envelope.x3dh_header or b"")
            response = respond(
                self._sessions.prekeys,
                header,
                peer_agent_id=envelope.sender,
                peer_signing_key=sender_keys.signing_key.raw,
                peer_identity_dh=sender_keys.dh_key,
            )
            session = Session.responder(
                response.shared_key, response.associated_data, response.our_ratchet_key, self._rng
            )
            plaintext, successor = session.decrypt_uncommitted(
                envelope.ratchet_header, envelope.ciphertext, now=now
            )
            return plaintext, successor, response.store, True
        current = self._sessions.for_decrypt(envelope.sender)
        if current is None:
            raise SessionError(f"no session with {envelope.sender}")
        plaintext, successor = current.decrypt_uncommitted(
            envelope.ratchet_header, envelope.ciphertext, now=now
        )
        return plaintext, successor, None, False


async def _background() -> None:
    """Let what earlier frames started run before witness work (a checkpoint's
    durable write): the tasks already scheduled (an ACK's outbox removal), then
    what they wake (the send() call that removal releases). A peer answers our
    first message's ACK and then its checkpoint, back to back."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
