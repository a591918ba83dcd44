"""The home's lock, as the CLI uses it: :mod:`talos.storage.lock`.

The library takes the lock itself (every :class:`~talos.client.TalosClient`,
so ``talos run`` too); commands that write a home's stores directly take it
too, for the rest of the command (:func:`refuse_while_running`): an agent
started meanwhile (a supervisor restarting ``talos run``) is refused until
the command is done, instead of writing into stores the command is about to
replace.
"""

from __future__ import annotations

from pathlib import Path

from talos.errors import AgentAlreadyRunning
from talos.storage.lock import LOCK_NAME, HomeLock, running_agent_pid

__all__ = ["LOCK_NAME", "refuse_while_running", "running_agent_pid"]

#: The homes this command holds, until the process exits (one lock per home).
_HELD: dict[Path, HomeLock] = {}


def refuse_while_running(home: Path, command: str) -> None:
    """Refuse ``command`` while an agent holds ``home``; otherwise hold the home
    until this process exits. A home that does not exist yet holds no agent.

    Raises:
        AgentAlreadyRunning: the home's agent is running.
        StorageError: the lock file cannot be opened.
    """
    key = home.resolve()
    if key in _HELD or not home.is_dir():
        return
    try:
        _HELD[key] = HomeLock.acquire(home)
    except AgentAlreadyRunning:
        pid = running_agent_pid(home)
        raise AgentAlreadyRunning(
            f"the agent of {home} is running (pid {pid or '?'}): stop it before `{command}`, "
            "which changes what the running agent holds in memory"
        ) from None
