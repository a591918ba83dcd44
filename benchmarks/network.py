"""Networked agents on loopback: throughput, request/response RTT, session establishment.

Run with ``python -m benchmarks.network [--quick] [--json PATH]``. Prints a
table and a short profile, and writes JSON (default
``benchmarks/results/network.json``).

Two agents in two OS processes, a real registry in a third, the full path:
every message is encrypted with the Double Ratchet, signed, checked
(signature, replay, clock skew) and committed on receipt together with its
audit entry (LMDB, fsync), acknowledged with a signed ACK, and removed from
the sender's durable outbox with another audited commit. ``accept_policy``
is ``"open"`` (no capability checks), as capability verification has its own
suite.

- **Throughput**: this process (alice) sends 10,000 messages of 100 bytes
  (``--quick``: 500) to bob, keeping up to 256 ``send`` calls outstanding;
  the figure is messages per second until the last one is acknowledged.
  Bob's application consumes at least once: ``receive(auto_ack=False)``,
  then one ``acknowledge(...)`` commit for what it processed whenever its
  inbox runs dry (or every 256 messages).
- **RTT**: alice sends a request, bob's application receives it and sends
  a response, alice's application receives that: 1,000 round trips
  (``--quick``: 100), p50 and p99.
- **Session establishment**: a fresh agent fetches bob's key log and
  prekey bundle from the registry and runs X3DH (``establish_session``),
  then its first message (the X3DH initial message, for which bob fetches
  the new agent's key log) is delivered and acknowledged.

The crypto floor is measured in this process in the same run: one Ed25519
signature, one verification and two AES-GCM operations on 100 bytes, the
least any signed, encrypted, decrypted message costs. Each figure is also
given as a ratio to it. The round-trip floor is four durable LMDB commits
in series (measured on the same disk, with Talos's sync settings) plus two
messages' crypto: a request/response that is durable on both sides cannot
be faster. The stack floor (:mod:`benchmarks.stack_floor`) is measured in
the same run too: the same round trip with only what the rules require, on
the same libraries and disk, with three kinds of commit and, for Talos's
commits, Talos's envelopes as the frames too (``stack_rtt_p50_*``).
A final profiling pass (not timed) runs cProfile on
both sides while alice sends messages, and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb

from talos.client import TalosClient
from talos.core.crypto import SigningKey, aead_decrypt, aead_encrypt
from talos.core.message import Message
from talos.testing import SeededRng
from talos.testing.processes import RegistryProcess, start_registry

from . import commits, stack_floor
from .core import measure
from .profiling import breakdown, commit_summary, top_entries
from .profiling import render as render_breakdown

RESULTS = Path(__file__).resolve().parent / "results"
CHECKOUT = Path(__file__).resolve().parents[1]
PAYLOAD = b"m" * 100
WINDOW = 256
ACK_BATCH = 256


@dataclass
class Result:
    name: str
    value: float
    unit: str
    per_message_us: float
    ratio: float | None
    target: str | None
    met: bool | None
    note: str


# -- the crypto floor -----------------------------------------------------------------


def crypto_floor(seconds: float, repeats: int) -> dict[str, float]:
    """µs per call of the primitives every message needs, and their per-message sum."""
    rng = SeededRng(2026)
    signer = SigningKey.generate(rng)
    signature = signer.sign(PAYLOAD)
    key, nonce = rng.bytes(32), rng.bytes(12)
    sealed = aead_encrypt(key, nonce, PAYLOAD, b"ad")
    parts = {
        "ed25519_sign": measure(lambda: signer.sign(PAYLOAD), seconds=seconds, repeats=repeats),
        "ed25519_verify": measure(
            lambda: signer.public_key.verify(signature, PAYLOAD), seconds=seconds, repeats=repeats
        ),
        "aes_gcm_encrypt_100B": measure(
            lambda: aead_encrypt(key, nonce, PAYLOAD, b"ad"), seconds=seconds, repeats=repeats
        ),
        "aes_gcm_decrypt_100B": measure(
            lambda: aead_decrypt(key, nonce, sealed, b"ad"), seconds=seconds, repeats=repeats
        ),
    }
    parts["per_message"] = (
        parts["ed25519_sign"]
        + parts["ed25519_verify"]
        + parts["aes_gcm_encrypt_100B"]
        + parts["aes_gcm_decrypt_100B"]
    )
    return parts


def durable_commit_us(directory: Path, count: int) -> float:
    """Median µs of one small durable LMDB commit (sync and metasync, as Talos opens
    its stores) in ``directory``, i.e. on the disk the agents use."""
    env = lmdb.open(str(directory), map_size=64 << 20, sync=True, metasync=True)
    try:
        times = []
        for n in range(count):
            start = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(n.to_bytes(8, "big"), PAYLOAD * 3)
            times.append((time.perf_counter() - start) * 1e6)
    finally:
        env.close()
    return statistics.median(times)


# -- bob: the other process -----------------------------------------------------------


async def worker(home: Path, registry: str) -> None:
    """Bob: answers ``{"ping": n}`` with ``{"pong": n}``; ``{"ctl": ...}`` drives profiling."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    profiler: cProfile.Profile | None = None
    commits.install()
    async with TalosClient.create(
        "bob", home=home, registry_url=registry, accept_policy="open", queue_limit=100_000
    ) as bob:
        print(f"ready {bob.agent_id}", flush=True)
        # At least once: process, then acknowledge what was processed in one commit
        # whenever the inbox runs dry (or every ACK_BATCH messages).
        processed: list[Message] = []
        while not stop.is_set():
            message = await bob.receive(timeout=0 if processed else 0.2, auto_ack=False)
            if message is None or len(processed) >= ACK_BATCH:
                await bob.acknowledge(*processed)
                processed.clear()
            if message is None:
                continue
            processed.append(message)
            if not isinstance(message.data, dict):
                continue
            data = message.data
            if "ping" in data:
                await bob.send(message.sender, {"pong": data["ping"]}, timeout=30)
            elif data.get("ctl") == "profile-start":
                profiler = cProfile.Profile()
                profiler.enable()
            elif data.get("ctl") == "commits-reset":
                commits.RECORDER.reset(record=bool(data["record"]))
                await bob.send(message.sender, {"ctl": "done"}, timeout=30)
            elif data.get("ctl") == "commits-report":
                commits.dump(str(data["path"]), int(data["n"]))
                await bob.send(message.sender, {"ctl": "done"}, timeout=30)
            elif data.get("ctl") == "profile-stop" and profiler is not None:
                profiler.disable()
                profiler.dump_stats(str(data["path"]))
                profiler = None
                await bob.send(message.sender, {"ctl": "profile-written"}, timeout=30)


# -- alice: this process ---------------------------------------------------------------


async def start_bob(home: Path, registry: str) -> tuple[asyncio.subprocess.Process, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALOS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.network",
        "--worker",
        str(home),
        "--registry",
        registry,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=CHECKOUT,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line.startswith(b"ready "):
        process.kill()
        await process.wait()
        raise RuntimeError(f"bob did not start: {line!r}")
    return process, line.split()[1].decode()


async def wait_drained(client: TalosClient, within: float) -> None:
    deadline = time.monotonic() + within
    while client.queue_depth():  # noqa: ASYNC110 -- the client has no drain event
        if time.monotonic() > deadline:
            raise RuntimeError(f"{client.queue_depth()} messages still queued")
        await asyncio.sleep(0.001)


async def throughput(alice: TalosClient, bob: str, count: int) -> float:
    """Messages per second from the first ``send`` to the last ACK."""
    gate = asyncio.Semaphore(WINDOW)

    async def one() -> None:
        async with gate:
            await alice.send(bob, PAYLOAD, timeout=120)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    await wait_drained(alice, 120)
    return count / (time.perf_counter() - start)


async def round_trips(alice: TalosClient, bob: str, count: int) -> list[float]:
    """Request → bob's application → response → alice's application, in µs."""
    times = []
    for n in range(count):
        start = time.perf_counter()
        await alice.send(bob, {"ping": n}, timeout=30)
        answer = await alice.receive(timeout=30)
        times.append((time.perf_counter() - start) * 1e6)
        assert answer is not None
        assert answer.data == {"pong": n}, answer
    return times


async def establishments(root: Path, registry: str, bob: str, count: int) -> list[dict[str, float]]:
    """Fresh agents: registry fetch + X3DH, then the first message delivered, in µs."""
    rows = []
    for n in range(count):
        async with TalosClient.create(
            f"carol{n}", home=root / f"carol{n}", registry_url=registry, accept_policy="open"
        ) as carol:
            start = time.perf_counter()
            await carol.establish_session(bob)
            established = time.perf_counter()
            sent = await carol.send(bob, PAYLOAD, timeout=30)
            delivered = time.perf_counter()
            assert sent.status == "delivered"
            rows.append(
                {
                    "establish": (established - start) * 1e6,
                    "first_message": (delivered - established) * 1e6,
                    "total": (delivered - start) * 1e6,
                }
            )
    return rows


async def commits_phase(
    alice: TalosClient, bob: str, directory: Path, messages: int, run: Any, *, record: bool
) -> dict[str, dict[str, Any]]:
    """Each process's CPU time per message while ``run()`` runs (``time.process_time``,
    all threads, no profiler) and, if ``record``, the pages of each durable commit
    (which costs two ``/proc`` reads per commit, so CPU is measured without it too)."""
    await control(alice, bob, {"ctl": "commits-reset", "record": record})
    commits.RECORDER.reset(record=record)
    await run()
    mine = commits.RECORDER.report(messages)
    path = directory / "bob-commits.json"
    await control(alice, bob, {"ctl": "commits-report", "path": str(path), "n": messages})
    return {"sender (alice)": mine, "receiver (bob)": json.loads(path.read_text())}


async def control(alice: TalosClient, bob: str, data: dict[str, Any]) -> None:
    await alice.send(bob, data, timeout=30)
    answer = await alice.receive(timeout=60)
    assert answer is not None
    assert answer.data == {"ctl": "done"}, answer


async def profile_pass(
    alice: TalosClient, bob: str, count: int, directory: Path, run: Any, phase: str
) -> dict[str, dict[str, Any]]:
    """cProfile both sides while ``run()`` sends ``count`` messages (not timed)."""
    bob_stats = directory / "bob.pstats"
    await alice.send(bob, {"ctl": "profile-start"}, timeout=30)
    profiler = cProfile.Profile()
    profiler.enable()
    await run()
    profiler.disable()
    await alice.send(bob, {"ctl": "profile-stop", "path": str(bob_stats)}, timeout=30)
    answer = await alice.receive(timeout=60)
    assert answer is not None
    assert answer.data == {"ctl": "profile-written"}, answer
    sides = {
        f"{phase}, sender (alice)": pstats.Stats(profiler, stream=io.StringIO()),
        f"{phase}, receiver (bob)": pstats.Stats(str(bob_stats), stream=io.StringIO()),
    }
    return {
        side: {
            "messages": count,
            **commit_summary(stats, count),
            "breakdown": breakdown(stats, count),
            "top": top_entries(stats, 12),
        }
        for side, stats in sides.items()
    }


async def bench(
    registry: RegistryProcess, root: Path, *, quick: bool
) -> tuple[list[Result], dict[str, dict[str, Any]], dict[str, Any]]:
    floors = crypto_floor(*((0.05, 2) if quick else (0.5, 5)))
    floor = floors["per_message"]
    commit = durable_commit_us(root / "commit-floor", 50 if quick else 300)
    floor_pages = commits.one_record_floor(root / "pages-floor", 50 if quick else 300)
    # A round trip, durable on both sides, crosses at least four commits in series
    # (request queued, received; response queued, received) and two messages' crypto.
    rtt_floor = 4 * commit + 2 * floor
    messages, trips, sessions, profiled = (
        (500, 100, 5, 300) if quick else (10_000, 1_000, 15, 2_000)
    )
    # The same round trip with only what the rules require, on the same stack and disk.
    stack = {
        store + ("_wire" if wire else ""): await stack_floor.round_trips(
            root / f"stack-floor-{store}-{wire}", trips, store=store, wire=wire
        )
        for store, wire in stack_floor.VARIANTS
    }
    process, bob = await start_bob(root / "bob", registry.url)
    commits.install()
    pages: dict[str, Any] = {"floor": {"this process": {"commits": {"one record": floor_pages}}}}
    try:
        async with TalosClient.create(
            "alice",
            home=root / "alice",
            registry_url=registry.url,
            accept_policy="open",
            queue_limit=100_000,
        ) as alice:
            await round_trips(alice, bob, 20)  # warm up: session, links, caches
            rate = await throughput(alice, bob, messages)
            rtts = await round_trips(alice, bob, trips)
            for record in (False, True):
                suffix = ", pages recorded" if record else ""
                pages[f"throughput (batched){suffix}"] = await commits_phase(
                    alice,
                    bob,
                    root,
                    messages // 4,
                    lambda: throughput(alice, bob, messages // 4),
                    record=record,
                )
                pages[f"round trips (one message each){suffix}"] = await commits_phase(
                    alice,
                    bob,
                    root,
                    trips // 4,
                    lambda: round_trips(alice, bob, trips // 4),
                    record=record,
                )
            setup = await establishments(root, registry.url, bob, sessions)
            profile = await profile_pass(
                alice, bob, profiled, root, lambda: throughput(alice, bob, profiled), "throughput"
            )
            profile |= await profile_pass(
                alice, bob, trips // 4, root, lambda: round_trips(alice, bob, trips // 4), "RTT"
            )
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
    cuts = statistics.quantiles(rtts, n=100)
    p50, p99 = statistics.median(rtts), cuts[98]
    results = [
        Result(name, us, "µs", us, None, None, None, "crypto floor")
        for name, us in floors.items()
        if name != "per_message"
    ]
    results.append(
        Result(
            "floor_per_message",
            floor,
            "µs",
            floor,
            1.0,
            None,
            None,
            "Ed25519 sign + verify + 2× AES-GCM (100 B)",
        )
    )
    results.append(
        Result("durable_commit", commit, "µs", commit, None, None, None, "LMDB sync commit, p50")
    )
    results.append(
        Result(
            "rtt_floor",
            rtt_floor,
            "µs",
            rtt_floor,
            rtt_floor / floor,
            None,
            None,
            "4 durable commits in series + 2 messages' crypto",
        )
    )
    per_message = 1e6 / rate
    results.append(
        Result(
            f"throughput_{messages}x100B",
            rate,
            "msg/s",
            per_message,
            per_message / floor,
            "≥ 5,000 msg/s, ≤ 3× floor",
            rate >= 5000 and per_message <= 3 * floor,
            f"one-way, acked, {WINDOW} sends outstanding; floor allows {1e6 / floor:,.0f} msg/s",
        )
    )
    # Issue 19's targets: against the round-trip floor measured in this run.
    for name, value, times in (("rtt_p50", p50, 3), ("rtt_p99", p99, 6)):
        results.append(
            Result(
                name,
                value,
                "µs",
                value,
                value / floor,
                f"≤ {times}× rtt_floor",
                value <= times * rtt_floor,
                f"request + response through both applications, {trips} round trips; "
                f"{value / rtt_floor:.1f}× the round-trip floor",
            )
        )
    for store, samples in stack.items():
        value = statistics.median(samples)
        results.append(
            Result(
                f"stack_rtt_p50_{store}",
                value,
                "µs",
                value,
                value / floor,
                None,
                None,
                f"benchmarks.stack_floor --store {store.removesuffix('_wire')}"
                f"{' --wire' if store.endswith('_wire') else ''}: "
                f"{value / rtt_floor:.2f}× the round-trip floor; "
                f"rtt_p50 is {p50 / value:.2f}× this",
            )
        )
    limits = {"establish": 3000.0, "first_message": 6000.0}
    for part in ("establish", "first_message", "total"):
        value = statistics.median(row[part] for row in setup)
        limit = limits.get(part)
        results.append(
            Result(
                f"session_{part}_p50",
                value,
                "µs",
                value,
                value / floor,
                None if limit is None else f"≤ {limit / 1000:g} ms",
                None if limit is None else value <= limit,
                {
                    "establish": "one /contact request (key log, bundle, record), X3DH, persist",
                    "first_message": "initial message delivered (bob fetches the key log)",
                    "total": f"median of {sessions} fresh agents",
                }[part],
            )
        )
    return results, profile, pages


def render(results: list[Result], profile: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'benchmark':30} {'value':>14} {'µs/msg':>10} {'× floor':>9}  target"]
    for r in results:
        ratio = f"{r.ratio:8.1f}×" if r.ratio is not None else " " * 9
        value = f"{r.value:,.1f} {r.unit}"
        target = "" if r.target is None else f"{r.target} {'ok' if r.met else 'MISSED'}"
        lines.append(f"{r.name:30} {value:>14} {r.per_message_us:10.1f} {ratio}  {target}")
    for side, summary in profile.items():
        lines.append(
            f"\nprofile, {side}, {summary['messages']} messages: "
            f"{summary['commits_per_message']} LMDB commits (fsync) per message on the "
            "event-loop thread (ACK removals commit in a worker thread), "
            f"{summary['mean_commit_us']:.0f} µs each, {summary['share']:.0%} of the time"
        )
        lines.append(render_breakdown(side, summary["breakdown"]))
        lines.append(f"  {'share':>6} {'own s':>8} {'calls':>9}  function")
        for row in summary["top"]:
            lines.append(
                f"  {row['share']:6.1%} {row['tottime_s']:8.3f} {row['calls']:9}  {row['function']}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="500 messages, 100 round trips")
    parser.add_argument("--json", type=Path, default=RESULTS / "network.json")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--registry", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker(args.worker, args.registry))
        return
    with tempfile.TemporaryDirectory(prefix="talos-bench-") as tmp:
        root = Path(tmp)
        registry = start_registry(root / "registry.db", root / "registry.log")
        try:
            results, profile, pages = asyncio.run(bench(registry, root, quick=args.quick))
        finally:
            registry.stop()
    print(render(results, profile))
    print(commits.render(pages))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "suite": "network",
                "quick": args.quick,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "processor_count": os.cpu_count(),
                "results": [asdict(r) for r in results],
                "profile": profile,
                "pages_per_commit": pages,
            },
            indent=2,
        )
    )
    print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
