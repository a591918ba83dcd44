"""Waiting on something observable instead of sleeping a guessed time.

A test (or the demo) that needs a port to answer, a file to appear or a
counter to move polls for exactly that with :func:`wait_until`, bounded by a
timeout that names what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    *,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy.

    Returns that value. An exception from ``predicate`` propagates at once
    (a process that died need not be waited for).

    Raises:
        TimeoutError: ``predicate`` stayed falsy for ``timeout`` seconds; the
            message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
