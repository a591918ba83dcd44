"""A running agent's watch over its own anchors, against a real anvil (issue 15).

The anchors that contradict the log come from the agent's own wallet used
elsewhere (another process, a stolen wallet key): they are audited as
``ANCHOR_MISMATCH``, logged and counted, once. Anchors by any other wallet are
reported as foreign, never trusted, never audited. Only time and randomness
are fake.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.anchoring.chain import Chain
from talos.audit.anchoring.contract import anchor_calldata, log_id
from talos.audit.anchoring.deploy import deploy
from talos.audit.anchoring.driver import Anchorer
from talos.audit.anchoring.store import DATABASE
from talos.audit.anchoring.wallet import Wallet, load_wallet
from talos.audit.anchoring.watch import AnchorWatch
from talos.core.anchoring import Finality, Outcome, Schedule
from talos.core.crypto import SigningKey
from talos.errors import AnchorRejected
from talos.metrics import AgentMetrics
from talos.testing import FakeClock, SeededRng
from talos.testing.chain import DEV_KEYS, AnvilProcess, start_anvil

INTERVAL = 60.0
ORIGIN = "watched-agent/audit"


def _wallet(tmp_path: Path, key: str) -> Wallet:
    path = tmp_path / f"wallet-{key[-6:]}.hex"
    path.write_text(key)
    return load_wallet(path, lambda: None)


def send_anchor(watched: Watched, wallet: Wallet, size: int, root: bytes) -> bytes:
    """``anchor(logId, size, root)`` sent by ``wallet``, once anvil has mined it."""
    chain = watched.chain
    call = "0x" + anchor_calldata(log_id(ORIGIN), size, root).hex()
    transaction = {
        "chainId": chain.chain_id(),
        "nonce": chain.nonce(wallet.address),
        "to": watched.contract,
        "data": call,
        "value": 0,
        "gas": 100_000,
        **chain.fees().fields(),
    }
    signed = wallet.sign(transaction)
    chain.send_raw(signed.raw)
    watched.anvil.wait_mined(bytes(signed.tx_hash))
    return bytes(signed.tx_hash)


@dataclass
class Watched:
    anvil: AnvilProcess
    chain: Chain
    log: AuditLog
    wallet: Wallet
    contract: str
    clock: FakeClock
    metrics: AgentMetrics
    anchorer: Anchorer

    def watch(self, wallet: Wallet | None = None) -> AnchorWatch:
        chosen = wallet or self.wallet
        return AnchorWatch(
            self.log, self.chain, self.contract, chosen.address, interval=INTERVAL,
            metrics=self.metrics,
        )  # fmt: skip

    def anchor_final(self) -> None:
        self.anchorer.step()
        self.anvil.mine(2)
        self.clock.advance(1.0)
        self.anchorer.step()
        assert self.anchorer.last.outcome is Outcome.FINAL

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        assert found is not None
        return found


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    anvil = start_anvil(tmp_path / "anvil.log")
    clock = FakeClock()
    chain = Chain(anvil.url, timeout=5.0)
    wallet = _wallet(tmp_path, DEV_KEYS[0])
    contract = deploy(chain, wallet).address
    signer = LogSigner(SigningKey(b"\x07" * 32), "watched-agent", ORIGIN)
    log = AuditLog.open(tmp_path / "audit", signer=signer, clock=clock, extra_databases=(DATABASE,))
    for i in range(4):
        log.append("MESSAGE_SENT", {"n": i})
    metrics = AgentMetrics()
    watch = AnchorWatch(log, chain, contract, wallet.address, interval=INTERVAL, metrics=metrics)
    anchorer = Anchorer(
        log, chain, wallet, contract,
        schedule=Schedule(interval=INTERVAL, poll=1.0), finality=Finality(2), clock=clock,
        rng=SeededRng(3), metrics=metrics, watch=watch,
    )  # fmt: skip
    try:
        yield Watched(anvil, chain, log, wallet, contract, clock, metrics, anchorer)
    finally:
        log.close()
        chain.close()
        anvil.stop()


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def test_the_agent_s_own_anchors_agree_and_nothing_is_reported(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="talos.audit.anchoring")
    watched.anchor_final()
    [check] = watched.watch().check(watched.clock.monotonic())
    assert (check.verdict, check.agrees, check.tree_size) == ("ok", True, 4)
    assert watched.log.query(kind="ANCHOR_MISMATCH") == []
    assert watched.value("talos_audit_anchor_mismatches_total") == 0
    assert _events(caplog, "anchor_mismatch") == []


def test_a_root_the_log_never_had_by_the_agent_s_wallet_is_audited_logged_and_counted_once(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="talos.audit.anchoring")
    watched.anchor_final()
    # Someone else holds the wallet's key and anchors another history of this log.
    forged = send_anchor(watched, watched.wallet, 3, b"\x66" * 32)
    watched.clock.advance(INTERVAL)
    watched.anchorer.step()  # the watch runs after the driver's own work
    assert watched.anchorer.last.error is None
    [entry] = watched.log.query(kind="ANCHOR_MISMATCH")
    assert entry.data["tx"] == forged
    assert (entry.data["size"], entry.data["root"]) == (3, b"\x66" * 32)
    assert entry.data["submitter"] == bytes.fromhex(watched.wallet.address[2:])
    assert "split view" in entry.data["reason"]
    [line] = _events(caplog, "anchor_mismatch")
    assert line.levelno == logging.ERROR
    assert line.tree_size == 3  # type: ignore[attr-defined]
    assert watched.value("talos_audit_anchor_mismatches_total") == 1
    # Reported once: not again at the next interval, nor by a restarted agent.
    watched.clock.advance(INTERVAL)
    watched.anchorer.step()
    restarted = watched.watch()
    checks = restarted.check(watched.clock.monotonic())
    # (The ANCHOR_MISMATCH entry grew the log: the agent anchored it too.)
    assert [c.verdict for c in checks] == ["ok", "mismatch", "ok"]
    assert len(watched.log.query(kind="ANCHOR_MISMATCH")) == 1
    assert watched.value("talos_audit_anchor_mismatches_total") == 1


def test_a_size_past_the_log_s_end_by_the_agent_s_wallet_is_a_mismatch(watched: Watched) -> None:
    send_anchor(watched, watched.wallet, 99, b"\x01" * 32)
    [check] = watched.watch().check(0.0)
    assert check.verdict == "mismatch"
    assert "claims 99 entries" in check.reason
    assert watched.value("talos_audit_anchor_mismatches_total") == 1


def test_other_wallets_anchors_are_reported_as_foreign_never_audited(
    watched: Watched, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="talos.audit.anchoring")
    stranger = _wallet(tmp_path, DEV_KEYS[1])
    send_anchor(watched, stranger, 3, b"\x66" * 32)
    send_anchor(watched, stranger, 2, watched.log.root_at(2))
    watch = watched.watch()
    checks = watch.check(0.0)
    assert [(c.verdict, c.agrees) for c in checks] == [("foreign", False), ("foreign", True)]
    assert watched.log.query(kind="ANCHOR_MISMATCH") == []
    assert watched.value("talos_audit_anchor_mismatches_total") == 0
    assert watched.value("talos_audit_anchor_foreign_total", agrees="no") == 1
    assert watched.value("talos_audit_anchor_foreign_total", agrees="yes") == 1
    differs, agrees = _events(caplog, "anchor_foreign")
    assert (differs.levelno, agrees.levelno) == (logging.WARNING, logging.INFO)
    watch.check(INTERVAL)  # once per anchor
    assert len(_events(caplog, "anchor_foreign")) == 2


def test_a_wallet_the_log_anchored_with_before_still_counts_as_the_log_s(
    watched: Watched, tmp_path: Path
) -> None:
    watched.anchor_final()  # by DEV_KEYS[0], recorded in an AUDIT_ANCHORED entry
    send_anchor(watched, watched.wallet, 2, b"\x66" * 32)
    # The operator moved to a new wallet; the old one's anchors still speak for the log.
    checks = watched.watch(_wallet(tmp_path, DEV_KEYS[1])).check(0.0)
    assert [c.verdict for c in checks] == ["ok", "mismatch"]


def test_a_chain_that_does_not_answer_fails_the_step_like_any_anchoring_failure(
    watched: Watched,
) -> None:
    watched.anchor_final()
    failures = watched.value("talos_audit_anchor_failures_total")
    watched.anvil.stop()
    watched.clock.advance(INTERVAL)
    watched.anchorer.step()  # nothing to anchor: only the watch talks to the chain
    assert type(watched.anchorer.last.error).__name__ == "ChainUnavailable"
    assert watched.value("talos_audit_anchor_failures_total") == failures + 1


def test_a_drained_wallet_does_not_blind_the_watch(watched: Watched) -> None:
    # Someone holding the wallet's key anchors a false root, then empties the wallet.
    send_anchor(watched, watched.wallet, 2, b"\x66" * 32)
    watched.anvil.rpc("anvil_setBalance", [watched.wallet.address, "0x0"])
    watched.anchorer.step()  # the agent's own anchor cannot be paid for ...
    assert isinstance(watched.anchorer.last.error, AnchorRejected)
    assert "funds" in str(watched.anchorer.last.error).lower()
    assert watched.value("talos_audit_anchor_failures_total") == 1
    [entry] = watched.log.query(kind="ANCHOR_MISMATCH")  # ... and the watch still looked
    assert entry.data["size"] == 2
    assert watched.value("talos_audit_anchor_mismatches_total") == 1
