"""Waiting on the agent's injected clock.

Every timer and deadline of an agent (ACK deadlines, ``send(timeout=...)``,
``receive(timeout=...)``, backoff, re-announcements) is measured on the
:class:`~talos.core.clock.Clock` the agent was created with. With the
system clock a wait is a real-time wait. A clock that moves only when told
to (:class:`talos.testing.FakeClock`) offers ``subscribe(callback)``; a wait
on it ends when the clock is moved past the deadline, and never by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from talos.core.clock import Clock

__all__ = ["sleep", "wait_first", "wait_own"]


class _Subscribable(Protocol):
    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]: ...


async def wait_first(
    clock: Clock, deadline: float | None, waiting: Iterable[asyncio.Future[Any]]
) -> None:
    """Return once one of ``waiting`` is done, or ``clock.monotonic()`` reaches
    ``deadline`` (``None``: no deadline). Raises nothing of the futures'."""
    futures = set(waiting)
    subscribe = getattr(clock, "subscribe", None)
    if subscribe is None or deadline is None:
        timeout = None if deadline is None else max(0.0, deadline - clock.monotonic())
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return
    loop = asyncio.get_running_loop()
    while clock.monotonic() < deadline and not any(f.done() for f in futures):
        moved: asyncio.Future[None] = loop.create_future()

        def _moved(moved: asyncio.Future[None] = moved) -> None:
            if not moved.done():
                moved.set_result(None)

        unsubscribe = subscribe(_moved)
        try:
            await asyncio.wait({*futures, moved}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            unsubscribe()
            moved.cancel()


async def wait_own(clock: Clock, deadline: float, future: asyncio.Future[None]) -> None:
    """:func:`wait_first` for one future that the caller made for this wait alone:
    on the real clock the deadline is a timer that resolves ``future`` itself
    (no ``asyncio.wait``, whose waiter, callbacks and timeout handle cost about
    twice as much, once per waiting ``send()``)."""
    if getattr(clock, "subscribe", None) is not None:
        await wait_first(clock, deadline, (future,))
        return

    def due() -> None:
        if not future.done():
            future.set_result(None)

    timer = asyncio.get_running_loop().call_later(max(0.0, deadline - clock.monotonic()), due)
    try:
        await future
    finally:
        timer.cancel()


async def sleep(clock: Clock, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Sleep ``seconds`` on ``clock``, or until ``wake`` is set."""
    woken = asyncio.ensure_future(wake.wait()) if wake is not None else None
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        await wait_first(clock, clock.monotonic() + seconds, [woken or never])
    finally:
        never.cancel()
        if woken is not None:
            woken.cancel()
