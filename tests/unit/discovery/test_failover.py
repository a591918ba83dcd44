"""The registry failover policy (talos.discovery.failover), pure, on a FakeClock."""

from __future__ import annotations

import pytest

from talos.discovery.failover import RETURN_AFTER, Failover, Switch, public_url
from talos.errors import ConfigurationError
from talos.testing import FakeClock


def test_one_url_is_always_asked() -> None:
    policy = Failover(1)
    assert policy.order(0.0) == [0]
    policy.failed(0, 1.0)
    assert policy.order(1000.0) == [0]
    assert policy.answered(0, 1000.0) is None


def test_the_current_url_first_then_the_others_in_configured_order() -> None:
    policy = Failover(3)
    assert policy.order(0.0) == [0, 1, 2]
    assert policy.answered(2, 0.0) == Switch(0, 2)
    assert policy.current == 2
    # Rule 5: when the current fails, the first URL is next.
    assert policy.order(1.0) == [2, 0, 1]


def test_an_answer_from_the_current_url_switches_nothing() -> None:
    policy = Failover(2)
    assert policy.answered(0, 0.0) is None
    policy.answered(1, 0.0)
    assert policy.answered(1, 5.0) is None


def test_back_to_the_first_url_after_return_after(clock: FakeClock) -> None:
    policy = Failover(2)
    policy.answered(1, clock.time())  # failed over
    clock.advance(RETURN_AFTER - 1)
    assert policy.order(clock.time()) == [1, 0]
    clock.advance(1)
    assert policy.order(clock.time()) == [0, 1]
    switch = policy.answered(0, clock.time())
    assert switch == Switch(1, 0)
    assert switch is not None
    assert switch.failback
    assert policy.order(clock.time()) == [0, 1]


def test_a_failed_return_waits_return_after_again(clock: FakeClock) -> None:
    policy = Failover(3)
    policy.answered(1, clock.time())
    clock.advance(RETURN_AFTER)
    assert policy.order(clock.time()) == [0, 1, 2]
    policy.failed(0, clock.time())  # the first URL is still down
    assert policy.answered(1, clock.time()) is None  # the current one served it
    clock.advance(RETURN_AFTER / 2)
    assert policy.order(clock.time()) == [1, 0, 2]
    clock.advance(RETURN_AFTER / 2)
    assert policy.order(clock.time()) == [0, 1, 2]


def test_failures_of_other_urls_do_not_delay_the_return(clock: FakeClock) -> None:
    policy = Failover(3)
    policy.answered(2, clock.time())
    clock.advance(RETURN_AFTER / 2)
    policy.failed(1, clock.time())
    clock.advance(RETURN_AFTER / 2)
    assert policy.order(clock.time())[0] == 0


def test_a_switch_between_backups_is_a_failover_not_a_failback() -> None:
    policy = Failover(3)
    policy.answered(1, 0.0)
    switch = policy.answered(2, 1.0)
    assert switch == Switch(1, 2)
    assert not switch.failback


@pytest.mark.parametrize(("count", "return_after"), [(0, 60.0), (2, -1.0)])
def test_bad_arguments_are_refused(count: int, return_after: float) -> None:
    with pytest.raises(ConfigurationError):
        Failover(count, return_after=return_after)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://registry:8000", "http://registry:8000"),
        ("https://user:s3cret@registry.example/", "https://registry.example"),
        ("http://token@10.0.0.1:9/base?key=s3cret#x", "http://10.0.0.1:9/base"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("http://[::1", "<invalid URL>"),
    ],
)
def test_public_url_never_shows_credentials(url: str, shown: str) -> None:
    assert public_url(url) == shown
    assert "s3cret" not in public_url(url)
