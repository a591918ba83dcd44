"""Helpers for Talos's tests and for yours: fakes for time and randomness, real processes.

Only time and randomness are faked in Talos's own test suite; everything
else (sockets, LMDB, processes) is real. This package holds:

* here: :class:`FakeClock` and :class:`SeededRng`, to pass as ``clock=`` and ``rng=``;
* :mod:`talos.testing.cli`: :class:`~talos.testing.cli.TalosCli` runs the
  ``talos`` command line as a user would and returns a
  :class:`~talos.testing.cli.CliResult`;
* :mod:`talos.testing.processes`: a registry (``talos registry serve``) and
  agents (``talos run``) as child processes, ready when they say so, stopped
  for sure; :func:`~talos.testing.processes.free_port`;
* :mod:`talos.testing.child`: any child process: read its output with a
  deadline, stop it (SIGTERM, then SIGKILL), stop many at once;
* :mod:`talos.testing.waiting`: :func:`~talos.testing.waiting.wait_until`, to
  wait for something observable instead of sleeping.
* :mod:`talos.testing.prometheus`: a real Prometheus server (Debian's
  ``prometheus``) scraping agents and registries every second, with a
  shortened copy of a rules file, and its alerts' states.

Nothing here imports pytest; only the standard library and httpx.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

__all__ = ["FakeClock", "SeededRng"]


class FakeClock:
    """A clock that moves only when told to.

    ``time()`` and ``monotonic()`` advance together through :meth:`advance`;
    :meth:`set_time` moves only the wall clock, the way an operator (or NTP)
    stepping the system clock would.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = float(start)
        self._mono = 0.0
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever the clock is moved; returns the unsubscribe call.

        Talos's timers use this: a wait on a FakeClock ends when the clock is
        advanced past its deadline, never by real time passing. Move the clock
        from the event loop's thread (callbacks run where ``advance`` is called).
        """
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    def _moved(self) -> None:
        for callback in list(self._listeners):
            callback()

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass (must not be negative)."""
        if seconds < 0:
            raise ValueError("time does not run backwards; use set_time() to step the clock")
        self._wall += seconds
        self._mono += seconds
        self._moved()

    def set_time(self, wall: float) -> None:
        """Step the wall clock to ``wall`` without touching the monotonic clock."""
        self._wall = float(wall)
        self._moved()


class SeededRng:
    """Deterministic bytes from a seed (HMAC-SHA256 in counter mode).

    Reproducible, and distinct seeds give independent streams. Never use it
    outside tests: anyone who knows the seed knows every key.
    """

    def __init__(self, seed: int | bytes = 0) -> None:
        if isinstance(seed, int):
            seed = seed.to_bytes(16, "big", signed=True)
        self._key = hashlib.sha256(b"talos.testing.SeededRng" + seed).digest()
        self._counter = 0

    def bytes(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("n must not be negative")
        out = bytearray()
        while len(out) < n:
            block = self._counter.to_bytes(8, "big")
            out += hmac.digest(self._key, block, "sha256")
            self._counter += 1
        return bytes(out[:n])
