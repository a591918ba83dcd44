"""What every part of an agent shares: signed control envelopes and the audit trail.

:class:`Signer` signs and sends the envelopes an agent answers with (ACK,
ERROR, REVOCATIONS). :class:`Auditor` writes audit entries, and rate-limits
those any peer can trigger at will, so that a flood of forged or replayed
frames cannot fill the disk through the agent's own log. The log lines of
both go through a :class:`~talos.logs.LimitedLog` (per sender, per event).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from talos.audit import AuditLog
from talos.client.own_keys import OwnIdentity
from talos.core import wire
from talos.core.clock import Clock, time_ms
from talos.core.incoming import Refusal
from talos.core.ratelimit import RateLimiter
from talos.core.rng import Rng
from talos.errors import PeerUnreachable, TalosError
from talos.logs import LimitedLog
from talos.transport import Link

_log = logging.getLogger("talos.client")


class Signer:
    """Signs control envelopes as this agent instance and sends them, best effort."""

    def __init__(self, own: OwnIdentity, instance: bytes, clock: Clock, rng: Rng) -> None:
        self._own, self._instance = own, instance
        self._clock, self._rng = clock, rng
        self._logs = LimitedLog(_log, clock)

    async def send(
        self, link: Link, recipient: str, kind: wire.EnvelopeType, **fields: Any
    ) -> None:
        """Sign and send a control envelope on ``link``; a link that dropped
        meanwhile is not an error."""
        envelope = wire.Envelope(
            type=kind,
            message_id=wire.new_message_id(self._rng),
            sender=self._own.agent_id,
            sender_instance=self._instance,
            recipient=recipient,
            timestamp_ms=time_ms(self._clock),
            **fields,
        )
        with contextlib.suppress(PeerUnreachable):
            await link.send(wire.seal(envelope, self._own.current.signing_key))

    async def answer(
        self, link: Link, sender: str, ids: list[bytes], status: wire.AckStatus
    ) -> None:
        """Acknowledge ``ids`` (distinct, at most MAX_ACK_REFS) from ``sender``, signed once."""
        await self.send(link, sender, wire.EnvelopeType.ACK, ref_ids=tuple(ids), status=status)

    async def refuse(self, link: Link, envelope: wire.Envelope, refusal: Refusal) -> None:
        """Log ``refusal`` of ``envelope`` and answer it with a signed ERROR."""
        code = refusal.code
        self._logs.log(
            logging.WARNING if refusal.security else logging.INFO,
            refusal.event,
            "refusing a message from %s: %s (%s)",
            envelope.sender,
            code.name,
            refusal.reason,
            source=envelope.sender,
            peer_id=envelope.sender,
            message_id=envelope.message_id.hex(),
            code=code.name,
        )
        await self.send(
            link,
            envelope.sender,
            wire.EnvelopeType.ERROR,
            ref_id=envelope.message_id,
            error_code=code,
            reason="".join(c for c in refusal.reason if c.isprintable())[:200] or code.name,
        )


class Auditor:
    """Writes this agent's audit entries outside the state commits."""

    def __init__(self, log: AuditLog, clock: Clock) -> None:
        self._log, self._clock = log, clock
        #: Bounds what unauthenticated input can make us write.
        self._noisy = RateLimiter(rate=1.0, burst=20)
        self._logs = LimitedLog(_log, clock)

    def audit(self, kind: str, data: dict[str, Any], peer: str | None) -> None:
        try:
            self._log.append(kind, data, peer=peer)
        except TalosError as exc:
            _log.warning("audit entry %s not written: %s", kind, exc)

    def audit_noisy(self, kind: str, data: dict[str, Any], peer: str) -> bool:
        """Audit an event anyone can trigger at will, at most ~1/s per (kind, peer).

        Past the limit the event is still counted in the metrics and logged at
        debug level (rate-limited too), but not written. Returns whether it was audited (callers
        log a warning only then).
        """
        if self._noisy.allow((kind, peer), self._clock.monotonic()):
            self.audit(kind, data, peer)
            return True
        return False

    def noisy_event(
        self, kind: str, event: str, text: str, message_id: bytes, sender: str, **fields: Any
    ) -> None:
        """Audit (rate-limited) and log an event any peer can trigger at will: a WARNING
        with its fields when audited, DEBUG past the audit rate limit; the lines
        themselves are rate-limited per sender and event."""
        audited = self.audit_noisy(kind, {"id": message_id}, sender)
        self._logs.log(
            logging.WARNING if audited else logging.DEBUG,
            event,
            text,
            sender,
            source=sender,
            peer_id=sender,
            message_id=message_id.hex(),
            **fields,
        )
