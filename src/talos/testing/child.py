"""One child process of a test: start it, read its output, stop it for sure.

:class:`ChildProcess` owns a :class:`subprocess.Popen` whose stdout is a pipe
(read line by line, with a deadline) and whose stderr goes to a log file
(kept for the failure message). Stopping is SIGTERM, a bounded wait, then
SIGKILL; :func:`stop_all` does that for many children at once so that they
shut down in parallel. A child started with ``new_session`` leads a process
group of its own and is signalled through it, so that a wrapping command
(such as ``env`` or ``timeout``) and the program under it stop together.

Nothing here knows about Talos: :mod:`talos.testing.processes` builds the
registry and agent processes on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ChildFailed", "ChildProcess", "spawn", "still_running", "stop_all"]

#: How long a child may take to exit after SIGTERM before it gets SIGKILL.
STOP_WAIT = 15.0


class ChildFailed(RuntimeError):
    """A child exited, or did not show it was ready, when it should have been running."""


@dataclass
class ChildProcess:
    """A running (or finished) child: its process, its stderr log and how to signal it."""

    process: subprocess.Popen[bytes]
    log: Path
    name: str = "child"
    #: Whether the child leads its own process group (signals go to the whole group).
    group: bool = False
    _pending: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has been waited for, else ``None``."""
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child (to its process group if it leads one)."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.group:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)

    def kill(self) -> int:
        """SIGKILL, no chance to clean up; waits and returns the exit status."""
        self.signal(signal.SIGKILL)
        return self.process.wait()

    def wait(self, timeout: float) -> int:
        """Wait for the exit status.

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = STOP_WAIT) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; closes stdout; the exit status."""
        stop_all([self], timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def read_line(self, timeout: float) -> str:
        """The next line of stdout, or ``""`` if none came within ``timeout`` seconds.

        At the end of stdout, what is left (possibly ``""``). Read the child's
        stdout only through this object: it keeps what it read past a line.
        """
        stream = self.process.stdout
        if stream is None:
            raise ValueError(f"{self.name}'s stdout is not a pipe")
        deadline = time.monotonic() + timeout
        while (end := self._pending.find(b"\n")) < 0:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([stream], [], [], max(0.0, left))
            if not ready:
                return ""
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                end = len(self._pending) - 1
                break
            self._pending += chunk
        line = bytes(self._pending[: end + 1])
        del self._pending[: end + 1]
        return line.decode(errors="replace")

    def read_until(self, marker: str, timeout: float) -> str:
        """Stdout up to and including the first line that contains ``marker``.

        Returns everything read: without ``marker`` at its end if the child
        closed stdout first or ``timeout`` seconds passed.
        """
        deadline = time.monotonic() + timeout
        seen = ""
        while marker not in seen:
            line = self.read_line(deadline - time.monotonic())
            if not line:
                break
            seen += line
        return seen

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Read the first stdout line and match ``pattern`` against it.

        Raises:
            ChildFailed: the line did not come within ``timeout`` seconds, or
                does not match; the message holds the line and the log's tail.
        """
        line = self.read_line(timeout)
        match = pattern.search(line)
        if match is None:
            state = "exited" if self.process.poll() is not None else "running"
            raise ChildFailed(f"{self.name} not ready ({state}): {line!r}\n{self.log_tail(40)}")
        return match

    def finish(self, timeout: float) -> str:
        """Wait up to ``timeout`` s for the child to exit; the rest of its stdout.

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        out, _ = self.process.communicate(timeout=timeout)
        rest = bytes(self._pending) + (out or b"")
        self._pending.clear()
        return rest.decode(errors="replace")

    def log_text(self) -> str:
        """Everything the child wrote to its log so far."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path,
    name: str = "child",
    new_session: bool = False,
    stdout_pipe: bool = True,
) -> ChildProcess:
    """Start ``argv`` with no stdin, stdout on a pipe and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as stderr:
        process = subprocess.Popen(  # noqa: S603 -- the caller's own command line
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=new_session,
        )
    return ChildProcess(process, log, name, group=new_session)


def stop_all(children: Sequence[ChildProcess], timeout: float = STOP_WAIT) -> list[ChildProcess]:
    """SIGTERM every child still running, wait for all; SIGKILL what is left.

    Returns the children that had to be killed.
    """
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = []
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            killed.append(child)
    return killed


def still_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
