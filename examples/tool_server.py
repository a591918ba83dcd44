"""A tool server agent: answers each JSON tool call {"tool", "args"} sent with
request() by {"result"} or {"error"}. Start it first: it writes its id to tools.id."""

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
        while not Path("planner.id").exists():  # the planner says who it is
            await asyncio.sleep(0.2)
        planner = Path("planner.id").read_text()
        grant = await client.grant(planner, "message.send", expires_in=30 * 86400)
        Path("tools.grant.tmp").write_text(grant)  # the planner may call us; our
        Path("tools.grant.tmp").replace("tools.grant")  # replies need no grant
        # At least once: a call is acknowledged only once its reply is durable; one
        # handed out again after a crash says whether we answered it (message.replied).
        async for message in client.messages(auto_ack=False):
            if message.is_request and not message.replied:
                call = message.data if isinstance(message.data, dict) else {}
                print("running", call.get("tool"), call.get("args"), flush=True)
                try:
                    answer = {"result": TOOLS[call["tool"]](*call["args"])}
                except Exception as error:  # a bad call gets an error answer, not a crash
                    answer = {"error": f"{type(error).__name__}: {error}"}
                await message.reply(answer)  # durable in the outbox; returns at once
            await client.acknowledge(message)


asyncio.run(main())
