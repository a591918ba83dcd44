"""A planner agent: asks the tool server JSON tool calls with request() and prints
each answer as a JSON line. Run it where tool_server.py runs (it reads tools.id)."""

import asyncio
import json
import os
import sys
from pathlib import Path

from talos import DeliveryTimeout, ReplyTimeout, TalosClient

REGISTRY = os.environ.get("TALOS_REGISTRY_URL", "http://127.0.0.1:8765")
PLAN = [("add", [2, 3]), ("upper", ["talos"]), ("divide", [1, 0])]


async def ask(client: TalosClient, server: str, call: dict, tries: int = 30) -> dict:
    for _ in range(tries - 1):
        try:
            return (await client.request(server, call, timeout=10)).data
        except (DeliveryTimeout, ReplyTimeout) as error:  # down, or restarting
            print("asking again:", error, file=sys.stderr, flush=True)
    return (await client.request(server, call, timeout=10)).data


async def main() -> None:
    server = Path("tools.id").read_text().strip()
    async with TalosClient.create("planner", home="planner-home", registry_url=REGISTRY) as client:
        Path("planner.id.tmp").write_text(client.agent_id)  # for the tool server's grant,
        Path("planner.id.tmp").replace("planner.id")  # written whole, then renamed
        while not Path("tools.grant").exists():
            await asyncio.sleep(0.2)
        await client.add_capability(Path("tools.grant").read_text())  # request() attaches it
        for tool, args in PLAN:  # one at a time: answered in order
            answer = await ask(client, server, {"tool": tool, "args": args})
            print(json.dumps({"tool": tool, **answer}), flush=True)


asyncio.run(main())
