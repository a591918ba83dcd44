"""kill -9 during two-way traffic: exactly once, in order per sender.

A real registry and two agents, A and B, each a separate OS process running
``tests/integration/soak_driver.py`` with a real LMDB home: A sends
``"A:0"`` .. to B while B sends ``"B:0"`` .. to A, up to eight ``send()``
calls in flight each, while each reads (``receive(auto_ack=False)``,
journal, ``acknowledge``) what the other sends. At random moments (from a
seeded ``random.Random``) one of them, or both at once, is killed with
SIGKILL, stays down a random while and is restarted on the same home (on a
new port: the peer finds it again through the registry). The drivers keep
sending across their own restarts from their audit log (see the driver).

Afterwards :func:`soak_check.judge` checks each direction against the
sender's audit log: every committed message read exactly once, in commit
order, every returned send among them, re-reads only where
``auto_ack=False`` allows one (see docs/soak.md for the exact rules).

The short run is part of the normal suite; the long one (``make soak``,
marker ``soak``) sends 10,000 messages through ten kills of each agent. The
seed is printed; ``TALOS_SOAK_SEED=N`` replays a run's kill schedule.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agent_driver import read_records
from soak_check import Verdict, judge
from soak_driver import committed_sends

from talos.client import TalosClient
from talos.testing.child import ChildProcess, spawn
from talos.testing.cli import clean_env
from talos.testing.processes import RegistryProcess, registry_process

DRIVER = Path(__file__).with_name("soak_driver.py")
READY_TIMEOUT = 30.0


class SoakAgent:
    """One soak driver process; restartable on the same home and journal."""

    def __init__(self, name: str, directory: Path, registry: RegistryProcess, count: int) -> None:
        self.name, self.registry, self.count = name, registry, count
        self.home = directory / name
        self.out = directory / f"{name}.jsonl"
        self.log = directory / f"{name}.log"
        self.peer_file = directory / f"{name}.peer"
        self.child: ChildProcess | None = None
        self.agent_id = ""
        self.starts: list[float] = []  # when each start was ready (wall time)
        self.kills: list[float] = []

    async def start(self) -> str:
        command = [
            sys.executable,
            str(DRIVER),
            *("--home", str(self.home), "--registry", self.registry.url),
            *("--name", self.name, "--peer-file", str(self.peer_file)),
            *("--count", str(self.count), "--out", str(self.out)),
        ]
        with self.log.open("ab") as log:
            log.write(f"--- start {len(self.starts)} at {time.time():.3f}\n".encode())
        self.child = spawn(command, env=clean_env(), log=self.log, name=self.name)
        line = await asyncio.to_thread(self.child.read_line, READY_TIMEOUT)
        if not line.startswith("ready "):
            await self.kill()
            raise AssertionError(f"{self.name} did not start: {line!r}\n{self.log_tail()}")
        self.starts.append(time.time())
        self.agent_id = line.split()[1]
        return self.agent_id

    async def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.child is not None and self.child.running:
            self.child.signal(signal.SIGKILL)
            self.kills.append(time.time())
            await asyncio.to_thread(self.child.finish, READY_TIMEOUT)

    async def stop(self) -> int:
        """SIGTERM and wait: the driver closes its client cleanly."""
        assert self.child is not None
        return await asyncio.to_thread(self.child.stop, READY_TIMEOUT)

    def fresh_reads(self) -> int:
        return self.out.read_bytes().count(b'"fresh": true') if self.out.exists() else 0

    def finished(self) -> bool:
        """Whether the current start journaled ``finished``."""
        if not self.out.exists():
            return False
        raw = self.out.read_bytes()
        return raw.rfind(b'"kind": "finished"') > raw.rfind(b'"kind": "start"')

    def records(self) -> list[dict[str, Any]]:
        """The journal (read once the driver has stopped: a torn last line is cut off)."""
        return read_records(self.out)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Plan:
    """How much traffic, and which kills: each event names the agents killed at once."""

    count: int  # messages each way
    events: list[tuple[str, ...]]
    deadline: float  # seconds for the whole run


@dataclass
class Outcome:
    seed: int
    seconds: float
    verdicts: list[Verdict]
    kills: dict[str, int]
    figures: dict[str, Any] = field(default_factory=dict)


async def until(predicate: Any, deadline: float, what: str, agents: list[SoakAgent]) -> None:
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"== {a.name}\n{a.log_tail()}" for a in agents)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        await asyncio.sleep(0.02)


def first_read(reads: list[dict[str, Any]], sender: str, since: float) -> float | None:
    """When the first message from ``sender`` was read at ``since`` or later."""
    return min((r["t"] for r in reads if r["sender"] == sender and r["t"] >= since), default=None)


def longest(spans: list[tuple[float, float | None]]) -> float:
    """The longest of the ``(start, end)`` spans that ended, in seconds."""
    return round(max((end - start for start, end in spans if end is not None), default=0.0), 3)


async def soak(tmp_path: Path, seed: int, plan: Plan) -> Outcome:
    print(f"\nSOAK seed={seed} (replay: TALOS_SOAK_SEED={seed})")  # shown with a failure
    rng = random.Random(seed)  # noqa: S311 -- kill moments, not secrets
    total = 2 * plan.count
    # Kills after that many messages were read in all; the first one early, while
    # the sessions are being opened.
    thresholds = sorted(
        [rng.uniform(0, 0.01) * total, *(rng.uniform(0, 0.85) * total for _ in plan.events[1:])]
    )
    events = list(plan.events)
    rng.shuffle(events)
    with registry_process(tmp_path / "registry") as registry:
        a = SoakAgent("A", tmp_path, registry, plan.count)
        b = SoakAgent("B", tmp_path, registry, plan.count)
        agents, by_name = [a, b], {"A": a, "B": b}
        began = time.monotonic()
        deadline = began + plan.deadline
        try:
            a_id, b_id = await a.start(), await b.start()
            a.peer_file.write_text(b_id)
            b.peer_file.write_text(a_id)
            downtimes: list[tuple[str, float, float]] = []  # (agent, kill, ready)
            for threshold, victims in zip(thresholds, events, strict=True):
                await until(
                    lambda t=threshold: a.fresh_reads() + b.fresh_reads() >= t,
                    deadline,
                    f"{threshold:.0f} messages read",
                    agents,
                )
                await asyncio.sleep(rng.uniform(0, 0.02))
                for name in victims:
                    await by_name[name].kill()
                await asyncio.sleep(rng.uniform(0, 0.4))
                for name in victims:
                    await by_name[name].start()
                    downtimes.append((name, by_name[name].kills[-1], by_name[name].starts[-1]))
            await until(
                lambda: a.finished() and b.finished(), deadline, "both agents finished", agents
            )
            seconds = time.monotonic() - began
            for agent in agents:
                assert await agent.stop() == 0, agent.log_tail()
        finally:
            for agent in agents:
                await agent.kill()
    records = {agent.name: agent.records() for agent in agents}
    ids = {"A": a_id, "B": b_id}
    verdicts = []
    for sender, receiver in (("A", "B"), ("B", "A")):
        committed = committed_sends(by_name[sender].home, sender, plan.count)
        verdicts.append(
            judge(sender, ids[sender], plan.count, committed, records[sender], records[receiver])
        )
    reads = {name: [r for r in records[name] if r["kind"] == "read"] for name in records}
    # After each restart: when did the agent's messages reach its peer again, and when
    # did it read again (from its kill, and from its being ready again)?
    sending, reading = [], []
    for name, kill, ready in downtimes:
        other = "B" if name == "A" else "A"
        sending.append((kill, ready, first_read(reads[other], ids[name], ready)))
        reading.append((kill, ready, first_read(reads[name], ids[other], ready)))
    figures = {
        "messages": total,
        "messages_per_s": round(total / seconds, 1),
        "max_kill_to_ready_s": longest([(k, r) for _, k, r in downtimes]),
        "max_kill_to_sending_again_s": longest([(k, t) for k, _, t in sending]),
        "max_kill_to_reading_again_s": longest([(k, t) for k, _, t in reading]),
        "max_ready_to_sending_again_s": longest([(r, t) for _, r, t in sending]),
        "max_ready_to_reading_again_s": longest([(r, t) for _, r, t in reading]),
    }
    kills = {agent.name: len(agent.kills) for agent in agents}
    return Outcome(seed, round(seconds, 1), verdicts, kills, figures)


def report_and_check(name: str, outcome: Outcome, plan: Plan) -> None:
    print(
        f"\nSOAK {name} seed={outcome.seed} seconds={outcome.seconds} kills={outcome.kills} "
        f"{json.dumps(outcome.figures)}"
    )
    for verdict in outcome.verdicts:
        print(f"SOAK {name} {json.dumps(verdict.__dict__)}")
    for verdict in outcome.verdicts:
        assert verdict.problems == [], f"seed {outcome.seed}: {verdict}"
        assert verdict.delivered == plan.count, verdict
    wanted = {n: sum(n in event for event in plan.events) for n in ("A", "B")}
    assert outcome.kills == wanted


def soak_seed() -> int:
    return int(os.environ.get("TALOS_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))


@pytest.mark.slow
@pytest.mark.asyncio
async def test_kill_9_during_two_way_traffic(tmp_path: Path) -> None:
    """600 messages, two kills of each agent (one of them both at once)."""
    plan = Plan(count=300, events=[("A",), ("B",), ("A", "B")], deadline=90.0)
    report_and_check("short", await soak(tmp_path, soak_seed(), plan), plan)


@pytest.mark.soak
@pytest.mark.asyncio
async def test_kill_9_soak_long(tmp_path: Path) -> None:
    """10,000 messages, ten kills of each agent (two of them both at once); more with
    ``TALOS_SOAK_MESSAGES`` (in all) and ``TALOS_SOAK_KILLS`` (of each agent)."""
    messages = int(os.environ.get("TALOS_SOAK_MESSAGES") or 10_000)
    kills = int(os.environ.get("TALOS_SOAK_KILLS") or 10)
    assert messages >= 5000, "the long soak sends 5,000 messages or more"
    assert kills >= 4, "the long soak kills each agent 4 times or more"
    events = [("A",)] * (kills - 2) + [("B",)] * (kills - 2) + [("A", "B")] * 2
    plan = Plan(count=messages // 2, events=events, deadline=300.0 + messages / 10)
    report_and_check("long", await soak(tmp_path, soak_seed(), plan), plan)


# -- found by the soak ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_sends_to_a_new_peer_are_queued_in_call_order(tmp_path: Path) -> None:
    """send() calls made at once to a peer whose key log is not cached yet are
    delivered in the order of the calls.

    Each call fetched the key log from the registry before queueing, and the
    fetches came back in any order: the soak saw ``A:0, A:1, A:3, A:4, A:2``
    committed (and so delivered) in that order. Now each call queues after the
    one before it to the same peer.
    """
    with registry_process(tmp_path / "registry") as registry:
        async with (
            TalosClient.create(
                "bob", home=tmp_path / "b", registry_url=registry.url, accept_policy="open"
            ) as bob,
            TalosClient.create("alice", home=tmp_path / "a", registry_url=registry.url) as alice,
        ):
            calls = [alice.send(bob.agent_id, n, timeout=20) for n in range(40)]
            results = await asyncio.gather(*calls)
            assert {r.status for r in results} == {"delivered"}
            got = [await bob.receive(timeout=10) for _ in range(40)]
    assert [m.data for m in got if m is not None] == list(range(40))


# -- the checker itself: it must see each kind of failure ---------------------------------------


def _direction(
    order: list[int],
) -> tuple[list[tuple[int, str]], list[dict[str, Any]], list[dict[str, Any]]]:
    """A's audit log (commit order 0..3), A's journal and B's reads of ``order`` (by number)."""
    committed = [(n, f"id{n}") for n in range(4)]
    sender = [{"kind": "start"}]
    sender += [{"kind": "call", "n": n} for n in range(4)]
    sender += [{"kind": "sent", "n": n, "id": f"id{n}"} for n in range(4)]
    receiver: list[dict[str, Any]] = [{"kind": "start"}]
    for n in order:
        if n < 0:
            receiver.append({"kind": "start"})
        else:
            receiver.append({"kind": "read", "sender": "a", "id": f"id{n}", "data": f"A:{n}"})
    return committed, sender, receiver


@pytest.mark.parametrize(
    ("order", "problem"),
    [
        ([0, 1, 2, 3], None),
        ([0, 1, 2, -1, 2, 3], None),  # killed before acknowledging 2: read again, first
        ([0, 1, 3], "lost"),
        ([0, 2, 1, 3], "out of order"),
        ([0, 1, 2, 3, 1], "read again"),
        ([0, 1, 2, -1, 3, 2], "read again"),
    ],
)
def test_the_checker_sees_loss_reordering_and_repeats(
    order: list[int], problem: str | None
) -> None:
    committed, sender, receiver = _direction(order)
    verdict = judge("A", "a", 4, committed, sender, receiver)
    if problem is None:
        assert verdict.problems == []
        assert verdict.delivered == 4
    else:
        assert any(problem in p for p in verdict.problems), verdict.problems


def test_the_checker_sees_a_message_twice_and_an_undurable_send() -> None:
    committed, sender, receiver = _direction([0, 1, 2, 3])
    committed.append((2, "again"))  # the driver sent 2 a second time
    receiver.append({"kind": "read", "sender": "a", "id": "again", "data": "A:2"})
    sender.append({"kind": "sent", "n": 3, "id": "other"})  # returned, but not what was committed
    problems = judge("A", "a", 4, committed, sender, receiver).problems
    assert any("committed twice" in p for p in problems), problems
    assert any("delivered twice" in p for p in problems), problems
    assert any("not in the audit log" in p for p in problems), problems


def test_the_checker_sees_sends_queued_out_of_call_order() -> None:
    committed, sender, receiver = _direction([0, 2, 1, 3])
    committed[1], committed[2] = committed[2], committed[1]  # delivered as committed
    problems = judge("A", "a", 4, committed, sender, receiver).problems
    assert problems == ["queued out of call order at send 1: ['A:2', 'A:1', 'A:3']"]
