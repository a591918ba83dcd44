"""An anchor in flight across a restore or rebuild of the log (issue 16).

The anchor store lives with the agent state, which a restore or rebuild
keeps (docs/design/audit-recovery.md). An anchor prepared and sent before
the log was replaced by another history must not be recorded against the
new log when it becomes final: its root is not the new log's root at its
size. Real anvil and LMDB; only time and randomness are fake.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.anchoring.chain import Chain
from talos.audit.anchoring.deploy import deploy
from talos.audit.anchoring.driver import Anchorer
from talos.audit.anchoring.store import DATABASE
from talos.audit.anchoring.wallet import load_wallet
from talos.audit.rebuild import write_log
from talos.audit.recovery import replace_log
from talos.core.anchoring import Finality, Outcome, Schedule
from talos.core.audit.entry import AuditKind
from talos.core.crypto import SigningKey
from talos.storage.environment import Environment
from talos.testing import FakeClock, SeededRng
from talos.testing.chain import DEV_KEYS, AnvilProcess

SIGNER = LogSigner(SigningKey(b"\x06" * 32), "agent-under-test", "agent-under-test/audit")


def _open(path: Path, clock: FakeClock) -> AuditLog:
    return AuditLog.open(path, signer=SIGNER, clock=clock, extra_databases=(DATABASE,))


def _anchorer(
    log: AuditLog, chain: Chain, wallet: Any, contract: str, clock: FakeClock
) -> Anchorer:
    return Anchorer(
        log,
        chain,
        wallet,
        contract,
        schedule=Schedule(interval=600.0, poll=1.0, retry_base=2.0),
        finality=Finality(3),
        clock=clock,
        rng=SeededRng(7),
    )


@pytest.mark.parametrize("replaced_by", ["other-history", "shorter"])
def test_an_anchor_of_the_replaced_log_is_not_recorded_against_the_new_one(
    anvil: AnvilProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture, replaced_by: str
) -> None:
    clock = FakeClock()
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[0])
    wallet = load_wallet(key_file, lambda: None)
    chain = Chain(anvil.url, timeout=5.0)
    contract = deploy(chain, wallet).address
    path = tmp_path / "audit"
    log = _open(path, clock)
    for n in range(6):
        log.append("MESSAGE_SENT", {"n": n})
    anchorer = _anchorer(log, chain, wallet, contract, clock)
    anchorer.step()  # signed, saved, sent, mined (automine); not final before 3 blocks
    in_flight = anchorer.store.current()
    assert in_flight is not None
    assert in_flight.tree_size == 6
    log.close()

    # The log is replaced (a restore of a backup of another history, or a rebuild
    # that ends earlier); the agent state, anchors included, is kept as it is.
    other = tmp_path / "other"
    with _open(other, clock) as source:
        count = 6 if replaced_by == "other-history" else 3
        for n in range(count):
            source.append("MESSAGE_SENT", {"n": n, "other": replaced_by == "other-history"})
        entries = [entry.to_bytes() for entry in source.entries(0, source.size)]

    def fill(environment: Environment) -> dict[str, Any]:
        write_log(environment, entries)
        return {"size": len(entries)}

    replace_log(path, fill, clock=clock, signer=SIGNER, kind="LOG_RESTORED", label="replaced")
    log = _open(path, clock)
    try:
        anchorer = _anchorer(log, chain, wallet, contract, clock)
        assert anchorer.store.current() == in_flight  # the state was kept, anchor included
        anvil.mine(3)
        with caplog.at_level(logging.WARNING, logger="talos.audit.anchoring"):
            anchorer.step()
        assert anchorer.last.outcome is Outcome.FINAL
        assert anchorer.last.error is None
        # Final on chain, but not this log's: not recorded, no final kept.
        assert log.query(kind=AuditKind.AUDIT_ANCHORED) == []
        assert anchorer.store.finals() == []
        assert any(getattr(r, "event", None) == "anchor_abandoned" for r in caplog.records)
        # The next anchor is of the log as it is now, on a fresh nonce.
        clock.advance(601.0)
        anchorer.step()
        fresh = anchorer.store.current()
        assert fresh is not None
        assert (fresh.tree_size, fresh.root) == (log.size, log.root())
        assert fresh.nonce > in_flight.nonce
        anvil.mine(3)
        anchorer.step()
        (anchored,) = log.query(kind=AuditKind.AUDIT_ANCHORED)
        assert (anchored.data["size"], anchored.data["root"]) == (fresh.tree_size, fresh.root)
    finally:
        log.close()
        chain.close()
