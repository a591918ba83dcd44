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
from collections.abc import Callable
from typing import Any, Final

from talos.audit import AuditKind, AuditLog
from talos.client import timing
from talos.client.own_keys import OwnIdentity
from talos.core import wire
from talos.core.clock import Clock, time_ms
from talos.core.incoming import Refusal
from talos.core.ratelimit import RateLimiter
from talos.core.rng import Rng
from talos.errors import PeerUnreachable, TalosError
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.transport import Link

_log = logging.getLogger("talos.client")

#: Seconds within which what the audit rate limit left out is written down.
SUPPRESSED_FLUSH: Final = 10.0
#: (kind, peer) pairs counted apart; past this, further peers share one count.
MAX_SUPPRESSED_KEYS: Final = 1024


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
    """Writes this agent's audit entries outside the state commits.

    Entries any peer can trigger at will are rate-limited per (kind, peer);
    those left out are counted, and written as one ``FAILURES_SUPPRESSED``
    entry per (kind, peer) (``count``, ``kind``, ``from_ms``, ``to_ms``): before
    the next entry of that kind and peer, by :meth:`run` at most
    :data:`SUPPRESSED_FLUSH` seconds after the first one left out, and at
    close (:meth:`flush_suppressed`). A query by kind then never undercounts
    without saying so.
    """

    def __init__(self, log: AuditLog, clock: Clock, metrics: AgentMetrics | None = None) -> None:
        self._log, self._clock, self._metrics = log, clock, metrics
        #: Bounds what unauthenticated input can make us write.
        self._noisy = RateLimiter(rate=1.0, burst=20)
        self._logs = LimitedLog(_log, clock)
        #: Left out, per (kind, peer): [count, first ms, last ms]; peer None past the cap.
        self._suppressed: dict[tuple[str, str | None], list[int]] = {}

    def audit(self, kind: str, data: dict[str, Any], peer: str | None) -> None:
        try:
            self._log.append(kind, data, peer=peer)
        except TalosError as exc:
            _log.warning("audit entry %s not written: %s", kind, exc)

    def audit_noisy(self, kind: str, data: dict[str, Any], peer: str) -> bool:
        """Audit an event anyone can trigger at will, at most ~1/s per (kind, peer).

        Past the limit the event is still counted in the metrics and logged at
        debug level (rate-limited too), and counted for the next
        ``FAILURES_SUPPRESSED`` entry, but not written. Returns whether it was
        audited (callers log a warning only then).
        """
        if self._noisy.allow((kind, peer), self._clock.monotonic()):
            self._write_suppressed((kind, peer))
            self.audit(kind, data, peer)
            return True
        self._note_suppressed(kind, peer)
        return False

    def _note_suppressed(self, kind: str, peer: str) -> None:
        now = time_ms(self._clock)
        key: tuple[str, str | None] = (kind, peer)
        if key not in self._suppressed and len(self._suppressed) >= MAX_SUPPRESSED_KEYS:
            key = (kind, None)  # too many peers at once: one count for them all
        counted = self._suppressed.setdefault(key, [0, now, now])
        counted[0] += 1
        counted[2] = now
        if self._metrics is not None:
            self._metrics.audit_suppressed()

    def _write_suppressed(self, key: tuple[str, str | None]) -> None:
        counted = self._suppressed.pop(key, None)
        if counted is None:
            return
        count, first, last = counted
        kind, peer = key
        self.audit(
            AuditKind.FAILURES_SUPPRESSED,
            {"kind": str(kind), "count": count, "from_ms": first, "to_ms": last},
            peer,
        )
        _log.warning(
            "%d %s audit entries about %s left out by the rate limit in %.1f s",
            count,
            kind,
            peer or "several peers",
            (last - first) / 1000,
            extra={
                "event": "failures_suppressed",
                "peer_id": peer,
                "kind": str(kind),
                "count": count,
            },
        )

    def flush_suppressed(self, *, older_than: float = 0.0) -> None:
        """Write the ``FAILURES_SUPPRESSED`` entries whose first left-out event is at
        least ``older_than`` seconds old (all of them by default: at close)."""
        limit = time_ms(self._clock) - int(older_than * 1000)
        for key in [k for k, (_, first, _) in self._suppressed.items() if first <= limit]:
            self._write_suppressed(key)

    async def run(self, closed: Callable[[], bool]) -> None:
        """Write what the rate limit left out at most ``SUPPRESSED_FLUSH`` s late."""
        while not closed():
            await timing.sleep(self._clock, SUPPRESSED_FLUSH / 2)
            self.flush_suppressed(older_than=SUPPRESSED_FLUSH)

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
