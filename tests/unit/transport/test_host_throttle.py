"""Rule 5 of talos.transport.admission: an address is refused for a while, in bounded memory."""

from __future__ import annotations

import pytest

from talos.errors import ConfigurationError
from talos.transport.admission import HostThrottle


def test_an_address_is_held_for_its_seconds_then_let_in() -> None:
    throttle = HostThrottle(30.0)
    throttle.add("10.0.0.1", now=100.0)
    assert throttle.holds("10.0.0.1", 100.0)
    assert throttle.holds("10.0.0.1", 129.9)
    assert not throttle.holds("10.0.0.2", 110.0)
    assert not throttle.holds("10.0.0.1", 130.0)
    assert len(throttle) == 0  # the expired entry is gone


def test_throttling_again_extends_the_time() -> None:
    throttle = HostThrottle(30.0)
    throttle.add("h", now=0.0)
    throttle.add("h", now=20.0)
    assert throttle.holds("h", 45.0)


def test_memory_is_bounded_and_the_oldest_is_forgotten_first() -> None:
    throttle = HostThrottle(30.0, max_hosts=3)
    for n in range(10):
        throttle.add(f"h{n}", now=float(n))
    assert len(throttle) == 3
    assert not throttle.holds("h6", 10.0)
    assert all(throttle.holds(f"h{n}", 10.0) for n in (7, 8, 9))


@pytest.mark.parametrize(("seconds", "max_hosts"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_bad_limits_are_refused(seconds: float, max_hosts: int) -> None:
    with pytest.raises(ConfigurationError):
        HostThrottle(seconds, max_hosts)
