"""One agent per home: a TalosClient holds the home's lock (talos.storage.lock)."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from talos.client import TalosClient
from talos.errors import AgentAlreadyRunning
from talos.storage.lock import running_agent_pid
from talos.testing.child import spawn
from talos.testing.cli import clean_env

pytestmark = pytest.mark.asyncio

_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from talos.client import TalosClient

    async def main():
        async with TalosClient.create("holder", home=sys.argv[1], discovery=[]) as client:
            print("ready", client.agent_id, flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_a_second_client_in_this_process_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with TalosClient.create("one", home=home, discovery=[]) as first:
        with pytest.raises(AgentAlreadyRunning, match="is running for home") as refused:
            await TalosClient.create("one", home=home, discovery=[])
        assert "own --home" in refused.value.diagnostics()
        assert running_agent_pid(home) is not None
        assert first.queue_depth() == 0  # the first one is untouched
    assert running_agent_pid(home) is None  # released on close
    async with TalosClient.create("one", home=home, discovery=[]) as again:
        assert again.agent_id == first.agent_id


async def test_another_process_holding_the_home_is_refused_until_it_dies(tmp_path: Path) -> None:
    home = tmp_path / "home"
    holder = spawn(
        [sys.executable, "-c", _HOLDER, str(home)],
        env=clean_env(),
        log=tmp_path / "holder.log",
        name="holder",
    )
    try:
        line = await asyncio.to_thread(holder.read_line, 60)
        assert line.startswith("ready "), holder.log_text()
        with pytest.raises(AgentAlreadyRunning, match=f"pid {holder.pid}"):
            await TalosClient.create("holder", home=home, discovery=[])
        holder.signal(signal.SIGKILL)  # no clean-up at all: the kernel drops the flock
        holder.wait(30)
        async with TalosClient.create("holder", home=home, discovery=[]) as client:
            assert client.agent_id == line.split()[1]
    finally:
        holder.stop()
