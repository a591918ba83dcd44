"""request() through a kill -9 of the answering agent: the caller gets exactly one reply.

A real registry; the planner is a TalosClient in this process (capabilities
required, none granted to the server); the tool server is a separate OS
process (``tests/integration/tool_server.py``) that SIGKILLs itself at a
chosen moment and is started again on the same home and port.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.storage.agent_state import AgentState
from talos.testing.child import ChildProcess, spawn
from talos.testing.cli import clean_env
from talos.testing.processes import RegistryProcess, free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

SERVER = Path(__file__).with_name("tool_server.py")


class ToolServer:
    def __init__(self, home: Path, registry: RegistryProcess) -> None:
        self.home, self.registry = home, registry
        self.listen = f"127.0.0.1:{free_port()}"
        self.child: ChildProcess | None = None

    def start(self, *extra: str) -> str:
        command = [
            sys.executable,
            str(SERVER),
            *("--home", str(self.home), "--registry", self.registry.url),
            *("--listen", self.listen, *extra),
        ]
        log = self.home.with_suffix(".log")
        self.child = spawn(command, env=clean_env(), log=log, name="tools")
        line = self.child.read_line(30)
        assert line.startswith("ready "), (line, log.read_text(errors="replace"))
        return line.split()[1]

    def line(self) -> str:
        assert self.child is not None
        return self.child.read_line(30).strip()

    def killed(self) -> int:
        """Wait for the process to end (it kills itself); its exit status."""
        assert self.child is not None
        self.child.finish(30)  # waits, and closes its stdout
        return self.child.process.returncode

    def stop(self) -> None:
        if self.child is not None and self.child.running:
            self.child.stop()


def replies_sent(home: Path) -> int:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        return len(log.query(kind="REPLY_SENT"))


@pytest.mark.parametrize("moment", ["before-reply", "after-reply"])
async def test_the_caller_gets_exactly_one_reply_through_a_kill(
    tmp_path: Path, registry: RegistryProcess, moment: str
) -> None:
    server = ToolServer(tmp_path / "tools", registry)
    try:
        server_id = await asyncio.to_thread(server.start, "--die", moment)
        async with TalosClient.create(
            "planner", home=tmp_path / "planner", registry_url=registry.url
        ) as planner:
            asking = asyncio.create_task(planner.request(server_id, "job", timeout=90))
            first = await asyncio.to_thread(server.line)
            assert first.startswith("request ")
            assert await asyncio.to_thread(server.killed) != 0
            assert await asyncio.to_thread(server.start) == server_id
            reply = await asking
            assert reply.sender == server_id
            assert reply.data["echo"] == "job"
            assert reply.in_reply_to == first.split()[1]
            again = await asyncio.to_thread(server.line)
            # Handed to the application again after the restart; after a reply it
            # says it was answered already (Message.replied).
            request_id = first.split()[1]
            assert first == f"request {request_id} False"
            assert again == f"request {request_id} {moment == 'after-reply'}"
            assert await asyncio.to_thread(server.line) == "replied " + first.split()[1]
            assert await planner.receive(timeout=0.5) is None  # no second reply anywhere
    finally:
        server.stop()
    assert replies_sent(tmp_path / "tools") == 1
