"""``talos run --audit-prune-after-anchor`` on a real anvil: what an operator and an auditor see.

An agent's log is anchored; a proof file is written; the agent runs again
with pruning and drops what the anchor covers. The old proof file still
verifies (``--root`` and ``--rpc``), ``verify-chain`` says how much was
pruned, queries and exports say the entries were pruned, ``show`` of a
pruned entry is a clear error and ``prove`` of one proves its leaf hash.
The agent starts again on the pruned log (no lost state), and the pruning
is counted in ``talos_audit_pruned_entries_total``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from talos.audit import AuditLog, LogSigner
from talos.storage.home import AgentHome
from talos.testing import FakeClock
from talos.testing.chain import DEV_KEYS, AnvilProcess
from talos.testing.cli import TalosCli
from talos.testing.processes import free_port, launched
from talos.testing.waiting import wait_until

CLI = TalosCli()
#: Entries written before the agent runs: two blocks of 64, and 12 the agent seals at its start.
ENTRIES = 140


def _final(home: Path, anvil: AnvilProcess) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(CLI.ok(home, "audit", "anchors", "--json"))
    found = [row for row in rows if row["state"] == "final"]
    if not found:
        anvil.mine(1)  # towards the confirmations
    return found


def _chain_report(home: Path) -> dict[str, object]:
    report: dict[str, object] = json.loads(CLI.ok(home, "audit", "verify-chain", "--json"))
    return report


def _populate(home: Path, agent_id: str) -> None:
    """Entries in sealed blocks, signed by the agent (blocks by count, as in test_cli_audit)."""
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, name=agent_id, origin=f"{agent_id}/audit")
    with AuditLog.open(
        AgentHome(home).audit_path,
        signer=signer,
        clock=FakeClock(1_700_000_000.0),
        block_entries=64,
        block_seconds=1e6,
    ) as log:
        log.append_many(
            ("MESSAGE_SENT", {"hash": os.urandom(32)}, "peer-x") for _ in range(ENTRIES)
        )


def _pruned_counter(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    for line in text.splitlines():
        if line.startswith("talos_audit_pruned_entries_total "):
            return float(line.split()[1])
    raise AssertionError("talos_audit_pruned_entries_total is not served")


def test_an_anchored_log_is_pruned_and_old_proofs_still_verify(
    anvil: AnvilProcess, tmp_path: Path
) -> None:
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[2])
    deployed = CLI.ok(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(key_file))
    contract = deployed.strip().splitlines()[-1]
    home = tmp_path / "pruner"
    agent_id = CLI.ok(home, "init", "--name", "pruner").strip().splitlines()[-1]
    _populate(home, agent_id)
    anchoring = ["--offline", "--anchor-rpc", anvil.url, "--anchor-contract", contract,
                 "--anchor-key-file", str(key_file), "--anchor-interval", "60",
                 "--anchor-confirmations", "2"]  # fmt: skip
    with launched() as launcher:
        agent = launcher.agent(home, *anchoring)
        wait_until(lambda: _final(home, anvil), 30.0, what="anchored")
        assert agent.stop() == 0
    [anchor] = _final(home, anvil)
    anchored = int(str(anchor["tree_size"]))
    assert anchored >= ENTRIES
    old_proof = tmp_path / "before.json"
    CLI.ok(home, "audit", "prove", "5", "--out", str(old_proof))
    assert json.loads(old_proof.read_text())["anchor"]["tree_size"] == anchored
    assert _chain_report(home)["pruned"] == 0

    port = free_port()
    with launched() as launcher:
        agent = launcher.agent(home, *anchoring, "--audit-prune-after-anchor",
                               "--metrics-port", str(port))  # fmt: skip
        # The driver's first step prunes what the final anchor covers (all ENTRIES: the
        # agent sealed the last 12 in a block when it first wrote).
        wait_until(lambda: _chain_report(home)["pruned"], 30.0, what="pruned")
        wait_until(lambda: _pruned_counter(port) == ENTRIES, 10.0, what="counted")
        assert agent.stop() == 0
    report = _chain_report(home)
    assert report["ok"]
    assert (report["pruned"], report["pruned_below"]) == (ENTRIES, ENTRIES)
    text = CLI.ok(home, "audit", "verify-chain")
    assert f"pruned {ENTRIES} entries below seq {ENTRIES}" in text
    [record] = json.loads(CLI.ok(home, "audit", "query", "--type", "AUDIT_PRUNED", "--json"))
    assert (record["data"]["to"], record["data"]["anchor_size"]) == (ENTRIES, anchored)

    # The proof file written before pruning is self-contained: it still verifies.
    for trusted in (["--rpc", anvil.url], ["--root", "0x" + str(anchor["root"])]):
        verdict = json.loads(CLI.ok(home, "audit", "verify-proof", "--proof", str(old_proof),
                                    "--json", *trusted))  # fmt: skip
        assert verdict["valid"] is True
    # A pruned entry: no payload to show, but its kept leaf hash is still proved.
    shown = CLI.fails(home, 1, "audit", "show", "5")
    assert "entry 5 was pruned" in shown.stderr
    assert "Traceback" not in shown.stderr
    new_proof = tmp_path / "after.json"
    out = CLI.ok(home, "audit", "prove", "5", "--out", str(new_proof))
    assert "was pruned after anchoring" in out
    verdict = json.loads(CLI.ok(home, "audit", "verify-proof", "--proof", str(new_proof),
                                "--json", "--rpc", anvil.url))  # fmt: skip
    assert verdict["leaf_hash"] == json.loads(old_proof.read_text())["leaf_hash"]
    # Queries say that entries were pruned instead of silently returning fewer.
    listed = CLI.run(home, "audit", "query", "--type", "MESSAGE_SENT", "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == []
    assert f"{ENTRIES} entries below seq {ENTRIES} were pruned" in listed.stderr
    exported = CLI.run(home, "audit", "export")
    assert "appear as their leaf hash alone" in exported.stderr
    rows = json.loads(exported.stdout)["entries"]
    assert rows[5] == {"seq": 5, "pruned": True, "leaf_hash": verdict["leaf_hash"]}
    assert [row.get("kind") for row in rows[ENTRIES:]] == ["AUDIT_ANCHORED", "AUDIT_PRUNED"]

    # A pruned log is not lost state: the agent starts on it again.
    with launched() as launcher:
        agent = launcher.agent(home, "--offline")
        assert agent.stop() == 0
    assert _chain_report(home)["ok"]
