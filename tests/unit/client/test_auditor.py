"""Auditor: what the per-peer audit rate limit leaves out is written down as
FAILURES_SUPPRESSED entries, counted, and never lost at close."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.client import control
from talos.client.control import SUPPRESSED_FLUSH, Auditor
from talos.metrics import AgentMetrics
from talos.testing import FakeClock

PEER = "did:talos:z6MkpeerOne"
OTHER = "did:talos:z6MkpeerTwo"


def kinds(log: AuditLog) -> list[tuple[str, str | None, object]]:
    return [(e.kind, e.peer, e.data) for e in log.query()]


def suppressed(metrics: AgentMetrics) -> float:
    value = metrics.registry.get_sample_value("talos_audit_entries_suppressed_total")
    assert value is not None
    return value


def test_a_burst_past_the_limit_leaves_one_entry_with_its_count(tmp_path: Path) -> None:
    clock, metrics = FakeClock(), AgentMetrics()
    with AuditLog.open(tmp_path / "log", clock=clock) as log:
        auditor = Auditor(log, clock, metrics)
        written = [auditor.audit_noisy("SIGNATURE_FAILURE", {"n": n}, PEER) for n in range(25)]
        assert written == [True] * 20 + [False] * 5
        assert suppressed(metrics) == 5
        auditor.flush_suppressed(older_than=SUPPRESSED_FLUSH)  # not old enough yet
        assert [k for k, _, _ in kinds(log)].count("FAILURES_SUPPRESSED") == 0
        clock.advance(SUPPRESSED_FLUSH)
        auditor.flush_suppressed(older_than=SUPPRESSED_FLUSH)
        (summary,) = [(p, d) for k, p, d in kinds(log) if k == "FAILURES_SUPPRESSED"]
        start = int(clock.time() * 1000) - int(SUPPRESSED_FLUSH * 1000)
        assert summary == (
            PEER,
            {"kind": "SIGNATURE_FAILURE", "count": 5, "from_ms": start, "to_ms": start},
        )
        auditor.flush_suppressed()  # written once
        assert [k for k, _, _ in kinds(log)].count("FAILURES_SUPPRESSED") == 1


def test_the_next_audited_entry_comes_after_the_count_of_those_left_out(tmp_path: Path) -> None:
    clock = FakeClock()
    with AuditLog.open(tmp_path / "log", clock=clock) as log:
        auditor = Auditor(log, clock)
        for n in range(22):
            auditor.audit_noisy("REPLAY_DROPPED", {"n": n}, PEER)
        clock.advance(1.0)  # one more allowed
        assert auditor.audit_noisy("REPLAY_DROPPED", {"n": 22}, PEER)
        tail = kinds(log)[-2:]
        assert tail[0][:2] == ("FAILURES_SUPPRESSED", PEER)
        assert tail[0][2]["count"] == 2  # type: ignore[index]
        assert tail[1] == ("REPLAY_DROPPED", PEER, {"n": 22})


def test_past_the_cap_further_peers_share_one_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_SUPPRESSED_KEYS", 1)
    clock = FakeClock()
    with AuditLog.open(tmp_path / "log", clock=clock) as log:
        auditor = Auditor(log, clock)
        for peer in (PEER, OTHER, "did:talos:z6MkpeerThree"):
            for n in range(21):
                auditor.audit_noisy("SIGNATURE_FAILURE", {"n": n}, peer)
        auditor.flush_suppressed()
        summaries = sorted(
            (str(p), d["count"])  # type: ignore[index]
            for k, p, d in kinds(log)
            if k == "FAILURES_SUPPRESSED"
        )
    assert summaries == sorted([(PEER, 1), ("None", 2)])
