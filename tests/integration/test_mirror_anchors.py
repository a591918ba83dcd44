"""`talos audit rebuild --from-peers --anchor-rpc`: anchors on a real anvil as trusted roots.

alice anchors her audit log on a chain and mirrors it to bob. Her database is
deleted; the rebuilt log must agree with every anchor of hers on the chain.
With her watermark gone too (it lived on the same disk), only the anchors
know that she had signed for more than bob holds: the loss is reported, not
hidden.
"""

from __future__ import annotations

import json
from pathlib import Path

from talos.audit import AuditLog
from talos.audit.mirror_store import MirrorStore
from talos.testing.chain import DEV_KEYS, AnvilProcess
from talos.testing.cli import TalosCli
from talos.testing.processes import launched
from talos.testing.waiting import wait_until

CLI = TalosCli(timeout=120.0)


def _size(home: Path) -> int:
    with AuditLog.open(home / "audit", readonly=True) as log:
        return log.size


def _acked(home: Path, mirror: str) -> int:
    with MirrorStore.open(home / "mirrors") as store:
        return store.progress(mirror)


def _final(home: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(CLI.ok(home, "audit", "anchors", "--json"))
    return [row for row in rows if row["state"] == "final"]


def test_anchors_on_chain_are_trusted_roots_of_the_rebuild(
    anvil: AnvilProcess, tmp_path: Path
) -> None:
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[2])
    deployed = CLI.ok(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(key_file))
    contract = deployed.strip().splitlines()[-1]
    alice, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice_id = CLI.ok(alice, "init", "--name", "alice", "--no-passphrase").strip()
    CLI.ok(bob_home, "init", "--name", "bob", "--no-passphrase")
    CLI.ok(alice, "capabilities", "grant", "--to", alice_id, "--action", "message.send",
           "--expires-in", "1h")  # fmt: skip
    anchoring = ["--anchor-rpc", anvil.url, "--anchor-contract", contract,
                 "--anchor-key-file", str(key_file), "--anchor-interval", "0.5",
                 "--anchor-confirmations", "2"]  # fmt: skip
    with launched() as launcher:
        registry = launcher.registry(tmp_path / "registry.db", tmp_path / "registry.log")
        bob = launcher.agent(bob_home, "--registry", registry.url, "--audit-mirror-for", alice_id)
        agent = launcher.agent(
            alice, "--registry", registry.url, "--audit-mirror", bob.agent_id, *anchoring
        )
        wait_until(lambda: _final(alice) or anvil.mine(1), 30.0, what="anchored")
        agent.stop()
        mirrored = _size(alice)  # with the AUDIT_ANCHORED entry
        agent = launcher.agent(alice, "--registry", registry.url, "--audit-mirror", bob.agent_id)
        wait_until(lambda: _acked(alice, bob.agent_id) >= mirrored, 30.0, what="mirrored")
        agent.stop()
        # bob also witnesses alice on that link: his cosignature may be one more entry,
        # mirrored or not. What bob holds is where the copy ends.
        mirrored = _acked(alice, bob.agent_id)
        # Entries bob never gets, anchored: alice runs once more, without her mirror.
        CLI.ok(alice, "capabilities", "grant", "--to", alice_id, "--action", "message.send",
               "--expires-in", "1h")  # fmt: skip
        agent = launcher.agent(alice, "--offline", *anchoring)
        wait_until(
            lambda: any(row["tree_size"] > mirrored for row in _final(alice)) or anvil.mine(1),
            30.0,
            what="the unmirrored entries anchored",
        )
        agent.stop()
        assert _size(alice) > mirrored
        (alice / "audit" / "data.mdb").unlink()
        (alice / "watermark.cbor").unlink()  # the same disk died
        rebuild = ["audit", "rebuild", "--from-peers", "--registry", registry.url]
        refused = CLI.fails(alice, 1, *rebuild, "--anchor-rpc", anvil.url)
        assert f"from position {mirrored}" in refused.stderr, refused.stderr
        assert "nothing was changed" in refused.stderr
        out = CLI.ok(alice, *rebuild, "--anchor-rpc", anvil.url, "--accept-loss")
        assert "and the anchors on chain" in out
        assert f"rebuilt {mirrored} entries" in out
    (entry,) = json.loads(CLI.ok(alice, "audit", "query", "--type", "MIRROR_REBUILT", "--json"))
    assert entry["data"]["lost_from"] == mirrored
    assert entry["data"]["lost"] >= 1
