"""The running registry sweeps expired records: counted, logged, failures survived."""

from __future__ import annotations

import logging

import pytest
from registry_fixtures import Agent
from test_registry_metrics import value

from talos.registry.app import sweep_once
from talos.registry.metrics import RegistryMetrics
from talos.registry.store import RegistryStore
from talos.testing import FakeClock


@pytest.mark.asyncio
async def test_a_sweep_counts_and_logs_what_it_deleted(
    store: RegistryStore, alice: Agent, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = RegistryMetrics()
    store.put_keylog(alice.identity.keylog, now_ms=int(clock.time() * 1000))
    store.put_record(alice.record(lifetime=10, instance=b"\x01" * 16), now=clock.time())
    store.put_record(alice.record(lifetime=100, instance=b"\x02" * 16), now=clock.time())
    assert await sweep_once(store, clock, metrics) == 0
    clock.advance(11)
    with caplog.at_level(logging.INFO, logger="talos.registry"):
        assert await sweep_once(store, clock, metrics) == 1
    assert [r.event for r in caplog.records] == ["registry_swept"]  # type: ignore[attr-defined]
    assert value(metrics.render(), "talos_registry_records_swept_total") == 1


@pytest.mark.asyncio
async def test_a_failed_sweep_is_counted_not_raised(
    store: RegistryStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = RegistryMetrics()
    store.close()
    assert await sweep_once(store, clock, metrics) is None
    assert value(metrics.render(), "talos_registry_db_errors_total") == 1
    assert "registry_sweep_failed" in [getattr(r, "event", None) for r in caplog.records]
