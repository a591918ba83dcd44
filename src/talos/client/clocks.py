"""How far other clocks are from ours: the registry's and each peer's.

Estimates come from the registry's time endpoint and from peers' signed
ACKs; an offset beyond WARN_OFFSET is logged (at most once a minute per
reference) because past 60 s envelopes and capabilities are refused.
"""

from __future__ import annotations

import logging

from talos.core import wire
from talos.core.clock import Clock
from talos.core.clocksync import WARN_OFFSET, PeerClocks, offset_from
from talos.metrics import AgentMetrics

_log = logging.getLogger("talos.client")


class ClockWatch:
    """Clock offsets this agent knows, and the warnings about them."""

    def __init__(self, clock: Clock, metrics: AgentMetrics) -> None:
        self._clock, self._metrics = clock, metrics
        self.peers = PeerClocks()
        self._warned: dict[str, float] = {}
        #: Offset of our clock from the registry's (seconds, positive: we are ahead).
        self.registry_offset: float | None = None

    def set_registry_offset(self, offset: float) -> None:
        self.registry_offset = offset
        self._metrics.set_clock_offset(offset)
        self.warn("registry", offset)

    def warn(self, reference: str, ours_minus_theirs: float) -> None:
        """Log a clock_skew warning (at most once a minute per reference) above WARN_OFFSET."""
        if abs(ours_minus_theirs) <= WARN_OFFSET:
            return
        now = self._clock.monotonic()
        if now - self._warned.get(reference, -120.0) < 60.0:
            return
        self._warned[reference] = now
        _log.warning(
            "our clock is %+.1f s off %s's; beyond 60 s envelopes and capabilities are refused",
            ours_minus_theirs,
            reference,
            extra={
                "event": "clock_skew",
                "peer_id": None if reference == "registry" else reference,
                "offset_s": round(ours_minus_theirs, 3),
            },
        )

    def sample_ack(self, envelope: wire.Envelope, sent_times: list[float]) -> None:
        """Estimate the peer's clock offset from a signed ACK to messages we timed
        (the one sent last bounds the offset most tightly)."""
        if not sent_times:
            return
        sent = max(sent_times)
        theirs = envelope.timestamp_ms / 1000
        best = self.peers.add(
            envelope.sender, offset_from(sent, theirs, theirs, self._clock.time())
        )
        self.warn(envelope.sender, -best.offset)
        if self.registry_offset is None:
            offsets = sorted(-s.offset for s in self.peers.estimates().values())
            self._metrics.set_clock_offset(offsets[len(offsets) // 2])
