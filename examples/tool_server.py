"""A tool server agent: answers JSON tool calls {"id", "tool", "args"} with
{"id", "result"} or {"id", "error"}. Start it first: it writes its id to tools.id."""

import asyncio
import os
from pathlib import Path

from talos import TalosClient

REGISTRY = os.environ.get("TALOS_REGISTRY_URL", "http://127.0.0.1:8765")
TOOLS = {"add": lambda a, b: a + b, "upper": str.upper, "divide": lambda a, b: a / b}


async def main() -> None:
    async with TalosClient.create("tools", home="tools-home", registry_url=REGISTRY) as client:
        Path("tools.id").write_text(client.agent_id)
        print("tool server ready:", client.agent_id, "at", client.endpoint, flush=True)
        while not Path("planner.grant").exists():  # the planner's grant: we may answer it
            await asyncio.sleep(0.2)
        planner = await client.add_capability(Path("planner.grant").read_text())
        grant = await client.grant(planner.issuer, "message.send", expires_in=30 * 86400)
        Path("tools.grant.tmp").write_text(grant)  # ours: it may call us
        Path("tools.grant.tmp").replace("tools.grant")
        # At least once: a call is acknowledged only after its answer is queued
        # durably, so a crash in between answers it again after the restart.
        async for message in client.messages(auto_ack=False):
            call = message.data if isinstance(message.data, dict) else {}
            try:
                answer = {"id": call["id"], "result": TOOLS[call["tool"]](*call["args"])}
            except Exception as error:  # a bad call gets an error answer, not a crash
                answer = {"id": call.get("id"), "error": f"{type(error).__name__}: {error}"}
            # wait=False: durable in the outbox; one slow planner holds up no one.
            await client.send(message.sender, answer, wait=False)
            await client.acknowledge(message)


asyncio.run(main())
