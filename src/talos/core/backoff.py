"""Retry delays: exponential backoff with full jitter, capped.

The seed's "Peer Disconnection" requires automatic reconnection with a
configurable interval (default 30 s between retries). Delays grow as
``base * 2**attempt`` up to ``cap`` (the ``reconnect_interval``); each delay
is drawn uniformly from ``[delay/2, delay]`` ("equal jitter"), so a crowd of
agents that lost the same peer does not reconnect in lock-step, while a
retry never comes sooner than half the planned delay.
"""

from __future__ import annotations

from dataclasses import dataclass

from talos.core.rng import Rng
from talos.errors import ConfigurationError

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """A retry schedule; :meth:`delay` is pure given the random source."""

    base: float = 0.2
    cap: float = 30.0

    def __post_init__(self) -> None:
        if not (0 < self.base <= self.cap):
            raise ConfigurationError("backoff needs 0 < base <= cap (reconnect_interval)")

    def delay(self, attempt: int, rng: Rng) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(max(attempt, 0), 62))
        fraction = int.from_bytes(rng.bytes(4), "big") / 2**32
        return ceiling / 2 + fraction * ceiling / 2
