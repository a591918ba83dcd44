"""A tool server answering requests, as a separate OS process that can be killed.

Not a test module. ``tests/integration/test_request_reply_kill.py`` starts it,
lets it SIGKILL itself at a chosen moment and starts it again on the same
home::

    python tests/integration/tool_server.py --home H --registry URL \\
        --listen HOST:PORT [--die before-reply|after-reply]

It prints ``ready <agent id>`` once it listens, then reads requests at least
once (``receive(auto_ack=False)``), prints ``request <id> <replied>``, answers
``{"echo": data, "pid": <its pid>}`` and only then acknowledges the request.
``--die before-reply`` kills the process right after it printed the
request; ``--die after-reply`` right after ``reply()`` returned (the reply
durable in its outbox), before the request is acknowledged: after a restart
the request comes again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from talos.client import TalosClient

__test__ = False


async def serve(args: argparse.Namespace) -> None:
    async with TalosClient.create(
        "tools",
        home=args.home,
        registry_url=args.registry,
        listen=args.listen,
        accept_policy="open",
    ) as client:
        print("ready", client.agent_id, flush=True)
        async for request in client.messages(auto_ack=False):
            print("request", request.message_id, request.replied, flush=True)
            if args.die == "before-reply":
                os.kill(os.getpid(), signal.SIGKILL)
            await request.reply({"echo": request.data, "pid": os.getpid()})
            if args.die == "after-reply":
                os.kill(os.getpid(), signal.SIGKILL)
            await client.acknowledge(request)
            print("replied", request.message_id, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--die", choices=("before-reply", "after-reply"))
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
