"""talos.logs.LimitedLog: lines anyone can cause, at a bounded rate, with suppressed counts."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import talos
from talos.logs import EVENTS, LimitedLog, suppressed_lines
from talos.metrics import AgentMetrics
from talos.testing import FakeClock


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.DEBUG, logger="talos.test_limited")
    return logging.getLogger("talos.test_limited")


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "talos.test_limited"]


def test_a_source_past_its_burst_is_suppressed_and_the_next_line_says_how_many(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    logs = LimitedLog(logger, clock, per_source=(0.1, 3), per_event=(100.0, 100))
    written = [
        logs.warning("malformed_frame", "bad frame %d", n, source="10.0.0.1") for n in range(50)
    ]
    assert written == [True] * 3 + [False] * 47
    clock.advance(10)  # one token back
    assert logs.warning("malformed_frame", "bad frame %d", 50, source="10.0.0.1")
    records = lines(caplog)
    assert len(records) == 4
    last = records[-1]
    assert last.getMessage() == "bad frame 50 (47 more suppressed in the last 10 s)"
    assert last.__dict__["suppressed"] == 47
    assert last.__dict__["event"] == "malformed_frame"
    assert "suppressed" not in records[0].__dict__


def test_many_sources_are_bounded_by_the_events_budget_and_memory_by_max_sources(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    logs = LimitedLog(logger, clock, per_source=(0.1, 5), per_event=(1.0, 20), max_sources=64)
    for n in range(10_000):
        logs.warning("unknown_sender", "from %s", n, source=f"host-{n}")
    assert len(lines(caplog)) == 20
    assert len(logs._sources._buckets) == 64  # the LRU of sources never grows past its bound


def test_suppressed_lines_are_counted_for_the_metrics(logger: logging.Logger) -> None:
    before = suppressed_lines().get("misaddressed_frame", 0)
    logs = LimitedLog(logger, FakeClock(), per_source=(0.1, 1), per_event=(1.0, 5))
    for _ in range(11):
        logs.warning("misaddressed_frame", "x", source="h")
    assert suppressed_lines()["misaddressed_frame"] == before + 10
    text = AgentMetrics().render().decode()
    value = re.search(r'talos_log_lines_suppressed_total\{event="misaddressed_frame"\} (\S+)', text)
    assert value is not None
    assert float(value.group(1)) == before + 10
    assert 'talos_log_lines_suppressed_total{event="other"} ' in text


def test_lines_below_the_level_are_neither_written_nor_counted(logger: logging.Logger) -> None:
    logger.setLevel(logging.WARNING)
    try:
        logs = LimitedLog(logger, FakeClock(), per_source=(0.1, 1), per_event=(1.0, 1))
        before = suppressed_lines().get("dht_datagram_refused", 0)
        for _ in range(5):
            assert not logs.log(logging.DEBUG, "dht_datagram_refused", "x", source="h")
        assert suppressed_lines().get("dht_datagram_refused", 0) == before
    finally:
        logger.setLevel(logging.NOTSET)


def test_every_event_logged_through_a_limited_log_is_documented() -> None:
    """The event names LimitedLog calls pass as literals are in EVENTS (the other test
    of this kind only sees ``"event": "..."`` extras)."""
    root = Path(talos.__file__).parent
    call = re.compile(r'\.(?:warning|log)\(\s*(?:logging\.[A-Z]+,\s*)?"([a-z_]+)",')
    used = {name for path in root.rglob("*.py") for name in call.findall(path.read_text())}
    assert {"malformed_frame", "link_closed_malformed", "registry_rejected"} <= used
    assert used <= EVENTS, sorted(used - EVENTS)
