"""Token buckets: bursts, refill, independent keys, bounded memory."""

from __future__ import annotations

import pytest

from talos.core.ratelimit import RateLimiter
from talos.errors import ConfigurationError


def test_burst_then_refill() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("x", 100.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.refused == 1
    assert not limiter.allow("x", 100.4)  # 0.8 tokens
    assert limiter.allow("x", 100.6)  # 1.2 tokens
    assert limiter.allow("y", 100.6)  # another key has its own bucket


def test_memory_is_bounded_and_forgets_the_oldest() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=2)
    assert limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert limiter.allow("c", 0.0)  # "a" is forgotten
    assert limiter.allow("a", 0.0)  # a fresh bucket again
    assert not limiter.allow("c", 0.0)


def test_time_going_backwards_grants_nothing() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.allow("k", 10.0)
    assert not limiter.allow("k", 5.0)


def test_validation() -> None:
    with pytest.raises(ConfigurationError):
        RateLimiter(rate=0, burst=1)


def test_forget_drops_a_bucket() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.allow("k", 0.0)
    assert not limiter.allow("k", 0.0)
    limiter.forget("k")
    limiter.forget("never seen")
    assert limiter.allow("k", 0.0)  # a fresh bucket


def test_available_takes_nothing() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.available("x", 0.0)
    assert limiter.available("x", 0.0)  # looking twice takes nothing
    assert limiter.allow("x", 0.0)
    assert not limiter.available("x", 0.5)
    assert limiter.refused == 0  # a look is not a refusal
    assert limiter.available("x", 1.0)
