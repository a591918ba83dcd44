"""Anchoring faults from issue 15's list not covered elsewhere: an RPC that times out, and an
agent killed (SIGKILL) while its anchor waits in the mempool.

Real sockets, a real anvil and a real ``talos run``; only the driver test's
time and randomness are fake.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.anchoring.chain import Chain
from talos.audit.anchoring.driver import Anchorer
from talos.audit.anchoring.store import DATABASE
from talos.audit.anchoring.wallet import load_wallet
from talos.cli.exit_codes import EXIT_ANCHORING
from talos.core.anchoring import Finality, Schedule
from talos.core.crypto import SigningKey
from talos.errors import ChainUnavailable
from talos.metrics import AgentMetrics
from talos.testing import FakeClock, SeededRng
from talos.testing.chain import DEV_KEYS, AnvilProcess
from talos.testing.cli import TalosCli
from talos.testing.processes import launched
from talos.testing.waiting import wait_until

CLI = TalosCli()


@pytest.fixture
def silent_rpc() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def test_an_rpc_that_times_out_is_a_counted_failure_and_audit_goes_on(
    silent_rpc: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    signer = LogSigner(SigningKey(b"\x09" * 32), "slow-chain", "slow-chain/audit")
    log = AuditLog.open(tmp_path / "audit", signer=signer, clock=clock, extra_databases=(DATABASE,))
    key = tmp_path / "wallet.hex"
    key.write_text(DEV_KEYS[0])
    chain = Chain(silent_rpc, timeout=0.3)
    metrics = AgentMetrics()
    anchorer = Anchorer(
        log, chain, load_wallet(key, lambda: None), "0x" + "ab" * 20,
        schedule=Schedule(interval=60.0, poll=1.0), finality=Finality(2), clock=clock,
        rng=SeededRng(5), metrics=metrics,
    )  # fmt: skip
    try:
        for n in range(3):
            log.append("MESSAGE_SENT", {"n": n})  # local audit is not held up
            now = clock.monotonic()
            next_at = anchorer.step()  # returns: the step never raises
            assert isinstance(anchorer.last.error, ChainUnavailable)
            assert "timed out" in str(anchorer.last.error)
            clock.advance(next_at - now)
        assert metrics.registry.get_sample_value("talos_audit_anchor_failures_total") == 3
        assert log.size == 3
    finally:
        log.close()
        chain.close()


def test_the_cli_against_an_rpc_that_times_out_is_exit_7(silent_rpc: str, tmp_path: Path) -> None:
    key = tmp_path / "wallet.hex"
    key.write_text(DEV_KEYS[0])
    result = CLI.fails(None, EXIT_ANCHORING, "anchor", "deploy", "--rpc", silent_rpc,
                       "--key-file", str(key))  # fmt: skip
    assert "timed out" in result.stderr
    assert "Traceback" not in result.stderr


def _anchors(home: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(CLI.ok(home, "audit", "anchors", "--json"))
    return rows


def test_an_agent_killed_mid_anchor_resumes_with_the_same_transaction(
    anvil: AnvilProcess, tmp_path: Path
) -> None:
    key = tmp_path / "wallet.hex"
    key.write_text(DEV_KEYS[2])
    contract = CLI.ok(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file",
                      str(key)).strip().splitlines()[-1]  # fmt: skip
    home = tmp_path / "killed"
    agent_id = CLI.ok(home, "init", "--name", "killed").strip().splitlines()[-1]
    CLI.ok(home, "capabilities", "grant", "--to", agent_id, "--action", "message.send",
           "--expires-in", "1h")  # fmt: skip
    args = ("--offline", "--anchor-rpc", anvil.url, "--anchor-contract", contract,
            "--anchor-key-file", str(key), "--anchor-interval", "3",
            "--anchor-confirmations", "1")  # fmt: skip
    # The anchor waits in the mempool. (A pending anchor is replaced with higher fees after
    # an interval: 3 s leaves time to see the rebroadcast and mine it first.)
    anvil.rpc("evm_setAutomine", [False])
    with launched() as launcher:
        agent = launcher.agent(home, *args)
        wait_until(lambda: _anchors(home), 30.0, what="an anchor in flight")
        agent.child.kill()  # no clean shutdown
        [pending] = _anchors(home)
        assert pending["state"] == "pending"
        # The chain forgets its mempool too: only the agent's store has the transaction.
        anvil.rpc("anvil_dropAllTransactions")
        agent = launcher.agent(home, *args)
        wait_until(
            lambda: anvil.rpc("eth_getTransactionByHash", ["0x" + str(pending["tx"])]),
            30.0,
            what="the same transaction broadcast again",
        )
        anvil.mine(1)
        wait_until(lambda: _anchors(home)[0]["state"] == "final", 30.0, what="final")
        assert agent.stop() == 0
    [final] = _anchors(home)
    assert (final["tx"], final["nonce"], final["tree_size"]) == (
        pending["tx"], pending["nonce"], pending["tree_size"],
    )  # fmt: skip
    checked = CLI.ok(home, "audit", "verify-anchors", "--rpc", anvil.url, "--json")
    assert [c["verdict"] for c in json.loads(checked)] == ["ok"]  # one anchor, not two
