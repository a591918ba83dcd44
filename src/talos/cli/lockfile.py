"""The home's lock, as the CLI uses it: :mod:`talos.storage.lock`.

The library takes the lock itself (every :class:`~talos.client.TalosClient`,
so ``talos run`` too); commands that write a home's stores directly refuse
while an agent holds it.
"""

from __future__ import annotations

from talos.storage.lock import LOCK_NAME, refuse_while_running, running_agent_pid

__all__ = ["LOCK_NAME", "refuse_while_running", "running_agent_pid"]
