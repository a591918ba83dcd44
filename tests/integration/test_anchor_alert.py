"""``AuditAnchorFailure`` and ``AuditAnchorMismatch`` on series recorded from real runs.

``AuditAnchorFailure`` fires on the real series and resolves after recovery.

A real agent anchors on a real anvil; the chain stops while an anchor waits
for its confirmations, and comes back (``--state``, same port). The agent's
``/metrics`` is scraped all along; the scraped ``talos_audit_anchor_failures_total``
samples, one per minute of promtool time, become the input series of a
``promtool test rules`` run against ``deploy/prometheus/talos-alerts.yml``.

``AuditAnchorMismatch``: an agent anchors its log on anvil, then its own
wallet (anvil's unlocked development account: someone else holding the key)
anchors a root the log never had under the log's id. The agent's watch finds
it at its next interval: ``ANCHOR_MISMATCH`` is audited and
``talos_audit_anchor_mismatches_total`` goes to 1. The agent restarts: the
series starts again at 0 (already audited, not counted twice).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from alert_rules import RULES, description

from talos.audit.anchoring.contract import anchor_calldata, log_id
from talos.audit.anchoring.wallet import load_wallet
from talos.cli.exit_codes import EXIT_ANCHOR_MISMATCH
from talos.testing.chain import DEV_KEYS, AnvilProcess, start_anvil
from talos.testing.cli import TalosCli
from talos.testing.processes import launched
from talos.testing.waiting import wait_until

CLI = TalosCli()
SERIES = "talos_audit_anchor_failures_total"
#: Scrapes after recovery: more minutes than the alert's 15m window.
AFTER = 20


def _scrape(url: str, series: str = SERIES) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 -- loopback
        text = response.read().decode()
    found = re.search(rf"^{series} (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


def _next_failure(url: str, last: float) -> float:
    """The counter, scraped once it has grown past ``last``."""

    def grown() -> float | None:
        value = _scrape(url)
        return value if value > last else None

    found = wait_until(grown, 30.0, what="another failure")
    assert found is not None
    return found


def _state(home: Path) -> str:
    """``talos audit anchors --json`` (read beside the running agent)."""
    return CLI.ok(home, "audit", "anchors", "--json")


def _agent_home(anvil: AnvilProcess, tmp_path: Path) -> tuple[Path, str, Path, str]:
    """The wallet's key file, the deployed contract, an agent home with one entry, its id."""
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[2])
    deployed = CLI.ok(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(key_file))
    contract = deployed.strip().splitlines()[-1]
    home = tmp_path / "alerting"
    agent_id = CLI.ok(home, "init", "--name", "alerting").strip().splitlines()[-1]
    CLI.ok(home, "capabilities", "grant", "--to", agent_id, "--action", "message.send",
           "--expires-in", "1h")  # fmt: skip
    return key_file, contract, home, agent_id


def _metrics_url(line: str) -> str:
    found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
    assert found, line
    return found.group(1)


def _record(tmp_path: Path) -> tuple[list[float], int, int]:
    """The scraped failure counts: up, down, up again; where down and up again start."""
    anvil = start_anvil(tmp_path / "anvil.log", state=tmp_path / "chain.json")
    try:
        key_file, contract, home, _ = _agent_home(anvil, tmp_path)
        samples: list[float] = []
        with launched() as launcher:
            agent = launcher.agent(home, "--offline", "--metrics-port", "0",
                                   "--anchor-rpc", anvil.url, "--anchor-contract", contract,
                                   "--anchor-key-file", str(key_file),
                                   "--anchor-interval", "1",
                                   "--anchor-confirmations", "3")  # fmt: skip
            url = _metrics_url(agent.read_line())
            # Up: the anchor is mined (included) and waits for 3 confirmations.
            wait_until(lambda: '"included"' in _state(home), 30.0, what="anchor included")
            samples += [_scrape(url), _scrape(url)]
            assert samples == [0.0, 0.0]
            assert _scrape(url, "talos_audit_anchor_attempts_total") >= 1  # the one included
            # Down: the agent keeps polling for confirmations and fails, backing off.
            anvil.stop()
            down = len(samples)
            for _ in range(5):
                samples.append(_next_failure(url, samples[-1]))
            # Up again, same port and chain: the anchor gets its confirmations.
            anvil = start_anvil(tmp_path / "anvil.log", port=anvil.port, state=anvil.state)
            anvil.mine(3)
            wait_until(lambda: '"final"' in _state(home), 30.0, what="anchor final")
            recovered = len(samples)
            samples += [_scrape(url) for _ in range(AFTER)]
            assert agent.stop() == 0
        return samples, down, recovered
    finally:
        anvil.stop()


def _recorded(note: str, series: str, samples: list[float]) -> str:
    """The head of a promtool test: the rules, and ``samples`` as one series, a minute apart."""
    values = " ".join(f"{value:g}" for value in samples)
    return f"""# Generated by test_anchor_alert.py from a real run{note}.
rule_files:
  - {RULES}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: '{series}{{instance="agent:9100",job="talos-agent"}}'
        values: '{values}'
"""


def _promtool_test(samples: list[float], down: int, recovered: int, fails: float) -> str:
    firing = f"""
          - exp_labels: {{severity: critical, instance: "agent:9100", job: talos-agent}}
            exp_annotations:
              summary: "Talos agent agent:9100 failed to anchor its audit log"
              description: "{_description("AuditAnchorFailure")}\""""
    return (
        _recorded(f" ({fails:g} failures)", SERIES, samples)
        + f"""    alert_rule_test:
      - eval_time: {down}m
        alertname: AuditAnchorFailure
        exp_alerts: []
      - eval_time: {recovered}m
        alertname: AuditAnchorFailure
        exp_alerts:{firing}
      - eval_time: {recovered + 10}m
        alertname: AuditAnchorFailure
        exp_alerts:{firing}
      - eval_time: {len(samples) - 1}m
        alertname: AuditAnchorFailure
        exp_alerts: []
"""
    )


def _description(alert: str = "AuditAnchorFailure") -> str:
    return description(alert)


def test_the_anchor_failure_alert_fires_and_resolves_on_a_recorded_run(tmp_path: Path) -> None:
    promtool = _promtool_or_fail()
    samples, down, recovered = _record(tmp_path)
    assert samples[down - 1] == 0 < samples[down] < samples[recovered - 1]
    assert set(samples[recovered:]) == {samples[recovered - 1]}  # no failure once back
    _promtool(promtool, tmp_path, _promtool_test(samples, down, recovered, samples[-1]))
    print(f"recorded {SERIES}: {' '.join(f'{v:g}' for v in samples)}")  # noqa: T201


def _promtool(promtool: str, tmp_path: Path, test: str) -> None:
    test_file = tmp_path / "recorded.test.yml"
    test_file.write_text(test)
    result = subprocess.run(  # noqa: S603 -- promtool from PATH, our own files
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr + test_file.read_text()


def _promtool_or_fail() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not on PATH: apt-get install prometheus (deploy/prometheus/check.sh)"
        )
    return promtool


# -- AuditAnchorMismatch --------------------------------------------------------------------

MISMATCHES = "talos_audit_anchor_mismatches_total"
#: Scrapes of each phase of the mismatch run.
PHASE = 4


def _mismatch_entries(home: Path) -> list[dict[str, object]]:
    out = CLI.ok(home, "audit", "query", "--type", "ANCHOR_MISMATCH", "--json")
    found: list[dict[str, object]] = json.loads(out)
    return found


def _record_mismatch(tmp_path: Path) -> tuple[list[float], int, int]:
    """The scraped samples; where the forged anchor is sent and where the agent restarted."""
    anvil = start_anvil(tmp_path / "anvil.log", extra=["--block-time", "1"])
    try:
        key_file, contract, home, agent_id = _agent_home(anvil, tmp_path)
        wallet = load_wallet(key_file, lambda: None).address
        args = ("--offline", "--metrics-port", "0", "--anchor-rpc", anvil.url,
                "--anchor-contract", contract, "--anchor-key-file", str(key_file),
                "--anchor-interval", "1", "--anchor-confirmations", "2")  # fmt: skip
        samples: list[float] = []
        with launched() as launcher:
            agent = launcher.agent(home, *args)
            url = _metrics_url(agent.read_line())
            wait_until(lambda: '"final"' in _state(home), 30.0, what="a final anchor")
            samples += [_scrape(url, MISMATCHES) for _ in range(PHASE)]
            # The agent's wallet, used by someone else: a root the log never had, for size 1.
            forged = "0x" + anchor_calldata(log_id(f"{agent_id}/audit"), 1, b"\x66" * 32).hex()
            anvil.rpc("eth_sendTransaction", [{"from": wallet, "to": contract, "data": forged}])
            sent = len(samples)
            wait_until(lambda: _scrape(url, MISMATCHES) == 1, 30.0, what="the mismatch counted")
            samples += [_scrape(url, MISMATCHES) for _ in range(PHASE)]
            assert agent.stop() == 0
            [entry] = _mismatch_entries(home)
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
            samples += [_scrape(url, MISMATCHES) for _ in range(PHASE)]
            assert agent.stop() == 0
            assert len(_mismatch_entries(home)) == 1
        return samples, sent, restarted
    finally:
        anvil.stop()


def _mismatch_test(samples: list[float], sent: int, restarted: int) -> str:
    summary = "Talos agent agent:9100: the chain holds a root its audit log never had"
    description = _description("AuditAnchorMismatch")
    return (
        _recorded("", MISMATCHES, samples)
        + f"""    alert_rule_test:
      - eval_time: {sent - 1}m
        alertname: AuditAnchorMismatch
        exp_alerts: []
      - eval_time: {restarted - 1}m
        alertname: AuditAnchorMismatch
        exp_alerts:
          - exp_labels: {{severity: critical, instance: "agent:9100", job: talos-agent}}
            exp_annotations: {{summary: "{summary}", description: "{description}"}}
      - eval_time: {len(samples) - 1}m
        alertname: AuditAnchorMismatch
        exp_alerts: []
"""
    )


def test_the_anchor_mismatch_alert_fires_on_a_recorded_run(tmp_path: Path) -> None:
    promtool = _promtool_or_fail()
    samples, sent, restarted = _record_mismatch(tmp_path)
    assert set(samples[:sent]) == {0.0}
    assert set(samples[sent:restarted]) == {1.0}
    assert set(samples[restarted:]) == {0.0}  # already audited: not counted again
    _promtool(promtool, tmp_path, _mismatch_test(samples, sent, restarted))
    print(f"recorded {MISMATCHES}: {' '.join(f'{v:g}' for v in samples)}")  # noqa: T201
