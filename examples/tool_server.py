"""A tool server agent: answers JSON tool calls {"id", "tool", "args"} with
{"id", "result"} or {"id", "error"}. Run examples/setup.sh first."""

import asyncio
import os

from talos import TalosClient

REGISTRY = os.environ.get("TALOS_REGISTRY_URL", "http://127.0.0.1:8765")
TOOLS = {
    "add": lambda a, b: a + b,
    "upper": lambda text: text.upper(),
    "divide": lambda a, b: a / b,
}


async def main() -> None:
    async with TalosClient.create("tools", home="tools-home", registry_url=REGISTRY) as client:
        print("tool server ready:", client.agent_id, flush=True)
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
