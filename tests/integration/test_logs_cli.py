"""``talos run --log-format json`` as a real process: every stderr line is a JSON event."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from talos.testing.cli import clean_env
from talos.testing.processes import free_port, launched

REQUIRED = ("timestamp", "level", "component", "event", "message")
RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _run_until_ready_then_stop(home: Path, args: list[str], env: dict[str, str]) -> list[str]:
    """Start ``talos run``, wait for its ready line, SIGTERM it; its stderr lines."""
    with launched(env) as launcher:
        agent = launcher.agent(home, *args)
        assert agent.stop() == 0, agent.log.read_text()
    return agent.log.read_text().splitlines()


@pytest.mark.parametrize("how", ["option", "environment"])
def test_run_writes_one_json_object_per_stderr_line(tmp_path: Path, how: str) -> None:
    env = clean_env()
    args = ["--name", "alice", "--dht-port", "0"]
    args += ["--dht-bootstrap", f"127.0.0.1:{free_port(udp=True)}"]  # nobody answers there
    if how == "option":
        args += ["--log-format", "json"]
    else:
        env["TALOS_LOG_FORMAT"] = "json"

    lines = _run_until_ready_then_stop(tmp_path / "alice", args, env)

    events = [json.loads(line) for line in lines]  # every line parses
    assert events, "the agent logged nothing"
    for event in events:
        assert isinstance(event, dict)
        assert set(REQUIRED) <= set(event), event
        assert RFC3339_MS_UTC.fullmatch(event["timestamp"]), event
        assert not event["component"].startswith("talos.")
    messages = [(e["component"], e["message"]) for e in events if e["level"] == "info"]
    assert any(c == "agent" and m.startswith("control socket ") for c, m in messages)
    assert any(c == "agent" and m.startswith("stopping") for c, m in messages)
    # A warning carries its event name (docs/operations.md, "Logs").
    unreachable = [e for e in events if e["event"] == "dht_unreachable"]
    assert unreachable
    assert {e["level"] for e in unreachable} == {"warning"}
    assert unreachable[0]["component"] == "discovery.dht"
