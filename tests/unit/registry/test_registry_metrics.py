"""The registry's metrics in-process: series at zero, bounded labels, what moves them."""

from __future__ import annotations

import logging
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families
from registry_fixtures import CBOR, Agent, Served

from talos.errors import StorageError
from talos.registry.metrics import REJECTION_REASONS, SUBMISSION_KINDS, RegistryMetrics
from talos.registry.store import LiveCounts
from talos.testing import FakeClock

pytestmark = pytest.mark.asyncio

A, B = b"\x0a" * 16, b"\x0b" * 16


def samples(text: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: bytes | str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


async def test_every_labelled_series_exists_at_zero() -> None:
    metrics = RegistryMetrics()
    metrics.declare_routes([("GET", "/v1/time"), ("HEAD", "/v1/time")])
    text = metrics.render()
    for kind in SUBMISSION_KINDS:
        for reason in REJECTION_REASONS:
            assert value(text, "talos_registry_rejections_total", kind=kind, reason=reason) == 0
    for status in ("2xx", "3xx", "4xx", "5xx"):
        labels = {"method": "GET", "route": "/v1/time", "status": status}
        assert value(text, "talos_registry_requests_total", **labels) == 0
    assert ("talos_registry_requests_total", frozenset({("method", "HEAD")})) not in samples(text)
    for gauge in ("live_agents", "live_instances", "duplicate_identities"):
        assert value(text, f"talos_registry_{gauge}") == 0


async def test_labels_stay_bounded() -> None:
    metrics = RegistryMetrics()
    metrics.submission_rejected("record", "SomethingNew")
    metrics.request_answered("DELETE", "other", 418, 0.01)
    metrics.request_answered("GET", "other", 999, 0.01)
    text = metrics.render()
    assert value(text, "talos_registry_rejections_total", kind="record", reason="other") == 1
    labels = {"method": "other", "route": "other"}
    assert value(text, "talos_registry_requests_total", status="4xx", **labels) == 1
    assert (
        value(text, "talos_registry_requests_total", status="5xx", **labels | {"method": "GET"})
        == 1
    )


async def test_gauges_are_read_at_scrape_time_and_nan_when_the_database_fails() -> None:
    metrics = RegistryMetrics()
    counts = [LiveCounts(3, 5, 1)]

    def read() -> LiveCounts:
        if not counts:
            raise StorageError("disk I/O error")
        return counts.pop()

    metrics.attach(read)
    text = metrics.render()
    assert value(text, "talos_registry_live_agents") == 3
    assert value(text, "talos_registry_live_instances") == 5
    assert value(text, "talos_registry_duplicate_identities") == 1
    text = metrics.render()
    assert math.isnan(value(text, "talos_registry_live_agents"))
    assert value(text, "talos_registry_db_errors_total") == 1
    metrics.detach()
    assert value(metrics.render(), "talos_registry_live_agents") == 0


async def test_the_app_counts_what_happens(
    served: Served, alice: Agent, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"/v1/agents/{alice.agent_id}"
    http = served.http
    await http.put(f"{base}/keylog", content=alice.identity.keylog.to_bytes(), headers=CBOR)
    await http.put(f"{base}/prekeys", content=alice.upload(1).to_bytes(), headers=CBOR)
    assert (await http.get(f"{base}/bundle")).status_code == 200
    assert (await http.get(f"{base}/bundle")).status_code == 200
    with caplog.at_level(logging.INFO, logger="talos.registry"):
        stale = await http.put(
            f"{base}/prekeys", content=alice.upload(sequence=1).to_bytes(), headers=CBOR
        )
    assert stale.status_code == 409
    [refusal] = [r for r in caplog.records if getattr(r, "event", None) == "registry_rejected"]
    assert refusal.levelno == logging.INFO
    assert (refusal.__dict__["peer_id"], refusal.__dict__["kind"]) == (alice.agent_id, "prekeys")
    assert refusal.__dict__["reason"] == "StaleSequence"
    for instance in (A, B, A):
        await http.put(
            f"{base}/record", content=alice.record(instance=instance).to_bytes(), headers=CBOR
        )
        clock.advance(1)
    text = (await http.get("/metrics")).text
    assert value(text, "talos_registry_one_time_prekeys_served_total") == 1
    assert value(text, "talos_registry_bundles_without_one_time_prekey_total") == 1
    assert (
        value(text, "talos_registry_rejections_total", kind="prekeys", reason="StaleSequence") == 1
    )
    assert value(text, "talos_registry_duplicate_instances_total") == 1
    assert value(text, "talos_registry_duplicate_identities") == 1
    assert value(text, "talos_registry_live_agents") == 1
    assert value(text, "talos_registry_live_instances") == 2
    bundle = {"method": "GET", "route": "/v1/agents/{agent_id}/bundle"}
    assert value(text, "talos_registry_requests_total", status="2xx", **bundle) == 2
    assert value(text, "talos_registry_request_duration_seconds_count", **bundle) == 2
    assert "/metrics" not in (await http.get("/openapi.json")).json()["paths"]


async def test_the_app_declares_every_route_at_zero(served: Served) -> None:
    text = (await served.http.get("/metrics")).text
    for method, route in (
        ("GET", "/v1/agents/{agent_id}/duplicates"),
        ("GET", "/v1/duplicates"),
        ("PUT", "/v1/revocations/{issuer}"),
        ("GET", "/openapi.json"),
    ):
        labels = {"method": method, "route": route}
        assert value(text, "talos_registry_requests_total", status="5xx", **labels) == 0
        assert value(text, "talos_registry_request_duration_seconds_count", **labels) == 0


async def test_a_database_failure_is_counted(served: Served, alice: Agent) -> None:
    served.store.close()
    answer = await served.http.get(f"/v1/agents/{alice.agent_id}/keylog")
    assert answer.status_code == 503
    text = (await served.http.get("/metrics")).text
    assert value(text, "talos_registry_db_errors_total") >= 2  # the request and the gauges
    labels = {"method": "GET", "route": "/v1/agents/{agent_id}/keylog", "status": "5xx"}
    assert value(text, "talos_registry_requests_total", **labels) == 1
