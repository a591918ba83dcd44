"""The lock that says a running agent holds an agent home.

A running agent — a :class:`~talos.client.TalosClient` opened by an
application or by ``talos run`` — holds an exclusive ``flock`` on
``<home>/control.lock`` (with its pid written in it) from before it opens
any store until it closes. A second agent on the same home, in this process
or another, is refused with :class:`~talos.errors.AgentAlreadyRunning`
instead of running one identity twice (the split brain of the failure
modes: two ratchets, two outboxes, two audit logs diverging).

``flock`` locks belong to an open file description, so the kernel releases
the lock when the holder closes it *or dies* (SIGKILL included): a stale
lock file never blocks a restart. Two opens of the file in one process are
two descriptions, so the lock also excludes a second client in the same
process.

Commands that replace what the running agent keeps in memory (its keys, its
audit log) check it (:func:`refuse_while_running`) and refuse while the
agent runs, rather than leave it signing with a retired key or writing into
a log that was swapped under it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

from talos.errors import AgentAlreadyRunning, StorageError

__all__ = ["LOCK_NAME", "HomeLock", "refuse_while_running", "running_agent_pid"]

LOCK_NAME: Final = "control.lock"


class HomeLock:
    """The exclusive hold of one agent home, until :meth:`release` (or process death)."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, home: Path) -> HomeLock:
        """Hold ``<home>/control.lock`` (the home must exist), with our pid in it.

        Raises:
            AgentAlreadyRunning: another agent (process or client) holds it.
            StorageError: the lock file cannot be opened or written.
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
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the home go (idempotent). The pid stays in the file; the lock is what counts."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the flock


def running_agent_pid(home: Path) -> int | None:
    """The pid of the agent holding ``home`` (0 if unknown), or None if none runs.

    For commands that write the home's stores directly (the audit log, the
    token store): while an agent runs, those belong to it.

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
    """Refuse ``command`` while an agent holds ``home``.

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
