"""Fault injection across real process boundaries: kill -9, registry down, partitions.

A real registry and two agents, each a separate OS process running
``tests/integration/agent_driver.py`` on loopback with real LMDB homes. The
sender sends ``"0"`` .. ``"N-1"``; the receiver journals every message it is
handed (fsync) before acknowledging it. Each scenario injects a fault,
waits (bounded) for the sender's outbox to drain and the receiver to hold
every message, and counts from the two journals:

- ``sent``: numbers the sender's ``send`` accepted (durable in its outbox);
- ``delivered``: distinct message ids the receiver recorded;
- ``raw_duplicates``: records of an id already recorded (the at-least-once
  window between the receiver's journal write and its ``acknowledge``);
  the application drops them by message id, which is allowed;
- ``duplicated``: after that dedup, the same data under two message ids
  (the sender's driver re-sent something) — must be 0;
- ``lost``: accepted by the sender, never recorded by the receiver — must be 0;
- ``reordered``: first deliveries out of send order — must be 0.

Kill moments come from a random seed printed with the counts (``-s`` shows
them), so a failing run can be replayed with ``TALOS_FAULT_SEED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from talos.testing.child import ChildProcess, spawn
from talos.testing.cli import clean_env
from talos.testing.processes import RegistryProcess, free_port, registry_process

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

DRIVER = Path(__file__).with_name("agent_driver.py")
READY_TIMEOUT = 30.0
SCENARIO_DEADLINE = 60.0


def journal(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of a driver's journal (a torn last line is ignored)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    return [json.loads(line) for line in raw[: raw.rfind(b"\n") + 1].splitlines() if line]


class Agent:
    """One agent driver process; restartable on the same home and journal."""

    def __init__(
        self,
        role: str,
        directory: Path,
        registry: RegistryProcess,
        *,
        count: int,
        peer: str | None = None,
        listen: str = "127.0.0.1:0",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.role = role
        self.home = directory / role
        self.out = directory / f"{role}.jsonl"
        self.log = directory / f"{role}.log"
        self.registry = registry
        self.count, self.peer, self.listen, self.extra = count, peer, listen, extra
        self.child: ChildProcess | None = None
        self.agent_id = ""
        self.starts = 0
        self.tail = ""

    async def start(self, *once: str) -> str:
        """Start the process (``once``: extra arguments for this start only); wait for ready."""
        command = [
            sys.executable,
            str(DRIVER),
            *("--home", str(self.home), "--registry", self.registry.url),
            *("--role", self.role, "--count", str(self.count), "--out", str(self.out)),
            *("--listen", self.listen),
            *(("--peer", self.peer) if self.peer else ()),
            *self.extra,
            *once,
        ]
        if self.child is not None:
            await self.kill()  # already ended: this collects its output
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts} at {time.time():.3f}\n".encode())
        self.child = spawn(command, env=clean_env(), log=self.log, name=self.role)
        self.starts += 1
        line = await asyncio.to_thread(self.child.read_line, READY_TIMEOUT)
        if not line.startswith("ready "):
            await self.kill()
            raise AssertionError(f"{self.role} did not start: {line!r}\n{self.log_text()}")
        self.agent_id = line.split()[1]
        return self.agent_id

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.running

    async def kill(self) -> None:
        """SIGKILL, no chance to clean up."""
        if self.child is not None:
            self.child.signal(signal.SIGKILL)
            self.tail = await asyncio.to_thread(self.child.finish, READY_TIMEOUT)

    async def finish(self, deadline: float) -> int:
        """Wait (bounded) for a clean exit; returns the exit status."""
        assert self.child is not None
        try:
            self.tail = await asyncio.to_thread(
                self.child.finish, max(0.1, deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired:
            await self.kill()
            raise AssertionError(
                f"{self.role} did not finish in time\n{self.log_text()[-4000:]}"
            ) from None
        return self.child.returncode or 0

    def records(self) -> list[dict[str, Any]]:
        return journal(self.out)

    def holds(self, records: int) -> Callable[[], bool]:
        """A predicate: the journal has at least ``records`` complete lines."""
        return lambda: len(self.records()) >= records

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Counts:
    sent: int
    delivered: int
    received_raw: int
    raw_duplicates: int
    duplicated: int
    lost: int
    unexpected: int
    reordered: int
    wrong_data: int
    extra: dict[str, Any] = field(default_factory=dict)


def count(sender: Agent, receiver: Agent) -> Counts:
    accepted = sender.records()
    numbers = Counter(r["n"] for r in accepted)
    assert all(c == 1 for c in numbers.values()), f"sender journal repeats a number: {numbers}"
    by_id = {r["id"]: str(r["n"]) for r in accepted}
    received = receiver.records()
    first: dict[str, str] = {}
    order: list[int] = []
    for r in received:
        if r["id"] not in first:
            first[r["id"]] = r["data"]
            order.append(int(r["data"]))
    ids_per_data = Counter(first.values())
    return Counts(
        sent=len(by_id),
        delivered=len(first),
        received_raw=len(received),
        raw_duplicates=len(received) - len(first),
        duplicated=sum(n - 1 for n in ids_per_data.values()),
        lost=len(by_id.keys() - first.keys()),
        unexpected=len(first.keys() - by_id.keys()),
        reordered=sum(1 for a, b in zip(order, order[1:], strict=False) if b < a),
        wrong_data=sum(1 for i, data in first.items() if i in by_id and by_id[i] != data),
        extra={"statuses": dict(Counter(r["status"] for r in accepted))},
    )


def report(name: str, seed: int, counts: Counts, **notes: Any) -> None:
    print(f"\nSCENARIO {name} seed={seed} {json.dumps({**counts.__dict__, **notes})}")


def check(counts: Counts, expected: int) -> None:
    assert counts.sent == expected, counts
    assert counts.lost == 0, counts
    assert counts.duplicated == 0, counts
    assert counts.unexpected == 0, counts
    assert counts.wrong_data == 0, counts
    assert counts.delivered == expected, counts
    assert counts.reordered == 0, counts


def schedule(seed: int) -> random.Random:
    """The random source for fault moments (reproducible from the printed seed)."""
    return random.Random(seed)  # noqa: S311 -- kill moments, not secrets


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("TALOS_FAULT_SEED") or random.SystemRandom().randrange(1 << 32))
    return value


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    with registry_process(tmp_path / "registry") as server:
        yield server


@contextlib.asynccontextmanager
async def agents(
    tmp_path: Path,
    registry: RegistryProcess,
    *,
    count: int,
    interval: float,
    receiver_listen: str = "127.0.0.1:0",
    receiver_extra: tuple[str, ...] = (),
    sender_first: tuple[str, ...] = (),
) -> AsyncIterator[tuple[Agent, Agent]]:
    """A started receiver and sender; both killed on the way out, whatever happened."""
    receiver = Agent(
        "receiver", tmp_path, registry, count=count, listen=receiver_listen, extra=receiver_extra
    )
    sender = Agent(
        "sender",
        tmp_path,
        registry,
        count=count,
        extra=("--interval", str(interval), "--send-timeout", "0.5"),
    )
    try:
        sender.peer = await receiver.start()
        await sender.start(*sender_first)
        yield sender, receiver
    finally:
        for agent in (sender, receiver):
            await agent.kill()


async def until(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def finish(sender: Agent, receiver: Agent, deadline: float) -> None:
    assert await sender.finish(deadline) == 0, sender.log_text()[-4000:]
    assert await receiver.finish(deadline) == 0, receiver.log_text()[-4000:]
    assert sender.tail.startswith("sent-all\ndrained"), sender.tail


async def test_receiver_killed_and_restarted(
    tmp_path: Path, registry: RegistryProcess, seed: int
) -> None:
    """kill -9 of the receiver three times: nothing lost, nothing twice after id dedup.

    The receiver comes back on a new port; the sender finds it through the
    registry when the cached endpoint refuses.
    """
    total, rng = 200, schedule(seed)
    moments = sorted(rng.sample(range(10, total - 10), 3))
    deadline = time.monotonic() + SCENARIO_DEADLINE
    async with agents(tmp_path, registry, count=total, interval=0.01) as (sender, receiver):
        for moment in moments:
            await until(receiver.holds(moment), deadline, f"{moment} received")
            await asyncio.sleep(rng.uniform(0, 0.015))  # often with a message in flight
            await receiver.kill()
            await asyncio.sleep(rng.uniform(0, 0.3))
            await receiver.start()
        await finish(sender, receiver, deadline)
        counts = count(sender, receiver)
    report("receiver-kill-9", seed, counts, kills_after_records=moments)
    check(counts, total)


async def test_sender_killed_and_restarted(
    tmp_path: Path, registry: RegistryProcess, seed: int
) -> None:
    """kill -9 of the sender four times: it resumes from its durable outbox and journal.

    The first kill is the sender's own, right after ``send`` accepted a
    number and before the driver journaled it: the restarted driver finds
    that number in the agent's audit log and does not send it again.
    """
    total, rng = 200, schedule(seed)
    doomed = rng.randrange(5, 40)
    moments = sorted(rng.sample(range(doomed + 10, total - 10), 3))
    deadline = time.monotonic() + SCENARIO_DEADLINE
    first = ("--die-before-journal", str(doomed))
    async with agents(tmp_path, registry, count=total, interval=0.01, sender_first=first) as (
        sender,
        receiver,
    ):
        assert sender.child is not None
        status = await asyncio.to_thread(sender.child.wait, SCENARIO_DEADLINE)
        assert status == -signal.SIGKILL, sender.log_text()[-4000:]
        assert len(sender.records()) == doomed
        await sender.start()
        for moment in moments:
            await until(sender.holds(moment), deadline, f"{moment} sent")
            await asyncio.sleep(rng.uniform(0, 0.01))
            await sender.kill()
            await asyncio.sleep(rng.uniform(0, 0.3))
            await sender.start()
        await finish(sender, receiver, deadline)
        counts = count(sender, receiver)
    report(
        "sender-kill-9",
        seed,
        counts,
        self_kill_before_journal_of=doomed,
        kills_after_sends=moments,
        starts=sender.starts,
    )
    # The forced kill always lands between send() and the journal; a random
    # kill may land there too, so at least one message is recovered.
    assert counts.extra["statuses"].get("recovered", 0) >= 1
    check(counts, total)


async def test_sender_killed_with_a_backlog(
    tmp_path: Path, registry: RegistryProcess, seed: int
) -> None:
    """The receiver is down; the sender queues, is killed twice, and delivers after restart.

    Everything sits in the sender's outbox across two SIGKILLs (one while
    sending, one after the last send); the restarted sender delivers all of
    it, in order, once the receiver is back.
    """
    total, rng = 60, schedule(seed)
    kill_at = rng.randrange(10, total - 10)
    deadline = time.monotonic() + SCENARIO_DEADLINE
    receiver = Agent("receiver", tmp_path, registry, count=total)
    sender = Agent(
        "sender",
        tmp_path,
        registry,
        count=total,
        extra=("--send-timeout", "0.02"),
    )
    try:
        sender.peer = await receiver.start()
        await receiver.kill()
        await sender.start()
        await until(lambda: len(sender.records()) >= kill_at, deadline, f"{kill_at} queued")
        await sender.kill()
        await sender.start()
        await until(lambda: len(sender.records()) >= total, deadline, "all queued")
        await sender.kill()
        assert len(receiver.records()) == 0
        await receiver.start()
        await sender.start()
        await finish(sender, receiver, deadline)
        counts = count(sender, receiver)
    finally:
        for agent in (sender, receiver):
            await agent.kill()
    report("sender-kill-9-backlog", seed, counts, kill_after_sends=kill_at)
    assert set(counts.extra["statuses"]) <= {"queued", "recovered"}
    check(counts, total)


async def test_registry_stopped_mid_run(
    tmp_path: Path, registry: RegistryProcess, seed: int
) -> None:
    """The registry dies after the session exists; delivery continues from cached records.

    While it is down the receiver (on the same port) and then the sender are
    also killed and restarted: both sides work from their cached key logs
    and peer records.
    """
    total, rng = 150, schedule(seed)
    stop_at = rng.randrange(20, 50)
    deadline = time.monotonic() + SCENARIO_DEADLINE
    listen = f"127.0.0.1:{free_port()}"
    async with agents(tmp_path, registry, count=total, interval=0.01, receiver_listen=listen) as (
        sender,
        receiver,
    ):
        await until(lambda: len(receiver.records()) >= stop_at, deadline, "the session")
        registry.process.kill()
        await asyncio.to_thread(registry.process.wait)
        await until(lambda: len(receiver.records()) >= stop_at + 30, deadline, "more messages")
        await receiver.kill()
        await receiver.start()
        await until(lambda: len(receiver.records()) >= stop_at + 60, deadline, "more messages")
        await sender.kill()
        await sender.start()
        await finish(sender, receiver, deadline)
        counts = count(sender, receiver)
        receiver_status = json.loads(receiver.tail.split(" ", 1)[1])
    report("registry-down", seed, counts, registry_killed_after=stop_at)
    assert "registry unavailable" in receiver.log_text()
    assert receiver_status["registry_reachable"] is False
    check(counts, total)


class PartitionProxy:
    """A TCP proxy in this process between the sender and the receiver's real port.

    ``partition("reset")`` cuts every connection and refuses new ones (the
    peer sees a reset); ``partition("blackhole")`` stops forwarding without
    closing anything (bytes wait, as TCP retransmission would hold them);
    ``heal()`` restores forwarding.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode: str | None = None
        self._healed = asyncio.Event()
        self._healed.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        #: Reads from the sender held back by a partition (frames surely in flight).
        self.held = 0

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)

    def partition(self, mode: str) -> None:
        self.mode = mode
        self._healed.clear()
        if mode == "reset":
            for writer in list(self._writers):
                writer.transport.abort()

    def heal(self) -> None:
        self.mode = None
        self._healed.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.mode == "reset":
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        for source, sink, outbound in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pump(source, sink, (writer, up_writer), outbound))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        outbound: bool,
    ) -> None:
        try:
            while data := await source.read(65536):
                if outbound and not self._healed.is_set():
                    self.held += 1
                await self._healed.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in pair:
                writer.transport.abort()
                self._writers.discard(writer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_partition_heals(
    tmp_path: Path, registry: RegistryProcess, seed: int, mode: str
) -> None:
    """A partition between sender and receiver: sends queue, and all arrive after heal.

    The receiver listens on a private port and announces the proxy's
    address (a record it signs itself; see ``agent_driver --advertise``), so
    the sender's only path to it is through the proxy in this process.
    """
    total, rng = 100, schedule(seed)
    cut_at = rng.randrange(15, 40)
    listen_port, proxy_port = free_port(), free_port()
    proxy = PartitionProxy(listen_port)
    await proxy.start(proxy_port)
    deadline = time.monotonic() + SCENARIO_DEADLINE
    try:
        async with agents(
            tmp_path,
            registry,
            count=total,
            interval=0.02,
            receiver_listen=f"127.0.0.1:{listen_port}",
            receiver_extra=("--advertise", f"127.0.0.1:{proxy_port}"),
        ) as (sender, receiver):
            await until(lambda: len(receiver.records()) >= cut_at, deadline, "the session")
            assert proxy.connections >= 1, "the sender did not come through the proxy"
            proxy.partition(mode)
            # Settle: anything already past the proxy lands now.
            await asyncio.sleep(0.3)
            during = len(receiver.records())
            sent_before = len(sender.records())
            await asyncio.sleep(3.0)
            queued_during = len(sender.records()) - sent_before
            assert len(receiver.records()) == during, "messages crossed the partition"
            proxy.heal()
            healed_at = time.monotonic()
            await finish(sender, receiver, deadline)
            heal_seconds = time.monotonic() - healed_at
            counts = count(sender, receiver)
    finally:
        await proxy.close()
    report(
        f"partition-{mode}",
        seed,
        counts,
        cut_after=cut_at,
        accepted_during_partition=queued_during,
        drained_seconds_after_heal=round(heal_seconds, 2),
    )
    assert queued_during > 0
    check(counts, total)


async def test_delivery_resumes_promptly_after_a_reset_mid_flight(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """A connection cut while a message awaits its ACK: delivery resumes within seconds.

    The proxy first holds traffic (so a message is surely in flight, its
    frame held), then resets every connection and accepts new ones at once.
    The sender's link closes immediately; with ``reconnect_interval=1`` the
    message should be re-sent on a new connection within about a second.
    (Found by this suite: the ACK wait used to ignore the closed link and
    stall delivery for the whole 10 s ACK timeout.)
    """
    listen_port, proxy_port = free_port(), free_port()
    proxy = PartitionProxy(listen_port)
    await proxy.start(proxy_port)
    deadline = time.monotonic() + SCENARIO_DEADLINE
    try:
        async with agents(
            tmp_path,
            registry,
            count=40,
            interval=0.02,
            receiver_listen=f"127.0.0.1:{listen_port}",
            receiver_extra=("--advertise", f"127.0.0.1:{proxy_port}"),
        ) as (sender, receiver):
            await until(lambda: len(receiver.records()) >= 10, deadline, "the session")
            proxy.partition("blackhole")
            await until(lambda: proxy.held > 0, deadline, "a frame held in flight")
            before, sent = len(receiver.records()), len(sender.records())
            proxy.partition("reset")
            proxy.heal()
            cut = time.monotonic()
            with contextlib.suppress(AssertionError):
                await until(lambda: len(receiver.records()) > before, cut + 8, "a delivery")
            resumed = time.monotonic() - cut
            print(f"\nSCENARIO reset-mid-flight resumed_after_s={resumed:.2f} sent_before={sent}")
            assert resumed < 4.0, f"delivery resumed {resumed:.1f} s after the reset"
            await finish(sender, receiver, deadline)
            check(count(sender, receiver), 40)
    finally:
        await proxy.close()
