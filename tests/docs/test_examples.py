"""The examples in examples/ run as a user runs them: examples/setup.sh makes the
two homes and the grants, then the tool server and the planner run as real
processes against a real registry. The tool server is killed with SIGKILL
before the planner sends, and comes back on another port: the planner still
gets an answer to each of its calls, one each, in order."""

from __future__ import annotations

import json
import os
import re
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
READY = re.compile(r"tool server ready: (did:talos:\S+)")


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


def test_the_planner_gets_every_answer_through_a_kill_of_the_tool_server(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = clean_env({"TALOS_REGISTRY_URL": registry.url, "PATH": path})
    subprocess.run(
        ["bash", str(EXAMPLES / "setup.sh"), str(work)],  # noqa: S607 -- bash from PATH, as a user runs it
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    tools_id = (work / "tools.id").read_text().strip()
    children: list[ChildProcess] = []
    try:
        tools = _start("tool_server.py", cwd=work, env=env, log=tmp_path / "tools-1.log")
        children.append(tools)
        assert tools.wait_for_line(READY, 30).group(1) == tools_id  # announced once
        tools.kill()  # kill -9: the planner's calls must wait in its outbox
        tools.stop()  # (already dead: only closes its stdout)

        planner = _start("planner.py", tools_id, cwd=work, env=env, log=tmp_path / "planner.log")
        children.append(planner)
        wait_until(
            lambda: "cannot connect" in planner.log_text(), 30, what="a failed delivery attempt"
        )
        tools = _start("tool_server.py", cwd=work, env=env, log=tmp_path / "tools-2.log")
        children.append(tools)
        tools.wait_for_line(READY, 30)

        output = planner.finish(60)
        assert planner.returncode == 0, planner.log_tail(40)
        answers = [json.loads(line) for line in output.splitlines()]
        assert [answer["tool"] for answer in answers] == ["add", "upper", "divide"]
        assert answers[0]["result"] == 5
        assert answers[1]["result"] == "TALOS"
        assert answers[2]["error"].startswith("ZeroDivisionError")
    finally:
        for child in children:
            child.stop()  # SIGTERM, then SIGKILL; closes its stdout
