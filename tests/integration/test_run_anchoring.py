"""``talos run --anchor-*``: a running agent anchors its audit log on a real anvil."""

from __future__ import annotations

import json
from pathlib import Path

from talos.cli.exit_codes import EXIT_ANCHOR_MISMATCH, exit_code_for_name
from talos.testing.chain import DEV_KEYS, AnvilProcess
from talos.testing.cli import TalosCli
from talos.testing.processes import launched
from talos.testing.waiting import wait_until

CLI = TalosCli()


def _anchored(home: Path) -> list[dict[str, object]]:
    out = CLI.ok(home, "audit", "query", "--type", "AUDIT_ANCHORED", "--json")
    found: list[dict[str, object]] = json.loads(out)
    return found


def _anchors(home: Path) -> list[dict[str, object]]:
    found: list[dict[str, object]] = json.loads(CLI.ok(home, "audit", "anchors", "--json"))
    return found


def _final(home: Path) -> list[dict[str, object]]:
    return [row for row in _anchors(home) if row["state"] == "final"]


def test_a_running_agent_anchors_its_log(anvil: AnvilProcess, tmp_path: Path) -> None:
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[2])
    deployed = CLI.ok(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(key_file))
    contract = deployed.strip().splitlines()[-1]
    home = tmp_path / "anchored"
    agent_id = CLI.ok(home, "init", "--name", "anchored").strip().splitlines()[-1]
    # One entry before the agent runs, so there is something to anchor.
    CLI.ok(home, "capabilities", "grant", "--to", agent_id, "--action", "message.send",
           "--expires-in", "1h")  # fmt: skip
    args = ["--offline", "--anchor-rpc", anvil.url, "--anchor-contract", contract,
            "--anchor-key-file", str(key_file), "--anchor-interval", "0.5",
            "--anchor-confirmations", "2"]  # fmt: skip
    assert _anchors(home) == []  # never anchored: the log has no anchors database yet
    with launched() as launcher:
        agent = launcher.agent(home, *args)
        anvil.mine(1)  # the anchor's own block is confirmation 1: one more makes it final
        # `audit anchors` and `audit query` read the log while the agent writes it.
        wait_until(lambda: _final(home) or anvil.mine(1), 30.0, what="anchored")
        wait_until(lambda: _anchored(home), 10.0, what="AUDIT_ANCHORED")
        assert agent.stop() == 0
    [entry] = _anchored(home)
    [final] = _final(home)
    assert entry["data"]["size"] == final["tree_size"]  # type: ignore[index]
    assert entry["data"]["chain"] == 31337  # type: ignore[index]
    assert entry["data"]["tx"] == final["tx"]  # type: ignore[index]
    table = CLI.ok(home, "audit", "anchors")
    assert "final" in table
    assert str(final["tx"])[:12] in table
    checked = CLI.ok(home, "audit", "verify-anchors", "--rpc", anvil.url)
    assert checked.strip().splitlines()[-1].startswith("1 anchors match; 0 contradict the log")
    [check] = json.loads(CLI.ok(home, "audit", "verify-anchors", "--rpc", anvil.url, "--json"))
    assert check["verdict"] == "ok"
    assert check["tx"] == final["tx"]
    assert exit_code_for_name("AnchorMismatch") == EXIT_ANCHOR_MISMATCH == 8


def test_anchor_options_go_together(tmp_path: Path) -> None:
    home = tmp_path / "partial"
    CLI.ok(home, "init", "--name", "partial")
    result = CLI.fails(home, 2, "run", "--anchor-rpc", "http://127.0.0.1:1")
    assert "go together" in result.stderr


def test_a_bad_anchor_key_file_stops_the_start_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "badkey"
    CLI.ok(home, "init", "--name", "badkey")
    key_file = tmp_path / "not-a-key"
    key_file.write_text("hello")
    result = CLI.fails(home, 7, "run", "--offline", "--anchor-rpc", "http://127.0.0.1:1",
                       "--anchor-contract", "0x" + "ab" * 20,
                       "--anchor-key-file", str(key_file))  # fmt: skip
    assert "AnchorKeyInvalid" in result.stderr
