"""``talos run`` daemons as child processes, for the CLI integration tests.

Each daemon runs in a process group of its own, so that a wrapper (e.g.
``faketime``) and the agent under it are signalled together.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TALOS = [sys.executable, "-m", "talos"]
READY = re.compile(r"agent (\S+) listening on (\S+)")


def read_line(stream: Any, deadline: float) -> str:
    """One line from a child's stdout pipe, or "" if none came before ``deadline``."""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            return str(stream.readline().decode())
    return ""


@dataclass
class Daemon:
    """A ``talos run`` child process."""

    process: subprocess.Popen[bytes]
    home: Path
    log: Path
    agent_id: str = ""

    def wait_ready(self) -> Daemon:
        """Wait (30 s at most) for the ``agent <id> listening on <endpoint>`` line."""
        line = read_line(self.process.stdout, time.monotonic() + 30)
        match = READY.search(line)
        assert match, f"not ready: {line!r}\n{self.log.read_text()}"
        self.agent_id = match.group(1)
        return self

    def stop(self) -> int:
        """SIGTERM to the process group, then wait (SIGKILL after 15 s); the exit status."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


@dataclass
class Daemons:
    """Starts daemons with ``env``; :func:`daemons` stops every one at the end."""

    env: dict[str, str]
    started: list[Daemon] = field(default_factory=list)

    def start(
        self, home: Path, *args: str, ready: bool = True, prefix: Sequence[str] = ()
    ) -> Daemon:
        """``talos --home HOME run ARGS`` (behind ``prefix``, e.g. a faketime wrapper)."""
        log = home.parent / f"{home.name}-{len(self.started)}.log"
        with log.open("ab") as stderr:
            process = subprocess.Popen(  # noqa: S603 -- our own interpreter and module
                [*prefix, *TALOS, "--home", str(home), "run", *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        daemon = Daemon(process, home, log)
        self.started.append(daemon)
        return daemon.wait_ready() if ready else daemon


@contextmanager
def daemons(env: dict[str, str]) -> Iterator[Daemons]:
    """A :class:`Daemons` whose every daemon is stopped on exit."""
    group = Daemons(env)
    try:
        yield group
    finally:
        for daemon in group.started:
            daemon.stop()
