"""``AuditAnchorMismatch`` fires on the real series, recorded from a real agent and anvil.

An agent anchors its log on anvil. Then its own wallet (anvil's unlocked
development account: someone else holding the key) anchors a root the log
never had under the log's id. The agent's watch finds it at its next
interval: ``ANCHOR_MISMATCH`` is audited and ``talos_audit_anchor_mismatches_total``
goes to 1. The agent restarts: the series starts again at 0 (the mismatch is
already audited, not counted twice). ``/metrics`` is scraped all along, and the
samples, one per minute of promtool time, become the input of a ``promtool
test rules`` run against ``deploy/prometheus/talos-alerts.yml``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from talos.audit.anchoring.contract import anchor_calldata, log_id
from talos.audit.anchoring.wallet import load_wallet
from talos.cli.exit_codes import EXIT_ANCHOR_MISMATCH
from talos.testing.chain import DEV_KEYS, start_anvil
from talos.testing.cli import TalosCli
from talos.testing.processes import launched
from talos.testing.waiting import wait_until

CLI = TalosCli()
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "talos-alerts.yml"
SERIES = "talos_audit_anchor_mismatches_total"
#: Scrapes of each phase (one scrape = one minute of promtool time).
PHASE = 4


def _scrape(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 -- loopback
        text = response.read().decode()
    found = re.search(rf"^{SERIES} (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


def _metrics_url(line: str) -> str:
    found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
    assert found, line
    return found.group(1)


def _finals(home: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(CLI.ok(home, "audit", "anchors", "--json"))
    return [row for row in rows if row["state"] == "final"]


def _mismatches(home: Path) -> list[dict[str, object]]:
    out = CLI.ok(home, "audit", "query", "--type", "ANCHOR_MISMATCH", "--json")
    found: list[dict[str, object]] = json.loads(out)
    return found


def _record(tmp_path: Path) -> tuple[list[float], int, int]:
    """The scraped samples; where the forged anchor is sent and where the agent restarted."""
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[2])
    wallet = load_wallet(key_file, lambda: None).address
    anvil = start_anvil(tmp_path / "anvil.log", extra=["--block-time", "1"])
    try:
        deployed = CLI.ok(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file",
                          str(key_file))  # fmt: skip
        contract = deployed.strip().splitlines()[-1]
        home = tmp_path / "watched"
        agent_id = CLI.ok(home, "init", "--name", "watched").strip().splitlines()[-1]
        CLI.ok(home, "capabilities", "grant", "--to", agent_id, "--action", "message.send",
               "--expires-in", "1h")  # fmt: skip
        args = ("--offline", "--metrics-port", "0", "--anchor-rpc", anvil.url,
                "--anchor-contract", contract, "--anchor-key-file", str(key_file),
                "--anchor-interval", "1", "--anchor-confirmations", "2")  # fmt: skip
        samples: list[float] = []
        with launched() as launcher:
            agent = launcher.agent(home, *args)
            url = _metrics_url(agent.read_line())
            wait_until(lambda: _finals(home), 30.0, what="the agent's first final anchor")
            samples += [_scrape(url) for _ in range(PHASE)]
            # The agent's wallet, used by someone else: a root the log never had, for size 1.
            forged = "0x" + anchor_calldata(log_id(f"{agent_id}/audit"), 1, b"\x66" * 32).hex()
            anvil.rpc("eth_sendTransaction", [{"from": wallet, "to": contract, "data": forged}])
            sent = len(samples)
            wait_until(lambda: _scrape(url) == 1, 30.0, what="the mismatch counted")
            samples += [_scrape(url) for _ in range(PHASE)]
            assert agent.stop() == 0
            [entry] = _mismatches(home)
            assert entry["data"]["size"] == 1  # type: ignore[index]
            checked = CLI.fails(home, EXIT_ANCHOR_MISMATCH, "audit", "verify-anchors",
                                "--rpc", anvil.url)  # fmt: skip
            assert "AnchorMismatch" in checked.stderr
            # Restarted: its watch reads the chain again and reports nothing new.
            agent = launcher.agent(home, *args)
            url = _metrics_url(agent.read_line())
            calls = anvil.child.log_text().count("eth_getLogs")
            wait_until(
                lambda: anvil.child.log_text().count("eth_getLogs") >= calls + 4,
                30.0,
                what="the restarted agent's watch read the chain twice",
            )
            restarted = len(samples)
            samples += [_scrape(url) for _ in range(PHASE)]
            assert agent.stop() == 0
            assert len(_mismatches(home)) == 1
        return samples, sent, restarted
    finally:
        anvil.stop()


def _annotations(alert: str, instance: str) -> str:
    """The alert's summary and folded description as promtool expects them (a YAML flow map)."""
    rule = RULES.read_text().split(f"alert: {alert}\n", 1)[1].split("- alert:", 1)[0]
    summary = re.search(r'summary: "(.*)"', rule)
    assert summary
    folded = rule.split("description: >-\n", 1)[1]
    lines = []
    for line in folded.splitlines():
        if not line.startswith("            "):
            break
        lines.append(line.strip())
    description = " ".join(lines).replace("\\", "\\\\").replace('"', '\\"')
    summary_text = summary.group(1).replace("{{ $labels.instance }}", instance)
    return f'{{summary: "{summary_text}", description: "{description}"}}'


def _promtool_test(samples: list[float], sent: int, restarted: int) -> str:
    values = " ".join(f"{value:g}" for value in samples)
    return f"""# Generated by test_anchor_mismatch_alert.py from a real run.
rule_files:
  - {RULES}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: '{SERIES}{{instance="agent:9100",job="talos-agent"}}'
        values: '{values}'
    alert_rule_test:
      - eval_time: {sent - 1}m
        alertname: AuditAnchorMismatch
        exp_alerts: []
      - eval_time: {restarted - 1}m
        alertname: AuditAnchorMismatch
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "agent:9100", job: talos-agent}}
            exp_annotations: {_annotations("AuditAnchorMismatch", "agent:9100")}
      - eval_time: {len(samples) - 1}m
        alertname: AuditAnchorMismatch
        exp_alerts: []
"""


def test_the_anchor_mismatch_alert_fires_on_a_recorded_run(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not on PATH: apt-get install prometheus (deploy/prometheus/check.sh)"
        )
    samples, sent, restarted = _record(tmp_path)
    assert set(samples[:sent]) == {0.0}
    assert set(samples[sent:restarted]) == {1.0}
    assert set(samples[restarted:]) == {0.0}  # already audited: not counted again
    test_file = tmp_path / "recorded.test.yml"
    test_file.write_text(_promtool_test(samples, sent, restarted))
    result = subprocess.run(  # noqa: S603 -- promtool from PATH, our own files
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr + test_file.read_text()
    print(f"recorded {SERIES}: {' '.join(f'{v:g}' for v in samples)}")  # noqa: T201
