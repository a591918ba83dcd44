"""``talos.testing``'s process helpers on small real child processes."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import pytest

from talos.testing.child import ChildFailed, ChildProcess, spawn, still_running, stop_all
from talos.testing.cli import CliResult, TalosCli, clean_env
from talos.testing.processes import free_port
from talos.testing.waiting import wait_until


def python(
    code: str, tmp_path: Path, name: str = "child", *, new_session: bool = False
) -> ChildProcess:
    """``python -c CODE`` as a child, its stderr in ``tmp_path/NAME.log``."""
    argv = [sys.executable, "-c", code]
    log = tmp_path / f"{name}.log"
    return spawn(argv, env=clean_env(), log=log, name=name, new_session=new_session)


def test_lines_are_read_one_at_a_time_even_when_they_arrive_together(tmp_path: Path) -> None:
    child = python("print('one\\ntwo\\nthree', flush=True)", tmp_path)
    try:
        assert child.read_line(10) == "one\n"
        assert child.read_line(10) == "two\n"
        assert child.read_until("three", 10) == "three\n"
        assert child.read_line(10) == ""  # the end of stdout
        assert child.wait(10) == 0
    finally:
        child.stop()


def test_read_line_gives_up_at_its_deadline(tmp_path: Path) -> None:
    child = python("import time; time.sleep(30)", tmp_path)
    try:
        started = time.monotonic()
        assert child.read_line(0.2) == ""
        assert time.monotonic() - started < 5
    finally:
        assert child.stop() == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    stubborn = python(code, tmp_path, "stubborn", new_session=True)
    polite = python("import time; time.sleep(60)", tmp_path, "polite")
    assert stubborn.read_line(20) == "ready\n"
    assert stop_all([stubborn, polite], timeout=0.5) == [stubborn]
    assert (stubborn.returncode, polite.returncode) == (-signal.SIGKILL, -signal.SIGTERM)
    assert not still_running(stubborn.pid)
    stubborn.stop()
    polite.stop()


def test_a_line_that_does_not_match_fails_with_the_log(tmp_path: Path) -> None:
    child = python("import sys; print('nope'); print('why', file=sys.stderr)", tmp_path)
    try:
        with pytest.raises(ChildFailed, match="'nope\\\\n'") as failure:
            child.wait_for_line(re.compile("ready"), 10)
        child.wait(10)
        assert "why" in child.log_text()
        assert "nope" in str(failure.value)
    finally:
        child.stop()


def test_the_cli_runner_returns_a_typed_result(tmp_path: Path) -> None:
    cli = TalosCli(timeout=60)
    home = tmp_path / "home"
    agent_id = cli.ok(home, "init", "--name", "alice").strip()
    assert agent_id.startswith("did:talos:")
    result = cli.run(home, "init", "--name", "alice")
    assert isinstance(result, CliResult)
    assert result.returncode != 0
    assert result.argv[3:5] == ("--home", str(home))
    assert cli.fails(home, result.returncode, "init", "--name", "alice").stderr == result.stderr
    with pytest.raises(AssertionError, match="exited"):
        result.expect(0)


def test_clean_env_drops_talos_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALOS_HOME", "/nowhere")
    env = clean_env({"EXTRA": "1"})
    assert "TALOS_HOME" not in env
    assert env["EXTRA"] == "1"


def test_wait_until_returns_the_value_or_names_what_it_waited_for() -> None:
    values = iter([0, 0, 7])
    assert wait_until(lambda: next(values), 10, interval=0.001) == 7
    with pytest.raises(TimeoutError, match="the sky to fall: not within 0.05 s"):
        wait_until(lambda: False, 0.05, what="the sky to fall", interval=0.01)


def test_free_ports_are_free() -> None:
    assert 0 < free_port() < 65536
    assert 0 < free_port(udp=True) < 65536
