"""Replay window (talos.core.replay)."""

from __future__ import annotations

from typing import Any

import pytest

from talos.core.encoding import canonical_dumps
from talos.core.replay import (
    DEFAULT_MAX_SKEW_MS,
    DEFAULT_WINDOW_MS,
    ReplayWindow,
)
from talos.errors import (
    ConfigurationError,
    DuplicateMessage,
    LocalProtocolError,
    MalformedFrame,
    StaleMessage,
    UnsupportedVersion,
)
from talos.testing import FakeClock

NOW = 1_700_000_000_000
WINDOW = 10_000
SKEW = 1_000


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def window() -> ReplayWindow:
    return ReplayWindow(window_ms=WINDOW, max_skew_ms=SKEW)


def test_defaults_are_one_hour_and_sixty_seconds() -> None:
    replay = ReplayWindow()
    assert replay.window_ms == DEFAULT_WINDOW_MS == 3_600_000
    assert replay.max_skew_ms == DEFAULT_MAX_SKEW_MS == 60_000


def test_duplicate_is_rejected(window: ReplayWindow) -> None:
    window.record(mid(1), NOW, NOW)
    with pytest.raises(DuplicateMessage):
        window.check(mid(1), NOW, NOW + 5)
    with pytest.raises(DuplicateMessage):
        window.record(mid(1), NOW - 3, NOW + 5)
    window.check(mid(2), NOW, NOW)


def test_check_does_not_record(window: ReplayWindow) -> None:
    window.check(mid(1), NOW, NOW)
    window.check(mid(1), NOW, NOW)
    assert mid(1) not in window
    assert len(window) == 0


def test_copy_is_independent_for_clone_then_commit(window: ReplayWindow) -> None:
    window.record(mid(1), NOW, NOW)
    tentative = window.copy()
    tentative.record(mid(2), NOW, NOW)
    window.check(mid(2), NOW, NOW)  # the original is untouched until committed
    assert mid(2) in tentative
    assert mid(1) in tentative
    assert tentative.to_bytes() != window.to_bytes()


def test_stale_boundary_is_inclusive_of_the_window(window: ReplayWindow) -> None:
    window.check(mid(1), NOW - WINDOW, NOW)
    with pytest.raises(StaleMessage, match="replay window"):
        window.check(mid(1), NOW - WINDOW - 1, NOW)


def test_future_boundary_is_the_skew_tolerance(window: ReplayWindow) -> None:
    window.check(mid(1), NOW + SKEW, NOW)
    with pytest.raises(StaleMessage, match="clock skew"):
        window.check(mid(1), NOW + SKEW + 1, NOW)


def test_zero_skew_tolerance() -> None:
    replay = ReplayWindow(max_skew_ms=0)
    replay.check(mid(1), NOW, NOW)
    with pytest.raises(StaleMessage, match="clock skew"):
        replay.check(mid(1), NOW + 1, NOW)


def test_old_ids_are_pruned_as_time_moves_on(window: ReplayWindow) -> None:
    clock = FakeClock(NOW / 1000)
    for n in range(100):
        now = int(clock.time() * 1000)
        window.record(mid(n), now, now)
        clock.advance(1.0)
    # 100 s passed with a 10 s window: only the last ten seconds are kept.
    assert len(window) == 11
    assert mid(88) not in window
    assert mid(89) in window
    assert window.floor_ms == NOW + 99_000 - WINDOW


def test_explicit_prune(window: ReplayWindow) -> None:
    window.record(mid(1), NOW, NOW)
    window.record(mid(2), NOW + 5_000, NOW + 5_000)
    window.prune(NOW + WINDOW)
    assert len(window) == 2
    window.prune(NOW + WINDOW + 1)
    assert mid(1) not in window
    assert mid(2) in window


def test_pruned_id_stays_rejected_when_the_clock_steps_back(window: ReplayWindow) -> None:
    window.record(mid(1), NOW, NOW)
    window.record(mid(2), NOW + 2 * WINDOW, NOW + 2 * WINDOW)  # prunes mid(1)
    assert mid(1) not in window
    with pytest.raises(StaleMessage):
        window.check(mid(1), NOW, NOW)  # clock stepped back: the floor still refuses it


def test_memory_bound_evicts_oldest_and_raises_floor() -> None:
    replay = ReplayWindow(window_ms=WINDOW, max_entries=3)
    for n in range(5):
        replay.record(mid(n), NOW + n, NOW + 10)
    assert len(replay) == 3
    assert replay.floor_ms == NOW + 2
    for n in (0, 1):
        with pytest.raises(StaleMessage):
            replay.check(mid(n), NOW + n, NOW + 10)
    with pytest.raises(DuplicateMessage):
        replay.check(mid(2), NOW + 2, NOW + 10)


@pytest.mark.parametrize(
    ("message_id", "timestamp", "now"),
    [
        (b"", NOW, NOW),
        (b"\x00" * 65, NOW, NOW),
        ("id", NOW, NOW),
        (mid(1), 1.5, NOW),
        (mid(1), NOW, -1),
        (mid(1), True, NOW),
        (mid(1), 2**63, NOW),
    ],
)
def test_bad_arguments_are_local_errors(message_id: Any, timestamp: Any, now: Any) -> None:
    with pytest.raises(LocalProtocolError):
        ReplayWindow().check(message_id, timestamp, now)


@pytest.mark.parametrize(
    "config",
    [{"window_ms": 0}, {"window_ms": 1.5}, {"max_skew_ms": -1}, {"max_entries": 0}],
)
def test_bad_configuration_is_rejected(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ReplayWindow(**config)


# -- persistence ----------------------------------------------------------------------


def filled() -> ReplayWindow:
    replay = ReplayWindow(window_ms=WINDOW, max_skew_ms=SKEW)
    for n in range(20):
        replay.record(mid(n), NOW + 1_000 * n - (n % 3), NOW + 1_000 * n)
    return replay


def test_serialization_round_trip() -> None:
    replay = filled()
    data = replay.to_bytes()
    loaded = ReplayWindow.from_bytes(data, window_ms=WINDOW, max_skew_ms=SKEW)
    assert loaded.to_bytes() == data
    assert loaded.floor_ms == replay.floor_ms
    assert len(loaded) == len(replay)
    with pytest.raises(DuplicateMessage):
        loaded.check(mid(19), NOW + 19_000, NOW + 19_000)
    with pytest.raises(StaleMessage):
        loaded.check(mid(1), NOW + 1_000, NOW + 1_000)
    loaded.record(mid(99), NOW + 20_000, NOW + 20_000)
    assert mid(99) in loaded


def test_empty_round_trip() -> None:
    data = ReplayWindow().to_bytes()
    assert ReplayWindow.from_bytes(data).to_bytes() == data


def test_serialization_is_deterministic() -> None:
    a = ReplayWindow()
    b = ReplayWindow()
    a.record(mid(1), NOW, NOW)
    a.record(mid(2), NOW - 5, NOW)
    b.record(mid(2), NOW - 5, NOW)
    b.record(mid(1), NOW, NOW)
    assert a.to_bytes() == b.to_bytes()


def test_loading_under_a_smaller_bound_evicts_oldest() -> None:
    loaded = ReplayWindow.from_bytes(filled().to_bytes(), max_entries=4)
    assert len(loaded) == 4
    assert mid(19) in loaded
    assert mid(15) not in loaded


def state(**changes: Any) -> bytes:
    base: dict[str, Any] = {"v": 1, "floor": NOW, "ids": [[mid(1), NOW], [mid(2), NOW + 1]]}
    base.update(changes)
    return canonical_dumps({k: v for k, v in base.items() if v is not ...})


def test_hand_made_state_loads() -> None:
    assert len(ReplayWindow.from_bytes(state())) == 2


@pytest.mark.parametrize(
    "data",
    [
        state(v=...),
        state(floor=...),
        state(extra=1),
        state(v="1"),
        state(floor=-1),
        state(floor=2**63),
        state(ids={}),
        state(ids=[[mid(1)]]),
        state(ids=[[mid(1), NOW, 0]]),
        state(ids=[[b"", NOW]]),
        state(ids=[[b"\x00" * 65, NOW]]),
        state(ids=[[mid(1), "now"]]),
        state(ids=[[mid(1), NOW - 1]]),  # below the floor
        state(ids=[[mid(2), NOW + 1], [mid(1), NOW]]),  # unsorted
        state(ids=[[mid(1), NOW], [mid(1), NOW]]),  # repeated
        state(ids=[[mid(1), NOW], [mid(2), NOW + 1], [mid(1), NOW + 2]]),  # repeated id
        canonical_dumps([1, NOW, []]),
        b"",
        b"\xff",
    ],
)
def test_corrupt_state_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        ReplayWindow.from_bytes(data)


def test_unknown_state_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedVersion):
        ReplayWindow.from_bytes(state(v=2))


def test_oversized_state_is_malformed() -> None:
    data = filled().to_bytes()
    with pytest.raises(MalformedFrame, match="exceeds"):
        ReplayWindow.from_bytes(data, max_size=len(data) - 1)
