"""The receive path of :class:`~talos.client.TalosClient` (see ARCHITECTURE §5).

Decode → verify the signature with the sender's verified key log →
recipient, replay and clock-skew checks → capability check → decrypt →
one transaction {ratchet state, replay entry, audit entry, inbox message}
→ signed ACK → wake the application. Anything rejected changes no state and
is answered with a signed ERROR naming the reason (except forgeries, which
are only audited).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

from talos._client_base import ClientBase, _session_record
from talos.audit import AuditKind
from talos.core import wire
from talos.core.capability import Capability
from talos.core.clock import time_ms
from talos.core.keylog import IssuerKeys
from talos.core.message import Message, decode_payload
from talos.core.ratchet import Session
from talos.core.x3dh import InitialHeader, PrekeyStore, respond
from talos.errors import (
    CapabilityDenied,
    CryptoError,
    DuplicateMessage,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    RemoteProtocolError,
    RevocationListStale,
    ScopeMismatch,
    SessionError,
    SignatureInvalid,
    StaleMessage,
    TalosError,
    UnsupportedVersion,
)
from talos.storage.agent_state import InboxMessage, Received
from talos.transport import Link

_log = logging.getLogger("talos.client")

#: Refusals logged as security events (WARNING), and their log event names.
_SECURITY_REFUSALS: Final = frozenset({wire.ErrorCode.CAPABILITY_DENIED, wire.ErrorCode.STALE})
_REFUSAL_EVENTS: Final = {
    wire.ErrorCode.CAPABILITY_DENIED: "capability_denied",
    wire.ErrorCode.STALE: "stale_message",
    wire.ErrorCode.DECRYPT_FAILED: "decrypt_failed",
}


#: Messages, and payload bytes, receive(auto_ack=False) may have waiting in memory
#: (see _follow_inbox).
READ_AHEAD_LIMIT: Final = 4096
READ_AHEAD_BYTES: Final = 8 * 1024 * 1024


class ReceivingMixin(ClientBase):
    """Receive, check, decrypt, commit and acknowledge messages; hand them to the application."""

    # -- receiving --------------------------------------------------------------------

    async def receive(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 -- the documented receive() signature
        *,
        auto_ack: bool = True,
    ) -> Message | None:
        """The next received message, or ``None`` after ``timeout`` seconds.

        With ``auto_ack`` (the default) the message leaves the durable inbox
        before it is returned: at most once to the application, and a crash
        right after this call loses it for the application. (A call already
        waiting is handed the next message by the commit that receives it; if
        that call is cancelled at that moment, the message is put back at the
        end of the inbox.) With
        ``auto_ack=False`` it stays in the inbox until :meth:`acknowledge`:
        at least once; after a crash it is returned again, and its
        ``message_id`` lets the application drop what it already processed.
        Each such call returns the next message after the previous one, so
        an application can process several and acknowledge them together
        (one commit); a restart starts again at the oldest unacknowledged.
        """
        deadline = None if timeout is None else self._clock.monotonic() + timeout
        while not self._closed:
            if auto_ack:
                taken = self._state.take(1)
                if taken:
                    self._read_ahead = None  # it may hold the row just taken
                    return _message(taken[0])
            elif self._read_ahead is not None:
                if self._read_ahead:
                    seq, item = self._read_ahead.popleft()
                    self._read_ahead_bytes -= len(item.data)
                    self._inbox_cursor = seq
                    return _message(item, seq)
            else:
                for seq, item in self._state.inbox(after=self._inbox_cursor, limit=1):
                    self._inbox_cursor = seq
                    return _message(item, seq)
                # Everything after the cursor is read: from now on the receive commits
                # hand their rows over in memory too (see _follow_inbox).
                self._read_ahead = collections.deque()
                self._read_ahead_bytes = 0
            self._inbox_ready.clear()
            remaining = None if deadline is None else deadline - self._clock.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            if auto_ack:
                handed = await self._wait_as_taker(remaining)
                if handed is not None:
                    return _message(handed)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._inbox_ready.wait(), remaining)
        return None

    async def _wait_as_taker(self, seconds: float | None) -> InboxMessage | None:
        """Wait up to ``seconds`` for the next receive commit to hand over a message
        (taken in that commit: no separate removal), or for the inbox to fill."""
        taker: asyncio.Future[InboxMessage] = asyncio.get_running_loop().create_future()
        self._takers.append(taker)
        ready = asyncio.ensure_future(self._inbox_ready.wait())
        waiters: set[asyncio.Future[Any]] = {taker, ready}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if taker.done() and not taker.cancelled():
                # Taken by the receive commit for this call, which will not return it:
                # back into the durable inbox, for the next call.
                try:
                    seqs = self._state.return_to_inbox([taker.result()])
                    self._follow_inbox(seqs, [taker.result()])
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
                self._inbox_ready.set()
            raise
        finally:
            ready.cancel()
            if not taker.done():
                taker.cancel()
            with contextlib.suppress(ValueError):
                self._takers.remove(taker)
        return None if taker.cancelled() else taker.result()

    def _follow_inbox(self, seqs: list[int], messages: list[InboxMessage]) -> None:
        """Messages just written at the end of the inbox: when receive(auto_ack=False)
        has read everything before them, it gets these from memory (they are in the
        inbox, durable, until acknowledged) instead of reading and decrypting the
        rows back. Past READ_AHEAD_LIMIT messages or READ_AHEAD_BYTES unread it lets
        them go and reads the inbox again."""
        ahead = self._read_ahead
        if ahead is None:
            return
        size = self._read_ahead_bytes + sum(len(message.data) for message in messages)
        if (
            len(seqs) != len(messages)
            or len(ahead) + len(seqs) > READ_AHEAD_LIMIT
            or size > READ_AHEAD_BYTES
        ):
            self._read_ahead = None
            return
        ahead.extend(zip(seqs, messages, strict=True))
        self._read_ahead_bytes = size

    def acknowledge(self, *messages: Message) -> None:
        """Remove messages received with ``auto_ack=False`` from the durable inbox
        (all in one commit).

        Raises:
            LocalProtocolError: a message was not received with ``auto_ack=False``.
        """
        seqs = []
        for message in messages:
            if message.inbox_seq is None:
                raise LocalProtocolError(
                    "only messages received with auto_ack=False are acknowledged"
                )
            seqs.append(message.inbox_seq)
        if seqs:
            self._state.acknowledge(*seqs)

    async def messages(self) -> AsyncIterator[Message]:
        """Every received message, as it arrives."""
        while not self._closed:
            message = await self.receive(timeout=None)
            if message is not None:
                yield message

    async def _on_frame(self, link: Link, frame: bytes) -> None:
        try:
            unverified = wire.decode(frame)
        except RemoteProtocolError as exc:
            _log.warning(
                "dropping a malformed frame from %s: %s",
                link.remote,
                exc,
                extra={"event": "malformed_frame", "remote": link.remote},
            )
            return
        if unverified.recipient != self.agent_id:
            _log.warning(
                "dropping a frame for %s received by %s", unverified.recipient, self.agent_id
            )
            return
        sender = unverified.sender
        if self._peers.known_log(sender) is None and not self._unknown_lookups.allow(
            "lookup", self._clock.monotonic()
        ):
            _log.debug("dropping a frame from unknown %s: lookup rate limit", sender)
            return
        try:
            log = await self._peers.keylog(sender)
        except (PeerNotFound, TalosError) as exc:
            _log.warning(
                "dropping a frame from unknown agent %s: %s",
                sender,
                exc,
                extra={"event": "unknown_sender", "peer_id": sender},
            )
            return
        try:
            envelope = wire.verify(unverified, log.state.signing_key)
        except SignatureInvalid:
            self.metrics.signature_failed()
            self._noisy_event(
                AuditKind.SIGNATURE_FAILURE,
                "signature_failure",
                "signature failure on a frame from %s (not blocked)",
                unverified.message_id,
                sender,
                remote=link.remote,
            )
            return
        if self._instances.observe(sender, envelope.sender_instance):
            self.metrics.duplicate_instance_detected()
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

    def _noisy_event(
        self, kind: str, event: str, text: str, message_id: bytes, sender: str, **fields: Any
    ) -> None:
        """Audit (rate-limited) and log an event any peer can trigger at will: a WARNING
        with its fields when audited, DEBUG past the rate limit."""
        audited = self._audit_noisy(kind, {"id": message_id}, sender)
        _log.log(
            logging.WARNING if audited else logging.DEBUG,
            text,
            sender,
            extra={"event": event, "peer_id": sender, "message_id": message_id.hex(), **fields},
        )

    async def _receive_message(self, link: Link, envelope: wire.Envelope, sender_keys: Any) -> None:
        sender = envelope.sender
        now = self._clock.time()
        replay_id = hashlib.sha256(sender.encode() + envelope.message_id).digest()
        if replay_id in self._staged_ids:
            return  # a copy is being committed; its ACK follows the commit
        try:
            self._state.replay_window.check(replay_id, envelope.timestamp_ms, int(now * 1000))
        except DuplicateMessage:
            self.metrics.replay_dropped()
            self._noisy_event(
                AuditKind.REPLAY_DROPPED,
                "replay_dropped",
                "dropped a replayed message from %s (acknowledged again)",
                envelope.message_id,
                sender,
            )
            await self._answer(link, sender, [envelope.message_id], wire.AckStatus.DUPLICATE)
            return
        except StaleMessage as exc:
            self._audit(
                AuditKind.PEER_REJECTED, {"id": envelope.message_id, "reason": "stale"}, sender
            )
            skewed = envelope.timestamp_ms > int(now * 1000)
            await self._refuse(
                link,
                envelope,
                wire.ErrorCode.STALE,
                str(exc)[:200],
                event="clock_skew" if skewed else "stale_message",
            )
            return
        capability_id = None
        if not self._accept_open:
            try:
                capability_id = await self._authorize(envelope)
            except CapabilityDenied as exc:
                self._audit(
                    AuditKind.CAPABILITY_DENIED,
                    {"id": envelope.message_id, "reason": type(exc).__name__},
                    sender,
                )
                self.metrics.capability_denied(exc)
                code = (
                    wire.ErrorCode.UNAVAILABLE
                    if isinstance(exc, RevocationListStale)
                    else wire.ErrorCode.CAPABILITY_DENIED
                )
                await self._refuse(link, envelope, code, str(exc)[:200])
                return
        if self._we_keep_our_handshake(envelope):
            await self._refuse(
                link, envelope, wire.ErrorCode.UNAVAILABLE, "both sides opened a session; use mine"
            )
            return
        # The checks above may have waited: look again, just before decrypting (nothing
        # awaits from here until the message is staged or committed).
        if replay_id in self._staged_ids:
            return  # a copy arrived meanwhile and is being committed
        if envelope.type is not wire.EnvelopeType.MESSAGE:
            self._settle()  # X3DH consumes prekeys and replaces the session: not batched
        try:
            self._state.replay_window.check(replay_id, envelope.timestamp_ms, time_ms(self._clock))
        except (DuplicateMessage, StaleMessage):
            return  # changed while we waited: the retry gets the answer
        try:
            plaintext, successor, prekeys, established = self._decrypt(envelope, sender_keys)
            data = decode_payload(plaintext)
        except (CryptoError, SessionError, RemoteProtocolError) as exc:
            self.metrics.session_failed()
            self._audit(
                AuditKind.DECRYPTION_FAILURE,
                {"id": envelope.message_id, "reason": type(exc).__name__},
                sender,
            )
            await self._refuse(
                link, envelope, wire.ErrorCode.DECRYPT_FAILED, "cannot decrypt; re-establish"
            )
            return
        del data  # decoded only to refuse undecodable payloads before committing
        # Signed, fresh, not a replay, authorized, decrypted: this link is a peer's and
        # keeps its place against floods of idle connections (see Transport).
        link.mark_verified(sender)
        if not established:
            # Committed with whatever else arrives in this event-loop tick (one
            # fsync for all), then acknowledged: see _flush_receives.
            self._stage_receive(link, envelope, replay_id, plaintext, successor, capability_id)
            return
        message, received_audit = self._inboxed(envelope, plaintext, capability_id)
        audit = [received_audit, (AuditKind.SESSION_ESTABLISHED, {"role": "responder"}, sender)]
        seq = self._state.commit_receive(
            sender,
            session=_session_record(successor, None),
            replay_id=replay_id,
            timestamp_ms=envelope.timestamp_ms,
            message=message,
            prekeys=None if prekeys is None else prekeys.to_bytes(),
            audit=audit,
        )
        self._follow_inbox([seq], [message])
        self._sessions[sender] = (successor, None)
        self.metrics.message_received(len(plaintext))
        self.metrics.session_established()
        if prekeys is not None:
            self._prekeys = prekeys
        await self._answer(link, sender, [envelope.message_id], wire.AckStatus.ACCEPTED)
        self._inbox_ready.set()

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

    def _stage_receive(
        self,
        link: Link,
        envelope: wire.Envelope,
        replay_id: bytes,
        plaintext: bytes,
        successor: Session,
        capability_id: bytes | None,
    ) -> None:
        """Hold a decrypted message for the next group commit (nothing is output yet).

        Until then ``successor`` is the session later frames from this sender
        are decrypted with (so a batch chains), but nothing else may use it:
        every other reader of sessions settles the batch first (:meth:`_settle`).
        """
        sender = envelope.sender
        self._staged_sessions[sender] = successor
        self._staged_ids.add(replay_id)
        message, received_audit = self._inboxed(envelope, plaintext, capability_id)
        # The session record is filled in at the commit: only each sender's last counts.
        received = Received(
            sender, b"", replay_id, envelope.timestamp_ms, message, audit=[received_audit]
        )
        self._staged.append((received, link, envelope))
        if len(self._staged) == 1:
            asyncio.get_running_loop().call_soon(self._settle)

    def _settle(self) -> None:
        """Commit the staged receives in one transaction, then acknowledge them.

        If the commit fails nothing is acknowledged and the staged sessions
        are forgotten: the sender retries, and the messages are decrypted
        again from the committed state.
        """
        staged, self._staged = self._staged, []
        sessions, self._staged_sessions = self._staged_sessions, {}
        self._staged_ids = set()
        if not staged:
            return
        records = {peer: _session_record(session, None) for peer, session in sessions.items()}
        while self._takers and self._takers[0].done():
            self._takers.popleft()
        # Messages for receive() calls already waiting are taken in this same commit
        # (unless older ones wait in the inbox: order is kept).
        takers = [taker for taker in self._takers if not taker.done()][: len(staged)]
        if takers and self._state.inbox_count():
            takers = []
        try:
            seqs = self._state.commit_receive_many(
                [
                    dataclasses.replace(received, session=records[received.peer])
                    for received, _, _ in staged
                ],
                taken=len(takers),
            )
        except TalosError as exc:
            _log.warning(
                "%d received messages not committed (the senders will retry): %s",
                len(staged),
                exc,
            )
            return
        for peer, session in sessions.items():
            self._sessions[peer] = (session, None)
        for taker, (received, _, _) in zip(takers, staged, strict=False):
            taker.set_result(received.message)
        self._follow_inbox(seqs, [received.message for received, _, _ in staged[len(takers) :]])
        for received, _, _ in staged:
            self.metrics.message_received(len(received.message.data))
        task = asyncio.create_task(
            self._acknowledge_staged([(link, envelope) for _, link, envelope in staged])
        )
        self._acknowledging.add(task)
        task.add_done_callback(self._acknowledging.discard)

    async def _acknowledge_staged(self, answers: list[tuple[Link, wire.Envelope]]) -> None:
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
                    await self._answer(link, sender, chunk, wire.AckStatus.ACCEPTED)
        finally:
            self._inbox_ready.set()

    async def _authorize(self, envelope: wire.Envelope) -> bytes:
        """Check the attached capability; returns its id.

        Before checking, the key logs of every issuer in the chain are looked
        up, and any issuer whose revocation list is older than the policy's
        ``max_age`` is synchronized from the registry (if it can be reached).

        Raises:
            CapabilityDenied: missing or not valid for this sender and agent.
        """
        self._refresh_own_revocations()
        if envelope.capability_ref is None:
            raise ScopeMismatch("no capability attached; this agent requires one")
        try:
            token = Capability.from_bytes(envelope.capability_ref)
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise ScopeMismatch(f"attached capability is malformed: {exc}") from None
        for issuer in {link.issuer for link in token.chain()} - {self.agent_id}:
            with contextlib.suppress(TalosError):
                await self._peers.keylog(issuer)
            await self._sync_revocations(issuer)
        self._check_token(token, audience=self.agent_id, holder=envelope.sender)
        return token.token_id

    async def _sync_revocations(self, issuer: str) -> None:
        """Fetch ``issuer``'s list from the registry when ours is older than ``max_age``."""
        now = self._clock.time()
        synced = self._revocations.last_synced(issuer)
        fresh = synced is not None and now - synced <= self._revocation_policy.max_age
        if fresh or self._registry is None:
            return
        log = self._peers.known_log(issuer)
        if log is None:
            return
        try:
            offered = await self._registry.fetch_revocations(issuer, IssuerKeys([log]))
        except TalosError as exc:
            _log.info("revocation list of %s not refreshed: %s", issuer, exc)
            return
        if offered is not None:
            result = self._revocations.apply(offered, keys=IssuerKeys([log]))
            if result.security_event:
                self._audit("REVOCATION_CONFLICT", {"outcome": result.outcome.name}, issuer)
            kept = self._revocations.list_for(issuer)
            if kept is not None:
                assert self._tokens is not None  # noqa: S101 -- open while the client is
                self._tokens.put_revocation_list(issuer, kept.to_bytes(), synced_at=now)
        self._revocations.mark_synced(issuer, now)
        self.metrics.set_revocation_list_age(self._revocations.revocation_list_age_seconds(now))

    def _we_keep_our_handshake(self, envelope: wire.Envelope) -> bool:
        """Tie-break when both agents started a session with each other at once.

        Each side holds its own initiator session (not yet acknowledged) and
        receives the other's X3DH initial message. The agent with the lower
        id keeps its own: it answers UNAVAILABLE (retry later, not a reset),
        and the other adopts the winner's session when that initial message
        arrives, then re-sends in it.
        """
        if envelope.type is not wire.EnvelopeType.INITIAL or self.agent_id > envelope.sender:
            return False
        current = self._session(envelope.sender)
        return current is not None and current[1] is not None

    def _decrypt(
        self, envelope: wire.Envelope, sender_keys: Any
    ) -> tuple[bytes, Session, PrekeyStore | None, bool]:
        """Decrypt without committing: plaintext, successor session, new prekeys, new session?"""
        now = self._clock.time()
        if envelope.type is wire.EnvelopeType.INITIAL:
            header = InitialHeader.from_bytes(envelope.x3dh_header or b"")
            response = respond(
                self._prekeys,
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
        staged = self._staged_sessions.get(envelope.sender)
        if staged is not None:
            current: tuple[Session, bytes | None] | None = (staged, None)
        else:
            current = self._committed_session(envelope.sender)
        if current is None:
            raise SessionError(f"no session with {envelope.sender}")
        plaintext, successor = current[0].decrypt_uncommitted(
            envelope.ratchet_header, envelope.ciphertext, now=now
        )
        return plaintext, successor, None, False

    async def _answer(
        self, link: Link, sender: str, ids: list[bytes], status: wire.AckStatus
    ) -> None:
        """Acknowledge ``ids`` (distinct, at most MAX_ACK_REFS) from ``sender``, signed once."""
        await self._send_signed(
            link, sender, wire.EnvelopeType.ACK, ref_ids=tuple(ids), status=status
        )

    async def _refuse(
        self,
        link: Link,
        envelope: wire.Envelope,
        code: wire.ErrorCode,
        reason: str,
        *,
        event: str | None = None,
    ) -> None:
        _log.log(
            logging.WARNING if code in _SECURITY_REFUSALS else logging.INFO,
            "refusing a message from %s: %s (%s)",
            envelope.sender,
            code.name,
            reason,
            extra={
                "event": event or _REFUSAL_EVENTS.get(code, "refused"),
                "peer_id": envelope.sender,
                "message_id": envelope.message_id.hex(),
                "code": code.name,
            },
        )
        await self._send_signed(
            link,
            envelope.sender,
            wire.EnvelopeType.ERROR,
            ref_id=envelope.message_id,
            error_code=code,
            reason="".join(c for c in reason if c.isprintable())[:200] or code.name,
        )


def _message(item: InboxMessage, inbox_seq: int | None = None) -> Message:
    return Message(
        sender=item.sender,
        message_id=item.message_id,
        data=decode_payload(item.data),
        sent_at=item.sent_at_ms / 1000,
        capability_id=item.capability_id,
        inbox_seq=inbox_seq,
    )
