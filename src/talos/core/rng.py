"""The randomness interface every Talos object that draws random bytes receives.

The real source (:class:`talos.system.SystemRng`) reads the OS CSPRNG; tests
use :class:`talos.testing.SeededRng` to make key generation reproducible.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Rng(Protocol):
    """A source of cryptographically secure random bytes."""

    def bytes(self, n: int) -> bytes:
        """Return ``n`` random bytes."""
        ...
