"""A planner agent: sends JSON tool calls to the tool server and prints each answer
as a JSON line. Run it in the directory where tool_server.py runs (it reads tools.id)."""

import asyncio
import json
import os
import uuid
from pathlib import Path

from talos import TalosClient

REGISTRY = os.environ.get("TALOS_REGISTRY_URL", "http://127.0.0.1:8765")
PLAN = [("add", [2, 3]), ("upper", ["talos"]), ("divide", [1, 0])]


async def main() -> None:
    server = Path("tools.id").read_text().strip()
    async with TalosClient.create("planner", home="planner-home", registry_url=REGISTRY) as client:
        # Grants travel as files here, written whole then renamed. Ours lets it answer us:
        grant = await client.grant(server, "message.send", expires_in=30 * 86400)
        Path("planner.grant.tmp").write_text(grant)
        Path("planner.grant.tmp").replace("planner.grant")
        while not Path("tools.grant").exists():  # its grant to us, once it has read ours
            await asyncio.sleep(0.2)
        await client.add_capability(Path("tools.grant").read_text())  # send() attaches it
        asked = {}
        for tool, args in PLAN:
            call = {"id": uuid.uuid4().hex, "tool": tool, "args": args}
            asked[call["id"]] = tool
            await client.send(server, call, wait=False)  # returns once durable in the outbox
        async for message in client.messages(auto_ack=False):
            answer = message.data if isinstance(message.data, dict) else {}
            if message.sender == server and answer.get("id") in asked:  # repeats dropped
                print(json.dumps({"tool": asked.pop(answer["id"]), **answer}), flush=True)
            await client.acknowledge(message)
            if not asked:
                break


asyncio.run(main())
