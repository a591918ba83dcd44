"""The anchoring driver prunes after a final anchor (``prune_after_anchor``), on a real anvil.

Time and randomness are fake; the chain, the RPC and the LMDB log are real.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.anchoring.chain import Chain
from talos.audit.anchoring.deploy import deploy
from talos.audit.anchoring.driver import Anchorer
from talos.audit.anchoring.store import DATABASE
from talos.audit.anchoring.wallet import load_wallet
from talos.core.anchoring import Finality, Outcome, Schedule
from talos.core.crypto import SigningKey
from talos.errors import StorageError
from talos.metrics import AgentMetrics
from talos.testing import FakeClock, SeededRng
from talos.testing.chain import DEV_KEYS, AnvilProcess, start_anvil

INTERVAL = 600.0


@dataclass
class Rig:
    anvil: AnvilProcess
    log: AuditLog
    clock: FakeClock
    metrics: AgentMetrics
    anchorer: Anchorer

    def sample(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        assert value is not None
        return value

    def anchor_once(self) -> None:
        """Anchor the newest checkpoint and step until it is final (3 confirmations)."""
        self.anchorer.step()
        self.anchorer.step()
        self.anvil.mine(2)
        self.anchorer.step()
        assert self.anchorer.last.outcome is Outcome.FINAL


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    anvil = start_anvil(tmp_path / "anvil.log")
    clock = FakeClock()
    chain = Chain(anvil.url, timeout=5.0)
    (tmp_path / "wallet.hex").write_text(DEV_KEYS[0])
    wallet = load_wallet(tmp_path / "wallet.hex", lambda: None)
    contract = deploy(chain, wallet).address
    signer = LogSigner(SigningKey(b"\x06" * 32), "pruning-agent", "pruning-agent/audit")
    log = AuditLog.open(
        tmp_path / "audit",
        signer=signer,
        clock=clock,
        extra_databases=(DATABASE,),
        block_entries=16,
        prune_after_anchor=True,
    )
    log.append_many(("MESSAGE_SENT", {"n": i}, None) for i in range(32))
    metrics = AgentMetrics()
    anchorer = Anchorer(
        log,
        chain,
        wallet,
        contract,
        schedule=Schedule(interval=INTERVAL, poll=1.0, retry_base=2.0),
        finality=Finality(3),
        clock=clock,
        rng=SeededRng(7),
        metrics=metrics,
    )
    try:
        yield Rig(anvil, log, clock, metrics, anchorer)
    finally:
        log.close()
        chain.close()
        anvil.stop()


def test_a_final_anchor_is_pruned_and_its_record_asks_for_no_new_anchor(rig: Rig) -> None:
    log = rig.log
    rig.anchor_once()
    assert log.pruning().entries == 32
    assert rig.sample("talos_audit_pruned_entries_total") == 32
    assert rig.sample("talos_audit_anchor_failures_total") == 0
    [pruned] = log.query(kind="AUDIT_PRUNED")
    [anchored] = log.query(kind="AUDIT_ANCHORED")
    assert pruned.data["anchor_seq"] == anchored.seq
    assert pruned.seq == log.size - 1
    # The log grew by its AUDIT_ANCHORED and AUDIT_PRUNED entries only: nothing new to anchor.
    rig.clock.advance(INTERVAL)
    rig.anchorer.step()
    assert rig.anchorer.store.current() is None
    assert rig.sample("talos_audit_anchor_lag_entries") == 0
    # New entries are anchored and pruned in turn; the anchors themselves stay readable.
    # (The clock moved past block_seconds: this append first seals the two records alone.)
    log.append_many(("MESSAGE_SENT", {"n": i}, None) for i in range(16))  # one more block
    rig.anchor_once()
    assert log.pruning().entries == 48
    assert [entry.kind for entry in log.query()][:2] == ["AUDIT_ANCHORED", "AUDIT_PRUNED"]
    assert len(log.query(kind="AUDIT_ANCHORED")) == 2
    assert log.verify_chain().ok


def test_a_failed_pruning_is_logged_retried_and_not_an_anchoring_failure(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    log = rig.log
    real = log.prune_anchored
    broken = [True]

    def failing(*, limit: int | None = None) -> object:
        if broken[0]:
            raise StorageError("disk trouble")
        return real(limit=limit)

    log.prune_anchored = failing  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="talos.audit.anchoring"):
        rig.anchor_once()
    assert log.pruning().entries == 0
    assert {r.event for r in caplog.records} == {"audit_prune_failed"}  # type: ignore[attr-defined]
    assert "disk trouble" in caplog.records[-1].getMessage()
    assert rig.sample("talos_audit_anchor_failures_total") == 0
    broken[0] = False
    rig.anchorer.step()  # tried again on the next step
    assert log.pruning().entries == 32
