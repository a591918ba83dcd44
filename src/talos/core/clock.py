"""The clock interface every stateful Talos object receives.

Core code never reads the system clock; it is handed a :class:`Clock`. The
real one lives in :mod:`talos.system`, the fake one in :mod:`talos.testing`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """A source of time."""

    def time(self) -> float:
        """Wall-clock seconds since the Unix epoch (may jump when the clock is set)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never go backwards (for timeouts)."""
        ...


def time_ms(clock: Clock) -> int:
    """Wall-clock time in whole milliseconds, the unit used on the wire."""
    return int(clock.time() * 1000)
