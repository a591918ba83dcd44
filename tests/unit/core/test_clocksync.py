"""Clock offsets from four timestamps, and spotting one identity in two processes."""

from __future__ import annotations

import pytest

from talos.core.clocksync import SAMPLES_PER_PEER, InstanceTracker, PeerClocks, offset_from


def test_offset_is_round_trip_compensated() -> None:
    # The peer is 10 s ahead; the request takes 0.1 s each way, the answer is immediate.
    sample = offset_from(100.0, 110.1, 110.1, 100.2)
    assert sample.offset == pytest.approx(10.0)
    assert sample.delay == pytest.approx(0.2)
    assert sample.at == 100.2


def test_asymmetric_paths_err_by_at_most_half_the_round_trip() -> None:
    # 0.3 s there, 0.1 s back; the peer's clock equals ours.
    sample = offset_from(0.0, 0.3, 0.3, 0.4)
    assert abs(sample.offset - 0.0) <= sample.delay / 2
    assert sample.offset == pytest.approx(0.1)


def test_a_clock_step_backwards_gives_no_negative_delay() -> None:
    assert offset_from(10.0, 5.0, 5.0, 9.0).delay == 0.0


def test_best_sample_is_the_one_with_the_shortest_round_trip() -> None:
    clocks = PeerClocks()
    clocks.add("bob", offset_from(0.0, 5.5, 5.5, 1.0))  # delay 1.0, offset 5.0
    best = clocks.add("bob", offset_from(2.0, 7.05, 7.05, 2.1))  # delay 0.1, offset 5.0
    clocks.add("bob", offset_from(3.0, 9.0, 9.0, 5.0))  # delay 2.0
    assert best.delay == pytest.approx(0.1)
    assert clocks.best("bob") == best
    assert clocks.best("carol") is None
    assert set(clocks.estimates()) == {"bob"}


def test_old_samples_age_out_and_peers_are_bounded() -> None:
    clocks = PeerClocks(max_peers=2)
    clocks.add("bob", offset_from(0.0, 0.0, 0.0, 0.001))  # very good sample
    for i in range(SAMPLES_PER_PEER):
        clocks.add("bob", offset_from(i, i + 3, i + 3, i + 1))
    best = clocks.best("bob")
    assert best is not None
    assert best.delay == pytest.approx(1.0)
    clocks.add("carol", offset_from(0, 0, 0, 1))
    clocks.add("dave", offset_from(0, 0, 0, 1))
    assert set(clocks.estimates()) == {"carol", "dave"}


def test_a_restart_is_not_a_duplicate() -> None:
    tracker = InstanceTracker()
    assert not tracker.observe("bob", b"A")
    assert not tracker.observe("bob", b"A")
    assert not tracker.observe("bob", b"B")  # bob restarted
    assert not tracker.observe("bob", b"B")
    assert not tracker.observe("bob", b"C")  # and again
    assert tracker.duplicates == {}


def test_alternating_instances_are_a_duplicate() -> None:
    tracker = InstanceTracker()
    tracker.observe("bob", b"A")
    tracker.observe("bob", b"B")
    assert tracker.observe("bob", b"A")
    assert tracker.observe("bob", b"B")
    assert not tracker.observe("carol", b"A")  # per sender
    assert tracker.duplicates == {"bob": 2}


def test_tracker_is_bounded() -> None:
    tracker = InstanceTracker(max_peers=2, max_instances=2)
    for instance in (b"A", b"B", b"C"):
        tracker.observe("bob", instance)
    assert not tracker.observe("bob", b"A")  # forgotten: only two ids are kept
    tracker.observe("carol", b"A")
    tracker.observe("dave", b"A")
    tracker.observe("bob", b"Z")  # bob was evicted; starts afresh
    assert not tracker.observe("bob", b"Z")
