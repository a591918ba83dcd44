"""Commands that replace a home's stores hold the home until they are done.

Checking the lock and letting it go would leave a window (``rebuild
--from-peers`` spends seconds fetching) in which a supervisor could start
``talos run``, which would then write ratchet state into an environment the
command is about to move aside.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.cli import lockfile
from talos.cli.exit_codes import exit_code_for_name
from talos.errors import AgentAlreadyRunning
from talos.storage.lock import HomeLock
from talos.testing.cli import TalosCli

CLI = TalosCli()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "alice"
    CLI.ok(home, "init", "--name", "alice", "--no-passphrase")
    yield home
    held = lockfile._HELD.pop(home.resolve(), None)
    if held is not None:
        held.release()


def test_an_agent_started_while_a_command_holds_the_home_is_refused(home: Path) -> None:
    lockfile.refuse_while_running(home, "talos audit rebuild")
    lockfile.refuse_while_running(home, "talos audit rebuild")  # held once, not twice
    started = CLI.run(home, "run", "--offline")
    assert started.returncode == exit_code_for_name("AgentAlreadyRunning"), started
    lockfile._HELD.pop(home.resolve()).release()
    HomeLock.acquire(home).release()  # free again once the command let it go


def test_a_command_is_refused_while_another_process_holds_the_home(home: Path) -> None:
    other = HomeLock.acquire(home)  # as a running agent would
    try:
        with pytest.raises(AgentAlreadyRunning, match="stop it before `talos recover`"):
            lockfile.refuse_while_running(home, "talos recover")
    finally:
        other.release()
