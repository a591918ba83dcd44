"""The examples in examples/ run as a user runs them: the tool server and the
planner as real processes in one directory against a real registry, with
nothing set up beforehand (no CLI step): the tool server grants the planner
``message.send`` in code and hands the token over as a file; its replies need no
grant. Then the tool server is killed with SIGKILL before the planner's second
run asks, and comes back on another port: the planner's request() calls fail
while it is down and are asked again, and the planner gets an answer to each of
its calls, one each, in order; the tool runs once per call."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.testing.child import ChildProcess
from talos.testing.cli import clean_env
from talos.testing.processes import RegistryProcess, registry_process
from talos.testing.waiting import wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
READY = re.compile(r"tool server ready: (did:talos:\S+) at (ws://\S+)")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    with registry_process(tmp_path / "registry") as server:
        yield server


def _start(script: str, *args: str, cwd: Path, env: dict[str, str], log: Path) -> ChildProcess:
    """``python examples/SCRIPT ARGS`` in ``cwd``, as a user would run it there."""
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    return ChildProcess(process, log, script)


def test_each_example_is_under_forty_lines() -> None:
    for script in ("planner.py", "tool_server.py"):
        assert len((EXAMPLES / script).read_text().splitlines()) <= 40, script


def _answers(output: str) -> None:
    """The planner's output: one answer per call, in order, each right."""
    answers = [json.loads(line) for line in output.splitlines()]
    assert [answer["tool"] for answer in answers] == ["add", "upper", "divide"]
    assert answers[0]["result"] == 5
    assert answers[1]["result"] == "TALOS"
    assert str(answers[2]["error"]).startswith("ZeroDivisionError")


def _runs(tools: ChildProcess) -> list[str]:
    """The three tool runs the tool server reports on stdout, one per call."""
    return [tools.read_line(30).strip() for _ in range(3)]


RUNS = ["running add [2, 3]", "running upper ['talos']", "running divide [1, 0]"]


def test_the_planner_gets_every_answer_through_a_kill_of_the_tool_server(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env({"TALOS_REGISTRY_URL": registry.url})
    children: list[ChildProcess] = []
    try:
        tools = _start("tool_server.py", cwd=work, env=env, log=tmp_path / "tools-1.log")
        children.append(tools)
        tools_id, first_endpoint = tools.wait_for_line(READY, 30).groups()
        assert (work / "tools.id").read_text().strip() == tools_id

        # First run: the planner's id and the grant go through the directory, then the calls.
        planner = _start("planner.py", cwd=work, env=env, log=tmp_path / "planner-1.log")
        children.append(planner)
        _answers(planner.finish(60))
        assert planner.returncode == 0, planner.log_tail(40)
        assert {"planner.id", "tools.grant"} <= {p.name for p in work.iterdir()}
        assert _runs(tools) == RUNS

        tools.kill()  # kill -9: the planner's next calls are not delivered, and asked again
        assert tools.finish(5) == ""  # no other tool ran
        tools.stop()  # (already dead: only closes its stdout)
        planner = _start("planner.py", cwd=work, env=env, log=tmp_path / "planner-2.log")
        children.append(planner)
        wait_until(
            lambda: "asking again" in planner.log_text() and "cannot connect" in planner.log_text(),
            60,
            what="a request() that was not delivered",
        )
        tools = _start("tool_server.py", cwd=work, env=env, log=tmp_path / "tools-2.log")
        children.append(tools)
        again = tools.wait_for_line(READY, 30)
        assert again.group(1) == tools_id  # the same identity, on another port
        assert again.group(2) != first_endpoint

        output = planner.finish(60)
        assert planner.returncode == 0, planner.log_tail(40)
        _answers(output)
        assert _runs(tools) == RUNS  # each call ran once (its reply needed no grant)
        tools.signal(signal.SIGTERM)
        assert tools.finish(30) == ""  # and nothing ran twice
    finally:
        for child in children:
            child.stop()  # SIGTERM, then SIGKILL; closes its stdout
