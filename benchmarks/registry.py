"""Registry throughput: bundle fetches and announcements per second, SQLite vs PostgreSQL.

Run with ``python -m benchmarks.registry [--quick] [--json PATH]``. Prints a
table and writes JSON (default ``benchmarks/results/registry.json``).

Three deployments, measured side by side in one run on one machine, each
over real ``talos registry serve`` processes and loopback HTTP:

* ``sqlite``: one process, its SQLite file (WAL, ``synchronous=FULL``);
* ``postgres x1``: one process on a PostgreSQL cluster of its own (a
  throwaway one, fsync on, like SQLite's);
* ``postgres x2``: two processes on that cluster, requests alternating.

Each deployment gets fresh agents that uploaded their key logs and prekeys
(enough one-time prekeys that no bundle comes without one), then:

* **bundle**: ``GET /v1/agents/{id}/bundle``, each consuming a one-time
  prekey (a write: delete it, remember it used), spread over the agents;
* **announce**: ``PUT /v1/agents/{id}/record`` of pre-signed records, each
  task owning its agents so that sequences rise (no refusals).

``CONCURRENCY`` requests are in flight at once from one asyncio client in
this process. On a small machine the client, the registries and the
database share the cores, so the figures compare deployments with each
other; they are not capacity numbers for a real server.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.core import RESULTS, Result, write_results
from talos.core.identity import Identity
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.x3dh import PrekeyStore
from talos.testing import FakeClock, SeededRng
from talos.testing.postgres import PostgresCluster
from talos.testing.processes import RegistryProcess, start_registry

CBOR = {"content-type": "application/cbor"}
CONCURRENCY = 32
AGENTS = 64


@dataclass
class Workload:
    agents: list[Identity]
    uploads: list[PrekeyUpload]
    records: list[list[PeerRecord]]  # per agent, rising sequences


def workload(bundles: int, announcements: int) -> Workload:
    rng, clock = SeededRng(9), FakeClock(time.time())
    agents = [Identity.create(f"bench{n}", rng=rng, clock=clock) for n in range(AGENTS)]
    per_agent = bundles // AGENTS + 1
    uploads, records = [], []
    for agent in agents:
        store = PrekeyStore.create(
            agent_id=agent.agent_id,
            signing_key=agent.signing_key,
            identity_dh=agent.dh_key,
            rng=rng,
        ).add_one_time_prekeys(per_agent, rng)
        uploads.append(
            PrekeyUpload.from_store(store, agent.signing_key, key_sequence=0, sequence=1)
        )
        records.append(
            [
                PeerRecord.create(
                    agent.signing_key,
                    agent_id=agent.agent_id,
                    key_sequence=0,
                    instance_id=b"\x01" * 16,
                    endpoint="ws://10.0.0.1:7000",
                    sequence=s,
                    now=clock.time(),
                    lifetime=3600,
                )
                for s in range(1, announcements // AGENTS + 2)
            ]
        )
    return Workload(agents, uploads, records)


async def publish(http: httpx.AsyncClient, url: str, load: Workload) -> None:
    for agent, upload in zip(load.agents, load.uploads, strict=True):
        base = f"{url}/v1/agents/{agent.agent_id}"
        (
            await http.put(f"{base}/keylog", content=agent.keylog.to_bytes(), headers=CBOR)
        ).raise_for_status()
        (
            await http.put(f"{base}/prekeys", content=upload.to_bytes(), headers=CBOR)
        ).raise_for_status()


async def run_bundles(
    http: httpx.AsyncClient, urls: Sequence[str], load: Workload, count: int
) -> float:
    """Seconds to take ``count`` bundles, ``CONCURRENCY`` at a time."""

    async def task(t: int) -> None:
        for n in range(t, count, CONCURRENCY):
            agent = load.agents[n % AGENTS].agent_id
            answer = await http.get(f"{urls[n % len(urls)]}/v1/agents/{agent}/bundle")
            answer.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(task(t) for t in range(CONCURRENCY)))
    return time.perf_counter() - start


async def run_announcements(
    http: httpx.AsyncClient, urls: Sequence[str], load: Workload, count: int
) -> float:
    """Seconds to announce ``count`` records; task ``t`` owns agents ``t``, ``t + CONCURRENCY``…"""
    per_task = count // CONCURRENCY

    async def task(t: int) -> None:
        owned = list(range(t, AGENTS, CONCURRENCY))
        for n in range(per_task):
            agent = owned[n % len(owned)]
            record = load.records[agent][n // len(owned)]
            url = f"{urls[n % len(urls)]}/v1/agents/{record.agent_id}/record"
            (await http.put(url, content=record.to_bytes(), headers=CBOR)).raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(task(t) for t in range(CONCURRENCY)))
    return time.perf_counter() - start


async def measure(urls: Sequence[str], bundles: int, announcements: int) -> tuple[float, float]:
    load = workload(bundles, announcements)
    limits = httpx.Limits(
        max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY * 2
    )
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await publish(http, urls[0], load)
        bundle_s = await run_bundles(http, urls, load, bundles)
        announce_s = await run_announcements(http, urls, load, announcements)
    return bundles / bundle_s, (announcements // CONCURRENCY * CONCURRENCY) / announce_s


@contextmanager
def registries(database: Path | str, count: int, directory: Path) -> Iterator[list[str]]:
    extra = ("--no-access-log", "--log-level", "warning", "--one-time-prekeys-per-minute", "0")
    servers: list[RegistryProcess] = []
    try:
        for n in range(count):
            servers.append(start_registry(database, directory / f"r{n}.log", ready=60, extra=extra))
        yield [s.url for s in servers]
    finally:
        for server in servers:
            server.stop()


def run(bundles: int, announcements: int) -> list[Result]:
    results: list[Result] = []
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cluster = stack.enter_context(PostgresCluster.started(durable=True))
        deployments: list[tuple[str, Path | str, int]] = [
            ("sqlite", directory / "registry.db", 1),
            ("postgres x1", cluster.create_database("bench1"), 1),
            ("postgres x2", cluster.create_database("bench2"), 2),
        ]
        for name, database, replicas in deployments:
            with registries(database, replicas, directory) as urls:
                bundle_rate, announce_rate = asyncio.run(measure(urls, bundles, announcements))
            for kind, rate, count in (
                ("bundle", bundle_rate, bundles),
                ("announce", announce_rate, announcements),
            ):
                results.append(
                    Result(
                        name=f"{kind} / {name}",
                        unit_us=1e6 / rate,
                        floor=None,
                        ratio=None,
                        target_us=None,
                        note=f"{count} requests, {CONCURRENCY} in flight, {AGENTS} agents",
                    )
                )
    return results


def render(results: list[Result]) -> str:
    lines = [f"{'benchmark':28} {'requests/s':>12} {'µs/request':>12}"]
    lines += [f"{r.name:28} {1e6 / r.unit_us:12,.0f} {r.unit_us:12.0f}" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--json", type=Path, default=RESULTS / "registry.json")
    args = parser.parse_args()
    bundles, announcements = (320, 320) if args.quick else (2000, 2000)
    results = run(bundles, announcements)
    print(render(results))
    write_results(args.json, "registry", results)


if __name__ == "__main__":
    main()
