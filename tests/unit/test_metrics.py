"""AgentMetrics: every series from start-up, events move the right ones, /metrics serves."""

from __future__ import annotations

import math

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos import errors
from talos.core import wire
from talos.metrics import (
    DENIAL_REASONS,
    KEY_LOG_REFUSALS,
    OTHER,
    REJECTION_REASONS,
    SIGNATURE_FAILURE_REASONS,
    AgentMetrics,
)

#: The names the seed's alert rules use (as their ``_total`` counter form where counters).
SEED_SERIES = (
    "talos_audit_anchor_failures_total",
    "talos_session_failures_total",
    "talos_signature_failures_total",
    "talos_revocation_list_age_seconds",
)

#: The seed's series that carry a label (the alert ``> 0`` holds for any label value).
LABELLED_SEED_SERIES = {
    "talos_signature_failures_total": ("reason", "bad_signature"),
    "talos_session_failures_total": ("reason", "decrypt_failed"),
}

#: Every unlabelled counter/gauge sample exported, all 0 at start-up.
SCALAR_SERIES = (
    *(name for name in SEED_SERIES if name not in LABELLED_SEED_SERIES),
    "talos_peer_key_updates_total",
    "talos_sessions_active",
    "talos_sessions_established_total",
    "talos_session_resets_total",
    "talos_messages_sent_total",
    "talos_messages_received_total",
    "talos_messages_delivered_total",
    "talos_messages_queued",
    "talos_capabilities_granted_total",
    "talos_capabilities_revoked_total",
    "talos_audit_entries_total",
    "talos_audit_size_bytes",
    "talos_audit_anchor_attempts_total",
    "talos_audit_anchor_mismatches_total",
    "talos_replays_dropped_total",
    "talos_clock_offset_seconds",
    "talos_duplicate_instances_detected_total",
    "talos_transport_throttled_total",
)

HISTOGRAMS = (
    "talos_session_establishment_seconds",
    "talos_message_send_seconds",
    "talos_capability_verification_seconds",
)


def samples(metrics: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse ``render()`` back: (sample name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: AgentMetrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def test_every_series_exists_at_zero_from_start_up() -> None:
    metrics = AgentMetrics()
    got = samples(metrics)
    for name in SCALAR_SERIES:
        assert got[(name, ())] == 0, name
    for name in HISTOGRAMS:
        assert got[(f"{name}_count", ())] == 0, name
        assert got[(f"{name}_bucket", (("le", "+Inf"),))] == 0, name
    assert got[("talos_registry_up", (("url", ""),))] == 0
    for direction in ("sent", "received"):
        assert got[("talos_message_size_bytes_count", (("direction", direction),))] == 0
    for reason in DENIAL_REASONS:
        assert got[("talos_capabilities_denied_total", (("reason", reason),))] == 0, reason
    for reason in REJECTION_REASONS:
        assert got[("talos_messages_rejected_total", (("reason", reason),))] == 0, reason
    for reason in SIGNATURE_FAILURE_REASONS:
        assert got[("talos_signature_failures_total", (("reason", reason),))] == 0, reason
    for reason in KEY_LOG_REFUSALS:
        assert got[("talos_peer_key_logs_refused_total", (("reason", reason),))] == 0, reason


def test_seed_names_are_in_the_exposition_text() -> None:
    text = AgentMetrics().render().decode()
    for name in SEED_SERIES:
        label = LABELLED_SEED_SERIES.get(name)
        shown = name if label is None else f'{name}{{{label[0]}="{label[1]}"}}'
        assert f"\n{shown} 0.0\n" in text, name


def test_denial_reasons_cover_every_capability_denied_subclass() -> None:
    for cls in (
        errors.CapabilityDenied,
        errors.Expired,
        errors.NotYetValid,
        errors.ScopeMismatch,
        errors.Revoked,
        errors.RevocationListStale,
        errors.ChainTooDeep,
        errors.CapabilitySignatureInvalid,
    ):
        assert cls.__name__ in DENIAL_REASONS
    assert OTHER in DENIAL_REASONS
    assert {code.name.lower() for code in wire.ErrorCode} < set(REJECTION_REASONS)


def test_session_events() -> None:
    metrics = AgentMetrics()
    metrics.session_established(0.2)
    metrics.session_established()
    metrics.session_failed()
    metrics.session_reset()
    assert value(metrics, "talos_sessions_established_total") == 2
    assert value(metrics, "talos_session_failures_total", reason="decrypt_failed") == 1
    assert value(metrics, "talos_session_resets_total") == 1
    assert value(metrics, "talos_session_establishment_seconds_count") == 1
    assert value(metrics, "talos_session_establishment_seconds_sum") == pytest.approx(0.2)
    assert value(metrics, "talos_session_establishment_seconds_bucket", le="0.25") == 1
    assert value(metrics, "talos_session_establishment_seconds_bucket", le="0.1") == 0


def test_message_events() -> None:
    metrics = AgentMetrics()
    metrics.message_sent(100)
    metrics.message_sent(5000)
    metrics.message_received(10)
    metrics.message_delivered(0.03)
    metrics.message_delivered()
    metrics.message_rejected(wire.ErrorCode.STALE)
    metrics.message_rejected("capability_denied")
    metrics.message_rejected("made-up")
    assert value(metrics, "talos_messages_sent_total") == 2
    assert value(metrics, "talos_messages_received_total") == 1
    assert value(metrics, "talos_messages_delivered_total") == 2
    assert value(metrics, "talos_message_send_seconds_count") == 1
    assert value(metrics, "talos_message_size_bytes_count", direction="sent") == 2
    assert value(metrics, "talos_message_size_bytes_sum", direction="sent") == 5100
    assert value(metrics, "talos_message_size_bytes_bucket", direction="sent", le="256.0") == 1
    assert value(metrics, "talos_message_size_bytes_count", direction="received") == 1
    assert value(metrics, "talos_messages_rejected_total", reason="stale") == 1
    assert value(metrics, "talos_messages_rejected_total", reason="capability_denied") == 1
    assert value(metrics, "talos_messages_rejected_total", reason=OTHER) == 1
    assert value(metrics, "talos_messages_rejected_total", reason="decrypt_failed") == 0


def test_capability_events() -> None:
    metrics = AgentMetrics()
    metrics.capability_denied(errors.Expired("gone"))
    metrics.capability_denied(errors.Revoked)
    metrics.capability_denied("ScopeMismatch")
    metrics.capability_denied("NoSuchReason")
    with metrics.time_capability_verification():
        pass
    for reason in ("Expired", "Revoked", "ScopeMismatch", OTHER):
        assert value(metrics, "talos_capabilities_denied_total", reason=reason) == 1, reason
    assert value(metrics, "talos_capabilities_denied_total", reason="NotYetValid") == 0
    assert value(metrics, "talos_capability_verification_seconds_count") == 1
    # Only a forged capability is also a signature failure.
    assert value(metrics, "talos_signature_failures_total", reason="bad_signature") == 0
    metrics.capability_denied(errors.CapabilitySignatureInvalid("forged"))
    assert (
        value(metrics, "talos_capabilities_denied_total", reason="CapabilitySignatureInvalid") == 1
    )
    assert value(metrics, "talos_signature_failures_total", reason="bad_signature") == 1
    # One signed by a key its issuer revoked says so (the denial's cause is KeyRevoked).
    denial = errors.CapabilitySignatureInvalid("revoked")
    denial.__cause__ = errors.KeyRevoked("revoked", agent_id="a", sequence=0, rotation=1)
    metrics.capability_denied(denial)
    assert value(metrics, "talos_signature_failures_total", reason="revoked_key") == 1


def test_audit_events() -> None:
    metrics = AgentMetrics()
    metrics.audit_anchor_attempted(succeeded=True)
    metrics.audit_anchor_attempted(succeeded=False)
    assert value(metrics, "talos_audit_anchor_attempts_total") == 2
    assert value(metrics, "talos_audit_anchor_failures_total") == 1
    metrics.audit_anchor_mismatched()
    metrics.audit_anchor_foreign_found(agrees=False)
    assert value(metrics, "talos_audit_anchor_mismatches_total") == 1
    assert value(metrics, "talos_audit_anchor_foreign_total", agrees="no") == 1
    assert value(metrics, "talos_audit_anchor_foreign_total", agrees="yes") == 0


def test_security_events_and_gauges() -> None:
    metrics = AgentMetrics()
    metrics.signature_failed()
    metrics.signature_failed("superseded_key")
    metrics.signature_failed("no such reason")
    metrics.peer_key_updated()
    metrics.peer_key_log_refused("fork")
    metrics.peer_key_log_refused("whatever")
    metrics.replay_dropped()
    metrics.replay_dropped()
    metrics.duplicate_instance_detected()
    metrics.set_revocation_list_age(42.5)
    metrics.set_clock_offset(-3.25)
    metrics.set_registry_reachable(True)
    assert value(metrics, "talos_signature_failures_total", reason="bad_signature") == 2
    assert value(metrics, "talos_signature_failures_total", reason="superseded_key") == 1
    assert value(metrics, "talos_signature_failures_total", reason="revoked_key") == 0
    assert value(metrics, "talos_peer_key_updates_total") == 1
    assert value(metrics, "talos_peer_key_logs_refused_total", reason="fork") == 1
    assert value(metrics, "talos_peer_key_logs_refused_total", reason="other") == 1
    assert value(metrics, "talos_replays_dropped_total") == 2
    assert value(metrics, "talos_duplicate_instances_detected_total") == 1
    assert value(metrics, "talos_revocation_list_age_seconds") == 42.5
    assert value(metrics, "talos_clock_offset_seconds") == -3.25
    assert value(metrics, "talos_registry_up", url="") == 1
    metrics.set_registry_reachable(False)
    assert value(metrics, "talos_registry_up", url="") == 0
    # RevocationState reports +Inf for a list that was never synced.
    metrics.set_revocation_list_age(math.inf)
    assert value(metrics, "talos_revocation_list_age_seconds") == math.inf


def test_registry_up_is_not_applicable_without_a_registry() -> None:
    assert math.isnan(value(AgentMetrics(uses_registry=False), "talos_registry_up", url=""))


def test_registry_up_has_one_series_per_configured_url_from_start_up() -> None:
    metrics = AgentMetrics(registry_urls=["http://r1:8000", "http://r2:8000"])
    assert value(metrics, "talos_registry_up", url="http://r1:8000") == 0
    assert value(metrics, "talos_registry_up", url="http://r2:8000") == 0
    metrics.set_registry_reachable(True, "http://r2:8000")
    metrics.set_registry_reachable(True, "http://not-configured:8000")
    assert value(metrics, "talos_registry_up", url="http://r2:8000") == 1
    assert value(metrics, "talos_registry_up", url="http://r1:8000") == 0
    assert [k for k in samples(metrics) if k[0] == "talos_registry_up"] == [
        ("talos_registry_up", (("url", "http://r1:8000"),)),
        ("talos_registry_up", (("url", "http://r2:8000"),)),
    ]


def test_two_agents_in_one_process_do_not_clash() -> None:
    alice, bob = AgentMetrics(), AgentMetrics()
    alice.message_sent(10)
    alice.capability_denied("Expired")
    assert value(alice, "talos_messages_sent_total") == 1
    assert value(bob, "talos_messages_sent_total") == 0
    assert value(bob, "talos_capabilities_denied_total", reason="Expired") == 0
    assert alice.registry is not bob.registry


def served(metrics: AgentMetrics) -> tuple[str, int] | None:
    return metrics.address  # a call, so mypy does not keep an earlier narrowing


def test_serve_answers_http_get_on_loopback() -> None:
    metrics = AgentMetrics()
    other = AgentMetrics()
    try:
        host, port = metrics.serve(0)
        assert host == "127.0.0.1"
        assert port > 0
        assert metrics.address == (host, port)
        with pytest.raises(RuntimeError):
            metrics.serve(0)
        metrics.replay_dropped()
        other.serve(0)
        response = httpx.get(f"http://{host}:{port}/metrics", timeout=5)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert "\ntalos_replays_dropped_total 1.0\n" in response.text
        for name in SEED_SERIES:
            assert name in response.text
    finally:
        metrics.close()
        other.close()
    metrics.close()  # idempotent
    assert served(metrics) is None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{host}:{port}/metrics", timeout=1)


def test_series_read_when_scraped_follow_their_readers_and_a_failing_one_is_nan() -> None:
    metrics = AgentMetrics()
    held = {"sessions": 2, "entries": 7, "granted": 3, "queued": 5}

    def broken() -> float:
        raise OSError("gone")

    metrics.read_when_scraped(
        sessions_active=lambda: held["sessions"],
        audit_entries=lambda: held["entries"],
        audit_size_bytes=broken,
        capabilities_granted=lambda: held["granted"],
        capabilities_revoked=lambda: 1,
        messages_queued=lambda: held["queued"],
    )
    assert value(metrics, "talos_sessions_active") == 2
    assert value(metrics, "talos_messages_queued") == 5
    assert value(metrics, "talos_audit_entries_total") == 7
    assert math.isnan(value(metrics, "talos_audit_size_bytes"))
    held.update(sessions=0, entries=9, granted=4, queued=0)
    assert value(metrics, "talos_sessions_active") == 0
    assert value(metrics, "talos_messages_queued") == 0
    assert value(metrics, "talos_audit_entries_total") == 9
    assert value(metrics, "talos_capabilities_granted_total") == 4
    assert value(metrics, "talos_capabilities_revoked_total") == 1


def test_lags_tracked_at_scrape_time_follow_their_readers_and_a_failing_one_is_nan() -> None:
    metrics = AgentMetrics(mirrors=["did:talos:m"])
    held = {"mirror": 4.0}

    def broken() -> float:
        raise OSError("the log closed")

    metrics.track_mirror_lag("did:talos:m", lambda: held["mirror"])
    metrics.track_audit_anchor_lag(broken)
    metrics.set_mirror_lag("did:talos:m", 0)  # a loop's last value does not hide the reader's
    assert value(metrics, "talos_audit_mirror_lag_entries", mirror="did:talos:m") == 4
    held["mirror"] = 9
    assert value(metrics, "talos_audit_mirror_lag_entries", mirror="did:talos:m") == 9
    assert math.isnan(value(metrics, "talos_audit_anchor_lag_entries"))
