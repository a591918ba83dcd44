"""A Talos agent as a separate OS process, for the fault-injection suite.

Not a test module (pytest does not collect it: the name does not start with
``test_`` and ``__test__`` is false). ``tests/integration/test_faults.py``
starts it, kills it with SIGKILL at random moments and restarts it on the
same home::

    python tests/integration/agent_driver.py --home H --registry URL \\
        --role sender|receiver [--peer ID] --count N --out FILE [--listen HOST:PORT]

Both roles print ``ready <agent id>`` on stdout once the client listens.

**Sender** sends the strings ``"0"`` .. ``"N-1"`` to ``--peer`` in order with
``on_failure="queue"`` and a short timeout. Once ``send`` returns, the
message is durable in the agent's outbox (delivered or queued); the driver
then appends ``{"n", "id", "status"}`` to ``--out`` (flush + fsync). The next
number to send is therefore durable too, with one window: a kill after the
outbox commit and before the line is written. On restart the driver closes
it from the agent's own audit log, which records every enqueue
(``MESSAGE_SENT``, with the payload's SHA-256) in the same transaction as the
outbox row: a number found there is recorded as ``"recovered"`` and never
sent again. After the last number the sender keeps running until its outbox
is empty (every message acknowledged by the receiver), prints ``drained`` and
exits 0.

**Receiver** loops ``receive(timeout, auto_ack=False)``, appends
``{"sender", "id", "data", "fresh"}`` to ``--out`` (flush + fsync), and only
then calls ``acknowledge(message)``. A kill between the two shows the message
again after restart: **at least once** to the application. ``fresh`` is false
when the message id is already in the file: the application's dedup by
message id, which turns at-least-once into an exactly-once observable effect
(the library already delivers each message id into the inbox exactly once:
the receive commit holds the replay entry and the sender retries until the
ACK that follows it). The receiver exits 0 once it has recorded ``N``
distinct message ids.

``--advertise HOST:PORT`` (receiver) publishes, after start, a peer record
for this instance signed with the agent's key and naming that address, so
peers reach the agent through a proxy there. TalosClient has no option for
an advertised endpoint that differs from the listening one, so the driver
signs the record itself with the identity from its home.

``--die-before-journal N`` (sender) makes the process SIGKILL itself right
after ``send`` accepted number N and before journaling it: the crash window
the audit-log recovery closes, hit deterministically.

``accept_policy="open"`` keeps capabilities out of this suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.core.clock import time_ms
from talos.core.message import encode_payload
from talos.core.peer_record import PeerRecord
from talos.discovery.registry_client import RegistryClient
from talos.errors import QueueFull
from talos.storage.agent_state import AgentState
from talos.storage.home import AgentHome
from talos.system import SYSTEM_CLOCK

__test__ = False

_log = logging.getLogger("agent_driver")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of ``path``; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
            os.fsync(handle.fileno())
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


class Journal:
    """Append-only JSON lines, each one durable (flush + fsync) before ``append`` returns."""

    def __init__(self, path: Path) -> None:
        self._handle = path.open("ab")

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True).encode() + b"\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def recover_enqueued(home: Path, peer: str, missing: list[int]) -> dict[int, str]:
    """Numbers in ``missing`` the agent already enqueued for ``peer``, from its audit log."""
    audit = home / "audit"
    if not missing or not audit.exists():
        return {}
    wanted = {hashlib.sha256(encode_payload(str(n))).digest(): n for n in missing}
    found: dict[int, str] = {}
    with AuditLog.open(audit, readonly=True, extra_databases=AgentState.DATABASES) as log:
        for entry in log.query(kind="MESSAGE_SENT", peer=peer):
            n = wanted.get(bytes(entry.data["sha256"]))
            if n is not None:
                found[n] = bytes(entry.data["id"]).hex()
    return found


async def run_sender(args: argparse.Namespace, stop: asyncio.Event) -> int:
    out = Path(args.out)
    accepted = {int(r["n"]): r["id"] for r in read_records(out)}
    missing = [n for n in range(args.count) if n not in accepted]
    recovered = recover_enqueued(Path(args.home), args.peer, missing)
    journal = Journal(out)
    for n, message_id in sorted(recovered.items()):
        _log.info("message %d was enqueued before the crash as %s; not resending", n, message_id)
        journal.append({"n": n, "id": message_id, "status": "recovered"})
        accepted[n] = message_id
    following = max(accepted, default=-1) + 1
    if sorted(accepted) != list(range(following)):
        raise SystemExit(f"accepted numbers are not contiguous: {sorted(accepted)}")
    client = await TalosClient.create(
        "sender",
        home=args.home,
        registry_url=args.registry,
        listen=args.listen,
        accept_policy="open",
        reconnect_interval=args.reconnect_interval,
    )
    try:
        print(f"ready {client.agent_id}", flush=True)
        n = following
        while n < args.count and not stop.is_set():
            try:
                result = await client.send(
                    args.peer, str(n), timeout=args.send_timeout, on_failure="queue"
                )
            except QueueFull:
                await asyncio.sleep(0.1)
                continue
            if n == args.die_before_journal:
                # Fault hook: the outbox holds the message, the journal does not yet.
                os.kill(os.getpid(), signal.SIGKILL)
            journal.append({"n": n, "id": result.message_id, "status": result.status})
            n += 1
            if args.interval:
                await asyncio.sleep(args.interval)
        print("sent-all", flush=True)
        # TalosClient has no "outbox drained" event to wait on: poll the depth.
        while client.queue_depth() and not stop.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if stop.is_set():
            return 1
        print(f"drained {json.dumps(client.status(), sort_keys=True)}", flush=True)
        return 0
    finally:
        journal.close()
        await client.close()


async def advertise(client: TalosClient, home: Path, registry: str, address: str) -> None:
    """Publish a record of this instance naming ``address`` instead of the listening one."""
    identity = AgentHome(home).load_identity(passphrase=None)
    record = PeerRecord.create(
        identity.signing_key,
        agent_id=identity.agent_id,
        key_sequence=identity.sequence,
        instance_id=bytes.fromhex(client.status()["instance_id"]),
        endpoint=f"ws://{address}",
        sequence=time_ms(SYSTEM_CLOCK),
        now=time.time(),
        lifetime=3600.0,
    )
    async with RegistryClient(registry) as registry_client:
        await registry_client.publish_record(record)


async def run_receiver(args: argparse.Namespace, stop: asyncio.Event) -> int:
    out = Path(args.out)
    seen = {r["id"] for r in read_records(out)}
    journal = Journal(out)
    client = await TalosClient.create(
        "receiver",
        home=args.home,
        registry_url=args.registry,
        listen=args.listen,
        accept_policy="open",
        reconnect_interval=args.reconnect_interval,
    )
    try:
        if args.advertise:
            await advertise(client, Path(args.home), args.registry, args.advertise)
        print(f"ready {client.agent_id}", flush=True)
        while len(seen) < args.count and not stop.is_set():
            message = await client.receive(timeout=0.5, auto_ack=False)
            if message is None:
                continue
            message_id = message.message_id
            fresh = message_id not in seen
            journal.append(
                {"sender": message.sender, "id": message_id, "data": message.data, "fresh": fresh}
            )
            seen.add(message_id)
            await client.acknowledge(message)
        if stop.is_set():
            return 1
        print(f"done {json.dumps(client.status(), sort_keys=True)}", flush=True)
        return 0
    finally:
        journal.close()
        await client.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A Talos agent process for fault tests.")
    parser.add_argument("--home", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--role", choices=["sender", "receiver"], required=True)
    parser.add_argument("--peer", help="the receiver's agent id (sender only)")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--advertise", help="HOST:PORT to announce instead (receiver)")
    parser.add_argument("--interval", type=float, default=0.0, help="pause between sends")
    parser.add_argument("--send-timeout", type=float, default=0.5)
    parser.add_argument("--reconnect-interval", type=float, default=1.0)
    parser.add_argument(
        "--die-before-journal",
        type=int,
        default=-1,
        metavar="N",
        help="SIGKILL itself after send(N) returned, before journaling it (fault hook)",
    )
    args = parser.parse_args(argv)
    if args.role == "sender" and not args.peer:
        parser.error("--peer is required for the sender")
    return args


async def main_async(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = run_sender if args.role == "sender" else run_receiver
    return await runner(args, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.role}[{os.getpid()}] %(name)s %(levelname)s %(message)s",
    )
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 1


if __name__ == "__main__":
    sys.exit(main())
