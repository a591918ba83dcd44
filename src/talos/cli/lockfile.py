"""The lock file that says a ``talos run`` daemon holds an agent home.

``talos run`` holds an exclusive ``flock`` on ``<home>/control.lock`` (with
its pid written in it) for as long as it runs. Commands that replace what
the running agent keeps in memory (its keys, its audit log) check it and
refuse while the daemon runs, rather than leave it signing with a retired
key or writing into a log that was swapped under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from talos.errors import AgentAlreadyRunning, StorageError

__all__ = ["LOCK_NAME", "daemon_lock", "refuse_while_running", "running_agent_pid"]

LOCK_NAME: Final = "control.lock"


@contextlib.contextmanager
def daemon_lock(home: Path) -> Iterator[None]:
    """Hold ``<home>/control.lock`` (with our pid in it) while the daemon runs.

    Raises:
        AgentAlreadyRunning: another process holds it.
        StorageError: the lock file cannot be opened.
    """
    path = home / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AgentAlreadyRunning(
                f"another Talos agent (pid {pid}) is running for home {home}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def running_agent_pid(home: Path) -> int | None:
    """The pid of the daemon holding ``home`` (0 if unknown), or None if none runs.

    For commands that write the home's stores directly (the audit log, the
    token store): while a daemon runs, those belong to it.

    Raises:
        StorageError: the lock file exists but cannot be opened.
    """
    path = home / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isascii() and text.isdigit() else 0
    finally:
        os.close(fd)
    return None


def refuse_while_running(home: Path, command: str) -> None:
    """Refuse ``command`` while a daemon holds ``home``.

    Raises:
        AgentAlreadyRunning: the home's agent is running.
        StorageError: the lock file exists but cannot be opened.
    """
    pid = running_agent_pid(home)
    if pid is not None:
        raise AgentAlreadyRunning(
            f"the agent of {home} is running (pid {pid or '?'}): stop it before `{command}`, "
            "which changes what the running agent holds in memory"
        )
