"""A planner agent: sends JSON tool calls to the tool server and prints each answer
as a JSON line. Usage: python planner.py TOOL_SERVER_ID (examples/setup.sh first)."""

import asyncio
import json
import os
import sys
import uuid

from talos import TalosClient

REGISTRY = os.environ.get("TALOS_REGISTRY_URL", "http://127.0.0.1:8765")
PLAN = [("add", [2, 3]), ("upper", ["talos"]), ("divide", [1, 0])]


async def main(server: str) -> None:
    async with TalosClient.create("planner", home="planner-home", registry_url=REGISTRY) as client:
        asked = {}
        for tool, args in PLAN:
            call = {"id": uuid.uuid4().hex, "tool": tool, "args": args}
            asked[call["id"]] = tool
            # Returns once the call is durable: a tool server that is down gets it later.
            await client.send(server, call, wait=False)
        async for message in client.messages(auto_ack=False):
            answer = message.data if isinstance(message.data, dict) else {}
            if message.sender == server and answer.get("id") in asked:  # repeats dropped
                print(json.dumps({"tool": asked.pop(answer["id"]), **answer}), flush=True)
            await client.acknowledge(message)
            if not asked:
                break


asyncio.run(main(sys.argv[1]))
