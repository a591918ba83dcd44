"""Key rotations between agents: pushing our key log, following the peers' logs.

Envelopes carry no key sequence: a receiver checks every frame against the
sender's *current* key in the key log it holds (:mod:`talos.peers`). When a
peer rotates, this driver is how the others follow
(docs/design/key-rotation-peers.md):

1. **Push and offer.** This agent's own key log goes, in a signed KEYLOG
   envelope, to every connected peer after a rotation (:meth:`KeyLogs.announce`),
   on every link it opens, and once on every incoming link a peer's frame
   verified on (:meth:`KeyLogs.answer`). Until the first rotation there is
   nothing a peer could not fetch itself, so nothing is offered.
2. **Learn.** An offered log is accepted only as an extension of the log we
   hold (:meth:`~talos.core.keylog.KeyLog.extend`): a fork or a rollback is
   refused, audited ``PEER_KEY_LOG_REFUSED`` and counted.
3. **Before a signature failure counts**, the sender's newer log is looked
   for (:meth:`KeyLogs.reverify`): the one the frame carries, then the
   registry, then the DHT, at most :data:`REFRESH_BURST` times per sender and
   remote address per :data:`REFRESH_INTERVAL` (and :data:`GLOBAL_REFRESH_RATE`
   per second in all: :class:`RefreshLimit`),
   so forged frames cannot make us hammer the registry. The frame is verified
   once more under the newer key. Failing that, the earlier keys of the log
   say why it failed (:func:`failure_reason`): a key an emergency rotation
   revoked (``revoked_key``), an earlier key (``superseded_key``), or none
   (``bad_signature``).
4. **On learning a newer log** (by any path, :meth:`KeyLogs.rotated`): audit
   ``PEER_KEY_ROTATED``, log ``peer_key_rotated``, count it, and discard every
   session with that peer; messages in flight to it are sent again, under a
   new session established against the new keys (the receiver's replay window
   drops any copy it had already accepted).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

from talos.audit import AuditKind
from talos.client.control import Auditor, Signer
from talos.client.sessions import Sessions
from talos.core import wire
from talos.core.agent_id import check_agent_id
from talos.core.clock import Clock
from talos.core.keylog import KeyLog
from talos.core.ratelimit import RateLimiter
from talos.errors import (
    KeyLogInvalid,
    MalformedFrame,
    SignatureInvalid,
    TalosError,
    UnsupportedVersion,
)
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.transport import Link

__all__ = [
    "GLOBAL_REFRESH_RATE",
    "MAX_EARLIER_KEYS",
    "MAX_PREFETCHING",
    "PREFETCH_BURST",
    "PREFETCH_GLOBAL_BURST",
    "PREFETCH_GLOBAL_RATE",
    "PREFETCH_RATE",
    "REFRESH_BURST",
    "REFRESH_INTERVAL",
    "KeyLogs",
    "RefreshLimit",
    "failure_reason",
    "signed_by_earlier",
]

_log = logging.getLogger("talos.client")

#: Earlier keys of a sender's log tried, newest first, when a frame fails under the
#: current one (bounds the work a forged frame costs: one verification per key).
MAX_EARLIER_KEYS: Final = 8
#: Refreshes of one sender's key log after a failed signature: a burst, then one per
#: interval (seconds).
REFRESH_BURST: Final = 2
REFRESH_INTERVAL: Final = 60.0
#: Refreshes per second over all senders (forged frames can name any sender).
GLOBAL_REFRESH_RATE: Final = 1.0
GLOBAL_REFRESH_BURST: Final = 10
#: Key logs fetched ahead for incoming handshakes that name an agent we do not know,
#: per remote address: a burst, then this many a second (the name is unauthenticated).
PREFETCH_BURST: Final = 10
PREFETCH_RATE: Final = 1.0
#: And over all addresses (an attacker may have many): a burst, then per second;
#: never more than MAX_PREFETCHING lookups at once.
PREFETCH_GLOBAL_BURST: Final = 20
PREFETCH_GLOBAL_RATE: Final = 2.0
MAX_PREFETCHING: Final = 16


class RefreshLimit:
    """Whether a failed signature from ``sender`` may fetch its key log again now.

    The sender a failing frame names is not authenticated: anyone can forge
    frames naming any agent. So the per-sender allowance is kept per sender
    *and* remote address: a forger elsewhere spends its own bucket, never the
    one the real sender's frames use. Both buckets are checked before either
    is charged, so a refusal by one never spends the other's token.
    """

    def __init__(self) -> None:
        self._per_sender = RateLimiter(rate=1 / REFRESH_INTERVAL, burst=REFRESH_BURST)
        self._overall = RateLimiter(rate=GLOBAL_REFRESH_RATE, burst=GLOBAL_REFRESH_BURST)

    def allow(self, sender: str, host: str, now: float) -> bool:
        """Take one refresh for ``sender`` seen from ``host`` at ``now`` (monotonic
        seconds); ``False``, charging nothing, when either allowance is spent."""
        key = (sender, host)
        if not (self._per_sender.available(key, now) and self._overall.available(None, now)):
            return False
        return self._per_sender.allow(key, now) and self._overall.allow(None, now)


def signed_by_earlier(
    unverified: wire.UnverifiedEnvelope, log: KeyLog, *, limit: int = MAX_EARLIER_KEYS
) -> int | None:
    """The sequence of the newest earlier key of ``log`` (not the current one) the
    frame verifies under, trying at most ``limit`` keys; ``None`` if none."""
    current = log.state.sequence
    for sequence in range(current - 1, max(-1, current - 1 - limit), -1):
        key = log.key_at(sequence)
        if key is None:
            continue
        try:
            wire.verify(unverified, key)
        except SignatureInvalid:
            continue
        return sequence
    return None


def failure_reason(log: KeyLog, sequence: int | None) -> str:
    """The ``reason`` label of a signature failure: ``sequence`` is the earlier key of
    ``log`` the frame verified under (:func:`signed_by_earlier`), if any."""
    if sequence is None:
        return "bad_signature"
    if log.revoked(sequence):
        return "revoked_key"
    return "superseded_key"


def _verified(unverified: wire.UnverifiedEnvelope, log: KeyLog) -> wire.Envelope | None:
    try:
        return wire.verify(unverified, log.state.signing_key)
    except SignatureInvalid:
        return None


class KeyLogs:
    """Offers this agent's key log and follows the key logs of its peers."""

    def __init__(
        self,
        *,
        own: Callable[[], KeyLog],
        peers: PeerDirectory,
        sessions: Sessions,
        signer: Signer,
        auditor: Auditor,
        metrics: AgentMetrics,
        clock: Clock,
        outgoing: Mapping[str, Link],
        on_sessions_dropped: Callable[[str], None],
    ) -> None:
        self._own, self._peers, self._sessions = own, peers, sessions
        self._signer, self._auditor, self._metrics, self._clock = signer, auditor, metrics, clock
        #: Links this agent opened, by peer (the deliverer's).
        self._outgoing = outgoing
        self._on_sessions_dropped = on_sessions_dropped
        #: Incoming links a peer's frame verified on (answered once with our log).
        self._incoming: weakref.WeakValueDictionary[str, Link] = weakref.WeakValueDictionary()
        self._answered: weakref.WeakSet[Link] = weakref.WeakSet()
        self._limit = RefreshLimit()
        self._prefetches = RateLimiter(rate=PREFETCH_RATE, burst=PREFETCH_BURST)
        self._all_prefetches = RateLimiter(rate=PREFETCH_GLOBAL_RATE, burst=PREFETCH_GLOBAL_BURST)
        self._prefetching: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._logs = LimitedLog(_log, clock)
        peers.on_rotated = self.rotated

    # -- our own log ------------------------------------------------------------------

    async def offer(self, link: Link, peer: str) -> None:
        """Send our key log on ``link`` if it holds a rotation (best effort)."""
        log = self._own()
        if len(log) > 1:
            await self._signer.send(link, peer, wire.EnvelopeType.KEYLOG, key_log=log.to_bytes())

    def prefetch(self, agent: str, host: str) -> None:
        """An incoming handshake from ``host`` named ``agent``
        (:attr:`Transport.on_hello`): if we do not hold its key log, start
        fetching it now, so that its first frame does not wait for the lookup
        (that frame's check joins this fetch, see :meth:`PeerDirectory.keylog`).

        The name is unauthenticated, so this only warms the cache with a log
        verified as any other, within two allowances: :data:`PREFETCH_BURST`
        per remote address then :data:`PREFETCH_RATE` a second, and
        :data:`PREFETCH_GLOBAL_BURST` over all addresses then
        :data:`PREFETCH_GLOBAL_RATE` a second, at most :data:`MAX_PREFETCHING`
        at once. Nothing once the client is closing.
        """
        if self._stopped or len(self._prefetching) >= MAX_PREFETCHING:
            return
        try:
            check_agent_id(agent)
        except MalformedFrame:
            return
        if self._peers.known_log(agent) is not None:
            return
        now = self._clock.monotonic()
        if not (
            self._prefetches.available(host, now) and self._all_prefetches.available(None, now)
        ):
            return
        if not (self._prefetches.allow(host, now) and self._all_prefetches.allow(None, now)):
            return
        task = asyncio.ensure_future(self._prefetch(agent))
        self._prefetching.add(task)
        task.add_done_callback(self._prefetching.discard)

    async def _prefetch(self, agent: str) -> None:
        try:
            await self._peers.keylog(agent)
        except Exception as exc:  # the first frame, if one comes, meets it again
            _log.debug("key log of %s not fetched ahead: %r", agent, exc)

    async def stop(self) -> None:
        """Cancel the fetches started ahead, and start none any more (the client is
        closing; :meth:`PeerDirectory.stop` ends the lookups they joined)."""
        self._stopped = True
        for task in list(self._prefetching):
            task.cancel()
        await asyncio.gather(*self._prefetching, return_exceptions=True)

    async def answer(self, link: Link, sender: str) -> None:
        """A frame from ``sender`` verified on ``link``: offer our log once on an
        incoming link (a link we opened had it when it opened)."""
        if link.outgoing or link in self._answered:
            return
        self._answered.add(link)
        self._incoming[sender] = link
        await self.offer(link, sender)

    async def announce(self) -> None:
        """Push our current key log on every live link (after a rotation).

        On every link, not one per peer: a frame signed with the new key may go
        to a peer on either of its links, and must not overtake the key log
        there. The pushes start together, so each is queued on its link before
        any other task can send on it.
        """
        targets = [
            (peer, link)
            for peer, link in list(self._incoming.items()) + list(self._outgoing.items())
            if link.is_open
        ]
        results = await asyncio.gather(
            *(self.offer(link, peer) for peer, link in targets), return_exceptions=True
        )
        for (peer, _), result in zip(targets, results, strict=True):
            if isinstance(result, TalosError):
                _log.info("key log not pushed to %s: %s", peer, result)
            elif isinstance(result, BaseException):
                raise result

    # -- the peers' logs ---------------------------------------------------------------

    async def on_keylog(self, link: Link, envelope: wire.Envelope, held: KeyLog) -> None:
        """A KEYLOG envelope verified under ``held`` (the newest log we hold of its
        sender): adopt the log it carries if it extends ours, refuse it otherwise."""
        sender = envelope.sender
        try:
            offered = KeyLog.from_bytes(envelope.key_log or b"")
            if offered.agent_id != sender:
                raise MalformedFrame("a peer may only offer its own key log")
        except (MalformedFrame, UnsupportedVersion, KeyLogInvalid) as exc:
            if signature_failure(exc):
                self._metrics.signature_failed("bad_signature", "key_log")
            self._refused(sender, "invalid", exc, held)
            return
        kind = _disagreement(held, offered)
        if kind is not None:
            self._refused(sender, kind, KeyLogInvalid(f"offered key log is a {kind}"), held)
            return
        try:
            self._peers.learn_log(offered)
        except KeyLogInvalid as exc:
            self._refused(sender, "fork", exc, held)

    async def reverify(
        self, unverified: wire.UnverifiedEnvelope, held: KeyLog, link: Link
    ) -> tuple[wire.Envelope, KeyLog] | None:
        """A frame failed under ``held``'s current key: verify it under the sender's
        newer log if there is one (attached, registry, DHT); otherwise count,
        audit and log the failure with its reason. Returns the envelope and the
        log it verified under, or ``None``."""
        sender = unverified.sender
        attached = self._attached(unverified, held)
        if attached is not None:
            envelope = _verified(unverified, attached)
            if envelope is not None:
                return envelope, self._peers.learn_log(attached)
        newest = held
        if self._limit.allow(sender, link.remote_host, self._clock.monotonic()):
            newest = await self._refresh(sender, held)
            if len(newest) > len(held):
                envelope = _verified(unverified, newest)
                if envelope is not None:
                    return envelope, newest
        self._signature_failed(unverified, newest, link)
        return None

    def _attached(self, unverified: wire.UnverifiedEnvelope, held: KeyLog) -> KeyLog | None:
        """The longer log a KEYLOG frame carries, as an extension of ``held``."""
        data = unverified.attached_key_log
        if data is None:
            return None
        try:
            # Not verified yet: extend() compares the held prefix and verifies
            # only the new tail (a stranger's long log costs no signature checks).
            events = KeyLog.decode_events(data)
        except (MalformedFrame, UnsupportedVersion):
            return None  # counted below as the frame's signature failure
        if len(events) <= len(held) or events[0] != held.events[0]:
            return None  # not longer, or another agent's log
        try:
            return held.extend(events)
        except KeyLogInvalid as exc:
            self._refused(unverified.sender, "fork", exc, held)
            return None

    async def _refresh(self, sender: str, held: KeyLog) -> KeyLog:
        try:
            return await self._peers.keylog(sender, refresh=True)
        except KeyLogInvalid as exc:
            self._refused(sender, "fork", exc, held)
        except TalosError as exc:
            _log.info("key log of %s not refreshed: %s", sender, exc)
        return self._peers.known_log(sender) or held

    def _signature_failed(
        self, unverified: wire.UnverifiedEnvelope, log: KeyLog, link: Link
    ) -> None:
        sender = unverified.sender
        sequence = signed_by_earlier(unverified, log)
        reason = failure_reason(log, sequence)
        self._metrics.signature_failed(reason)
        fields: dict[str, Any] = {"id": unverified.message_id, "reason": reason}
        if sequence is not None:
            fields["key_sequence"] = sequence
        audited = self._auditor.audit_noisy(AuditKind.SIGNATURE_FAILURE, fields, sender)
        if reason == "revoked_key":
            text = "refusing a frame from %s signed with its REVOKED key %d (stolen key in use?)"
            args: tuple[Any, ...] = (sender, sequence)
        elif reason == "superseded_key":
            text = "refusing a frame from %s signed with its replaced key %d"
            args = (sender, sequence)
        else:
            text, args = "signature failure on a frame from %s (not blocked)", (sender,)
        self._logs.log(
            logging.WARNING if audited else logging.DEBUG,
            "signature_failure",
            text,
            *args,
            source=sender,
            peer_id=sender,
            message_id=unverified.message_id.hex(),
            reason=reason,
            remote=link.remote,
        )

    def _refused(self, sender: str, kind: str, exc: Exception, held: KeyLog) -> None:
        """Refuse an offered key log: counted, audited and logged (rate-limited)."""
        self._metrics.peer_key_log_refused(kind)
        fields = {"reason": kind, "held": held.state.sequence}
        if self._auditor.audit_noisy(AuditKind.PEER_KEY_LOG_REFUSED, fields, sender):
            self._logs.warning(
                "peer_key_log_refused",
                "refusing the key log %s offered: %s (%s)",
                sender,
                kind,
                exc,
                source=sender,
                peer_id=sender,
                reason=kind,
            )

    def rotated(self, old: KeyLog, new: KeyLog) -> None:
        """A peer's known key log grew from ``old`` to ``new`` (called by the
        :class:`~talos.peers.PeerDirectory`, whichever path brought it)."""
        peer = new.agent_id
        if peer == self._own().agent_id:
            return
        added = new.events[len(old) :]
        emergency = any(event.emergency for event in added)
        reasons = [event.reason for event in added if event.reason]
        revoked = new.state.revoked_below
        fields: dict[str, Any] = {
            "from": old.state.sequence,
            "to": new.state.sequence,
            "emergency": emergency,
            "revoked_below": revoked,
        }
        if reasons:
            fields["reason"] = reasons[-1]
        self._auditor.audit(AuditKind.PEER_KEY_ROTATED, fields, peer)
        self._metrics.peer_key_updated()
        _log.log(
            logging.WARNING if emergency else logging.INFO,
            "%s rotated its keys from sequence %d to %d%s%s; its sessions are discarded",
            peer,
            old.state.sequence,
            new.state.sequence,
            " (emergency)" if emergency else "",
            f": {reasons[-1]}" if reasons else "",
            extra={
                "event": "peer_key_rotated",
                "peer_id": peer,
                "old_sequence": old.state.sequence,
                "new_sequence": new.state.sequence,
                "emergency": emergency,
                "revoked_below": revoked,
            },
        )
        self._drop_sessions(peer)

    def _drop_sessions(self, peer: str) -> None:
        """Forget every session with ``peer`` (staged receives are committed first:
        they were decrypted and are the peer's), then resend what is in flight."""
        if self._sessions.table.staged(peer) is None and self._sessions.committed(peer) is None:
            self._on_sessions_dropped(peer)
            return
        try:
            self._sessions.reset(peer, "peer_key_rotated")
        except TalosError as exc:
            _log.warning("session with %s not discarded after its rotation: %s", peer, exc)
            return
        self._metrics.session_reset()
        self._on_sessions_dropped(peer)


def signature_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is (or was raised for) a signature that did not verify:
    :mod:`talos.core.keylog` raises ``KeyLogInvalid`` from a ``SignatureInvalid``."""
    return isinstance(exc, SignatureInvalid) or isinstance(exc.__context__, SignatureInvalid)


def _disagreement(held: KeyLog, offered: KeyLog) -> str | None:
    """``"rollback"`` or ``"fork"`` when ``offered`` does not extend ``held``."""
    common = min(len(held), len(offered))
    if held.events[:common] != offered.events[:common]:
        return "fork"
    if len(offered) < len(held):
        return "rollback"
    return None
