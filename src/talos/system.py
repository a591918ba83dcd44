"""The real clock and random source, for production wiring.

These are the only objects that read the system clock and the OS CSPRNG; the
core receives them by injection.
"""

from __future__ import annotations

import os
import time


class SystemClock:
    """The host's clocks: ``time.time()`` and ``time.monotonic()``."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class SystemRng:
    """The operating system CSPRNG (``os.urandom``)."""

    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


SYSTEM_CLOCK = SystemClock()
SYSTEM_RNG = SystemRng()
