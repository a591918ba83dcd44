"""Two ``talos registry serve`` processes on one PostgreSQL database behave as one registry.

Each test gets a fresh database of the session's throwaway cluster
(``postgres_cluster`` in tests/conftest.py) and two replicas on it, reached
directly (no balancer): a client alternating between them sees one registry.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.core.identity import Identity
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.x3dh import PrekeyBundle, PrekeyStore
from talos.discovery import RegistryClient, RegistryRejected
from talos.registry.postgres.backend import AGENT_LOCK
from talos.registry.postgres.schema import SCHEMA_VERSION
from talos.system import SYSTEM_RNG
from talos.testing import FakeClock
from talos.testing.cli import TalosCli
from talos.testing.postgres import PostgresCluster
from talos.testing.processes import RegistryProcess, launched, start_registry
from talos.testing.waiting import wait_until

A, B = b"\x0a" * 16, b"\x0b" * 16


@dataclass
class Replicas:
    url: str  # the database
    servers: list[RegistryProcess]
    logs: list[Path]

    def counter(self, name: str) -> float:
        """``name`` summed over both replicas (a counter counts what its replica did)."""
        total = 0.0
        for server in self.servers:
            for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
                total += sum(s.value for s in family.samples if s.name == name)
        return total


def start_replicas(url: str, directory: Path, *extra: str) -> Replicas:
    directory.mkdir(parents=True, exist_ok=True)
    logs = [directory / f"replica{n}.log" for n in (1, 2)]
    with ThreadPoolExecutor(2) as pool:  # together, as replicas of one deployment start
        starting = [pool.submit(start_registry, url, log, ready=30, extra=extra) for log in logs]
    servers = [f.result() for f in starting if f.exception() is None]
    failed = [f.exception() for f in starting if f.exception() is not None]
    if failed:
        for server in servers:
            server.stop()
        raise failed[0]  # type: ignore[misc]
    return Replicas(url, servers, logs)


@pytest.fixture
def replicas(postgres_url: str, tmp_path: Path) -> Iterator[Replicas]:
    started = start_replicas(postgres_url, tmp_path, "--one-time-prekeys-per-minute", "0")
    try:
        yield started
    finally:
        for server in started.servers:
            server.stop()


@dataclass
class Agent:
    identity: Identity
    clock: FakeClock

    @classmethod
    def create(cls, name: str) -> Agent:
        clock = FakeClock(time.time())
        return cls(Identity.create(name, rng=SYSTEM_RNG, clock=clock), clock)

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id

    def prekeys(self, one_time: int) -> PrekeyUpload:
        store = PrekeyStore.create(
            agent_id=self.agent_id,
            signing_key=self.identity.signing_key,
            identity_dh=self.identity.dh_key,
            rng=SYSTEM_RNG,
        ).add_one_time_prekeys(one_time, SYSTEM_RNG)
        return PrekeyUpload.from_store(store, self.identity.signing_key, key_sequence=0, sequence=1)

    def record(self, instance: bytes, sequence: int) -> PeerRecord:
        return PeerRecord.create(
            self.identity.signing_key,
            agent_id=self.agent_id,
            key_sequence=self.identity.sequence,
            instance_id=instance,
            endpoint=f"ws://10.0.0.{instance[0]}:7000",
            sequence=sequence,
            now=self.clock.time(),
            lifetime=3600,
        )

    async def publish(self, url: str, one_time: int = 0) -> None:
        async with RegistryClient(url) as client:
            await client.publish_keylog(self.identity.keylog)
            if one_time:
                await client.publish_prekeys(self.prekeys(one_time))


@pytest.mark.asyncio
async def test_concurrent_bundles_through_both_replicas_hand_out_each_key_once(
    replicas: Replicas,
) -> None:
    agent = Agent.create("popular")
    await agent.publish(replicas.servers[0].url, one_time=60)
    urls = [s.url for s in replicas.servers]
    async with httpx.AsyncClient(timeout=30) as http:

        async def take(url: str) -> int | None:
            answer = await http.get(f"{url}/v1/agents/{agent.agent_id}/bundle")
            assert answer.status_code == 200, answer.text
            return PrekeyBundle.from_bytes(answer.content).one_time_prekey_id

        served = await asyncio.gather(*(take(urls[n % 2]) for n in range(80)))
        async with RegistryClient(urls[1]) as client:
            left = (await client.prekey_status(agent.agent_id)).one_time_prekeys
    keys = [k for k in served if k is not None]
    assert len(keys) == len(set(keys))  # no key twice
    assert len(keys) == 60  # none falsely missing: 80 asked for 60 keys
    assert left + len(keys) == 60
    assert replicas.counter("talos_registry_one_time_prekeys_served_total") == 60


@pytest.mark.asyncio
async def test_interleaved_announcements_never_regress_the_sequence(replicas: Replicas) -> None:
    agent = Agent.create("announcing")
    await agent.publish(replicas.servers[0].url)
    records = [agent.record(A, sequence) for sequence in range(1, 41)]
    clients = [RegistryClient(s.url) for s in replicas.servers]
    accepted: list[int] = []

    async def announce(n: int, record: PeerRecord) -> None:
        try:
            await clients[n % 2].publish_record(record)
        except RegistryRejected:
            return
        accepted.append(record.sequence)

    try:
        await asyncio.gather(*(announce(n, r) for n, r in enumerate(reversed(records))))
        await asyncio.gather(*(announce(n, r) for n, r in enumerate(records)))
        for n, record in enumerate(records):  # every sequence is spent, on both replicas
            with pytest.raises(RegistryRejected, match="StaleSequence"):
                await clients[n % 2].publish_record(record)
    finally:
        for client in clients:
            await client.aclose()
    assert 40 in accepted
    with psycopg.connect(replicas.url) as conn:
        rows = conn.execute("SELECT sequence FROM record_sequences").fetchall()
    assert rows == [(40,)]


@pytest.mark.asyncio
async def test_a_duplicate_is_logged_and_counted_once(replicas: Replicas) -> None:
    agent = Agent.create("split")
    one, two = (s.url for s in replicas.servers)
    await agent.publish(one)
    async with RegistryClient(one) as first, RegistryClient(two) as second:
        # A and B keep announcing, each through both replicas: both see the overlap,
        # the one that accepts the revealing record (A's second) reports it.
        for sequence, (instance, client) in enumerate(
            [(A, first), (B, second), (A, first), (B, second), (A, second), (B, first)], 1
        ):
            await client.publish_record(agent.record(instance, sequence))
        report = await second.duplicates(agent.agent_id)
    assert report.duplicate
    lines = [
        line
        for log in replicas.logs
        for line in log.read_text().splitlines()
        if "announced by 2 instances at once" in line
    ]
    assert len(lines) == 1, lines
    assert replicas.counter("talos_registry_duplicate_instances_total") == 1


def test_connections_killed_mid_request_answer_503_then_recover(
    replicas: Replicas, postgres_cluster: PostgresCluster
) -> None:
    agent = Agent.create("interrupted")
    asyncio.run(agent.publish(replicas.servers[0].url, one_time=3))
    bundle_url = f"{replicas.servers[0].url}/v1/agents/{agent.agent_id}/bundle"
    answers: list[httpx.Response] = []
    name = replicas.url.rsplit("/", 1)[1]
    with psycopg.connect(replicas.url, autocommit=True) as holder:
        # Hold the agent's lock: the replica's request waits inside its transaction.
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (AGENT_LOCK, agent.agent_id))
        request = threading.Thread(target=lambda: answers.append(httpx.get(bundle_url, timeout=30)))
        request.start()
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND "  # noqa: S608
            "application_name = 'talos-registry' AND wait_event_type = 'Lock'"
        )
        found: list[tuple[int]] = []

        def blocked() -> bool:
            found[:] = holder.execute(waiting, (name,)).fetchall()
            return bool(found)

        wait_until(blocked, 20, what="the request to wait on the agent's lock")
        holder.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'talos-registry'",
            (name,),
        )
        request.join(30)
    assert [a.status_code for a in answers] == [503]
    assert answers[0].json()["error"] == "StorageError"
    again = httpx.get(bundle_url, timeout=30)  # a new connection
    assert again.status_code == 200
    assert PrekeyBundle.from_bytes(again.content).one_time_prekey_id == 0  # nothing was consumed
    errors = replicas.counter("talos_registry_db_errors_total")
    assert errors >= 1
    # Connections killed while idle are replaced when taken from the pool: no request fails.
    postgres_cluster.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "  # noqa: S608
        f"WHERE datname = '{name}' AND application_name = 'talos-registry'"
    )
    after = httpx.get(bundle_url, timeout=30)
    assert after.status_code == 200
    assert PrekeyBundle.from_bytes(after.content).one_time_prekey_id == 1
    assert replicas.counter("talos_registry_db_errors_total") == errors


@pytest.mark.asyncio
async def test_drain_shares_hold_across_replicas(postgres_url: str, tmp_path: Path) -> None:
    started = start_replicas(postgres_url, tmp_path, "--one-time-prekeys-per-minute", "3")
    try:
        agent = Agent.create("drained")
        await agent.publish(started.servers[0].url, one_time=10)
        async with httpx.AsyncClient(timeout=30) as http:
            taken = []
            for n in range(6):
                url = started.servers[n % 2].url
                answer = await http.get(f"{url}/v1/agents/{agent.agent_id}/bundle")
                taken.append(PrekeyBundle.from_bytes(answer.content).one_time_prekey_id)
        assert taken == [0, 1, 2, None, None, None]  # one share in all, not one per replica
    finally:
        for server in started.servers:
            server.stop()


def test_agents_registered_on_different_replicas_reach_each_other(
    replicas: Replicas, tmp_path: Path
) -> None:
    cli = TalosCli()
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    cli.ok(alice_home, "init", "--name", "alice")
    bob_id = cli.ok(bob_home, "init", "--name", "bob").strip()
    one, two = (s.url for s in replicas.servers)
    with launched() as launcher:
        launcher.agent(bob_home, "--registry", two, "--accept", "open")
        launcher.agent(alice_home, "--registry", one, "--reconnect-interval", "1")
        sent = cli.ok(alice_home, "send", bob_id, "across replicas", "--timeout", "20").strip()
        assert sent.startswith("delivered ")
        inbox = json.loads(cli.ok(bob_home, "inbox", "--json"))
    assert [m["data"] for m in inbox] == ["across replicas"]


# -- start-up errors and moving from SQLite -----------------------------------------------------


def serve_fails(db: str, tmp_path: Path) -> tuple[int, str]:
    result = TalosCli(timeout=60).run(None, "registry", "serve", "--port", "1", "--db", db)
    return result.returncode, result.stderr


def test_unreachable_or_wrong_urls_fail_the_start_clearly(
    postgres_url: str, tmp_path: Path
) -> None:
    base = postgres_url.rsplit("/", 1)[0]
    for url in (
        base.replace("postgres@", "nobody:hunter2@") + "/postgres",
        "postgresql://postgres@127.0.0.1:1/x",
    ):
        code, stderr = serve_fails(url, tmp_path)
        assert code == 1, stderr
        assert "cannot connect to registry database" in stderr
        assert "Traceback" not in stderr
        assert "hunter2" not in stderr
    code, stderr = serve_fails("mysql://root@localhost/db", tmp_path)
    assert code == 2
    assert "only postgresql:// URLs" in stderr


def test_a_database_of_another_schema_version_fails_the_start(
    postgres_url: str, postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    postgres_cluster.sql("CREATE TABLE talos_schema (version integer NOT NULL)", name)
    postgres_cluster.sql(f"INSERT INTO talos_schema VALUES ({SCHEMA_VERSION + 1})", name)  # noqa: S608
    code, stderr = serve_fails(postgres_url, tmp_path)
    assert code == 1
    assert f"has schema {SCHEMA_VERSION + 1}; this build knows {SCHEMA_VERSION}" in stderr
    assert "Traceback" not in stderr


@pytest.mark.asyncio
async def test_port_db_copies_a_sqlite_registry_and_verifies_counts(
    postgres_url: str, tmp_path: Path
) -> None:
    sqlite = start_registry(tmp_path / "old.db", tmp_path / "old.log")
    agent = Agent.create("moved")
    try:
        await agent.publish(sqlite.url, one_time=4)
        async with RegistryClient(sqlite.url) as client:
            first = await client.fetch_bundle(agent.agent_id)
            await client.publish_record(agent.record(A, 7))
    finally:
        sqlite.stop()
    cli = TalosCli(timeout=60)
    moved = cli.run(
        None, "registry", "port-db", "--from", str(tmp_path / "old.db"), "--to", postgres_url
    )
    assert moved.returncode == 0, moved.stderr
    assert "one_time_prekeys: 3 rows" in moved.stdout
    assert "used_prekeys: 1 rows" in moved.stdout
    assert "counts verified" in moved.stdout
    again = cli.run(
        None, "registry", "port-db", "--from", str(tmp_path / "old.db"), "--to", postgres_url
    )
    assert again.returncode == 1
    assert "is not empty" in again.stderr
    server = start_registry(postgres_url, tmp_path / "new.log")
    try:
        async with RegistryClient(server.url) as client:
            bundle = await client.fetch_bundle(agent.agent_id)
            with pytest.raises(RegistryRejected, match="StaleSequence"):
                await client.publish_record(agent.record(A, 7))
    finally:
        server.stop()
    assert (first.one_time_prekey_id, bundle.one_time_prekey_id) == (0, 1)


@pytest.mark.asyncio
async def test_trusted_proxy_decides_whose_forwarded_address_counts(tmp_path: Path) -> None:
    """Loopback is trusted by default; ``--trusted-proxy 10.0.0.0/8`` replaces it, and
    then a loopback client's X-Forwarded-For counts for nothing."""
    for extra, expected in (((), [0, 1]), (("--trusted-proxy", "10.1.2.3/8"), [0, None])):
        server = start_registry(
            tmp_path / f"r{len(extra)}.db",
            tmp_path / f"r{len(extra)}.log",
            extra=("--one-time-prekeys-per-minute", "1", *extra),
        )
        try:
            agent = Agent.create("proxied")
            await agent.publish(server.url, one_time=3)
            taken = []
            async with httpx.AsyncClient(timeout=30) as http:
                for client in ("192.0.2.1", "192.0.2.2"):
                    answer = await http.get(
                        f"{server.url}/v1/agents/{agent.agent_id}/bundle",
                        headers={"x-forwarded-for": client},
                    )
                    taken.append(PrekeyBundle.from_bytes(answer.content).one_time_prekey_id)
            assert taken == expected
        finally:
            server.stop()


def test_a_replica_survives_its_database_restarting(tmp_path: Path) -> None:
    """Database down: requests answer 503 (in about the pool's wait), not hang; back up:
    the replica reconnects by itself and serves what was committed before."""
    with PostgresCluster.started(durable=True) as cluster:  # stop() is a crash: keep commits
        url = cluster.create_database("restarting")
        server = start_registry(url, tmp_path / "registry.log", ready=30)
        try:
            agent = Agent.create("patient")
            asyncio.run(agent.publish(server.url, one_time=2))
            bundle_url = f"{server.url}/v1/agents/{agent.agent_id}/bundle"
            keylog_url = f"{server.url}/v1/agents/{agent.agent_id}/keylog"
            health = f"{server.url}/health"
            assert httpx.get(health, timeout=30).json() == {"status": "ok"}
            cluster.stop()
            down = httpx.get(bundle_url, timeout=30)
            assert down.status_code == 503
            assert httpx.get(health, timeout=30).status_code == 503  # the balancer drains it
            cluster.start()
            wait_until(
                lambda: httpx.get(keylog_url, timeout=30).status_code != 503,
                30,
                what="the replica to reconnect",
            )
            assert httpx.get(keylog_url, timeout=30).status_code == 200
            assert httpx.get(health, timeout=30).status_code == 200
            up = httpx.get(bundle_url, timeout=30)
            assert up.status_code == 200, up.text
            assert PrekeyBundle.from_bytes(up.content).one_time_prekey_id == 0
        finally:
            server.stop()
