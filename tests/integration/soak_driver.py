"""One agent of the kill -9 soak (``test_soak.py``): it sends and receives at once.

Not a test module (pytest does not collect it). ``tests/integration/test_soak.py``
starts two of these, A and B, each sending to the other while reading what
the other sends, and kills them with SIGKILL at random moments::

    python tests/integration/soak_driver.py --home H --registry URL --name A \\
        --peer-file FILE --count N --out FILE [--window W] [--send-timeout S]

It prints ``ready <agent id>`` once the client listens, then waits for
``--peer-file`` to hold the other agent's id (the test writes it once both
have started the first time).

**Sending.** The payload of message ``n`` is the text ``"NAME:n"`` (sender
name and sequence number). Up to ``--window`` ``send()`` calls run at once,
started in order of ``n`` (``on_failure="queue"``, short timeout, so sends
keep going while the peer is down); each is journaled as ``call`` before it
starts and as ``sent`` (with its message id and status) once it returned.
A returned send is durable in the agent's outbox. On restart the driver
reads the agent's own audit log, whose ``MESSAGE_SENT`` entries (with the
payload's SHA-256) commit in the same transaction as the outbox rows: a
number found there is never sent again (journaled ``recovered`` if its call
had not returned); a number not found there was never committed and is sent
again. So each number is committed once, and the audit log's order of
``MESSAGE_SENT`` is the send order the checker holds the receiver to.

**Receiving.** ``receive(auto_ack=False)``, journal ``read`` (sender,
message id, data, ``fresh``: the id was not journaled before), then
``acknowledge`` (one durable commit): a kill between the two shows that one
message again after restart, first.

Once everything is sent, the outbox is empty and ``--count`` distinct
messages from the peer were read, it journals ``finished`` and prints
``finished``, and keeps reading (and acknowledging) until SIGTERM: the peer
may still need its ACKs. Every journal line is durable (fsync) and carries
the wall time ``t``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from agent_driver import Journal, read_records  # the fault suite's journal, reused

from talos.audit import AuditLog
from talos.client import SendResult, TalosClient
from talos.core.message import encode_payload
from talos.storage.agent_state import AgentState

__test__ = False


def payload(name: str, n: int) -> str:
    return f"{name}:{n}"


def committed_sends(home: Path, name: str, count: int) -> list[tuple[int, str]]:
    """``(n, message id)`` of every ``MESSAGE_SENT`` in ``home``'s audit log, in order.

    Raises:
        ValueError: an entry whose payload is none of ``NAME:0`` .. ``NAME:count-1``.
    """
    audit = home / "audit"
    if not audit.exists():
        return []
    numbers = {hashlib.sha256(encode_payload(payload(name, n))).digest(): n for n in range(count)}
    found = []
    with AuditLog.open(audit, readonly=True, extra_databases=AgentState.DATABASES) as log:
        for entry in log.query(kind="MESSAGE_SENT"):
            n = numbers.get(bytes(entry.data["sha256"]))
            if n is None:
                raise ValueError(f"audit entry {entry.seq} is no message of {name}")
            found.append((n, bytes(entry.data["id"]).hex()))
    return found


def peer_id(path: Path) -> str | None:
    """The peer's agent id once the test has written it to ``path``."""
    return path.read_text().strip() or None if path.exists() else None


class Duplex:
    """One run of the driver: a sending task and a reading task on one client."""

    def __init__(self, args: argparse.Namespace, stop: asyncio.Event) -> None:
        self.args, self.stop = args, stop
        records = read_records(Path(args.out))
        self.start = sum(1 for r in records if r["kind"] == "start")
        self.returned = {r["n"] for r in records if r["kind"] in ("sent", "recovered")}
        self.seen = {r["id"] for r in records if r["kind"] == "read"}
        self.journal = Journal(Path(args.out))
        self.sent_all = False

    def note(self, kind: str, **fields: object) -> None:
        self.journal.append({"kind": kind, "t": round(time.time(), 4), **fields})

    async def run(self) -> int:
        args = self.args
        committed = dict(committed_sends(Path(args.home), args.name, args.count))
        self.note("start", start=self.start, committed=len(committed))
        for n in sorted(committed.keys() - self.returned):
            self.note("recovered", n=n, id=committed[n])
        todo = [n for n in range(args.count) if n not in committed]
        client = await TalosClient.create(
            args.name,
            home=args.home,
            registry_url=args.registry,
            accept_policy="open",
            reconnect_interval=args.reconnect_interval,
        )
        try:
            print(f"ready {client.agent_id}", flush=True)
            while (peer := peer_id(Path(args.peer_file))) is None:
                if self.stop.is_set():
                    return 1
                await asyncio.sleep(0.02)
            tasks = [
                asyncio.create_task(self.send_all(client, peer, todo)),
                asyncio.create_task(self.read_all(client)),
            ]
            stopped = asyncio.create_task(self.stop.wait())
            running = {*tasks, stopped}
            while not stopped.done():
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a failed task ends the run with its exception
            for task in running:
                task.cancel()
            return 0
        finally:
            self.journal.close()
            await client.close()

    async def send_all(self, client: TalosClient, peer: str, todo: list[int]) -> None:
        pending: collections.deque[tuple[int, asyncio.Task[SendResult]]] = collections.deque()

        async def oldest() -> None:
            n, task = pending.popleft()
            result = await task
            self.returned.add(n)
            self.note("sent", n=n, id=result.message_id, status=result.status)

        for n in todo:
            self.note("call", n=n)
            call = client.send(
                peer,
                payload(self.args.name, n),
                timeout=self.args.send_timeout,
                on_failure="queue",
            )
            pending.append((n, asyncio.create_task(call)))
            if len(pending) >= self.args.window:
                await oldest()
        while pending:
            await oldest()
        self.sent_all = True

    async def read_all(self, client: TalosClient) -> None:
        finished = False
        while True:
            message = await client.receive(timeout=0.2, auto_ack=False)
            if message is not None:
                message_id = message.message_id
                self.note(
                    "read",
                    sender=message.sender,
                    id=message_id,
                    data=message.data,
                    fresh=message_id not in self.seen,
                )
                self.seen.add(message_id)
                await client.acknowledge(message)
            if (
                not finished
                and self.sent_all
                and client.queue_depth() == 0
                and len(self.seen) >= self.args.count
            ):
                finished = True
                self.note("finished", start=self.start)
                print("finished", flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One agent of the kill -9 soak.")
    parser.add_argument("--home", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--name", required=True, help="the sender name in every payload")
    parser.add_argument("--peer-file", required=True, help="a file that will hold the peer's id")
    parser.add_argument("--count", type=int, required=True, help="messages each way")
    parser.add_argument("--out", required=True)
    parser.add_argument("--window", type=int, default=8, help="send() calls at once")
    parser.add_argument("--send-timeout", type=float, default=0.2)
    parser.add_argument("--reconnect-interval", type=float, default=1.0)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return await Duplex(args, stop).run()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.name}[{os.getpid()}] %(name)s %(levelname)s %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 1


if __name__ == "__main__":
    sys.exit(main())
