"""Operating the registry, as a real ``talos registry serve`` process: metrics and split brain.

Agents here sign their records with a FakeClock set in the recent past, so a
test can lay out an hour of announcements (every 15 minutes, an hour-long
lifetime, as TalosClient does) against the server's real clock.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.core.identity import Identity
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.x3dh import PrekeyBundle, PrekeyStore
from talos.discovery import RegistryClient, RegistryRejected
from talos.discovery.registry_client import DuplicateReport
from talos.system import SYSTEM_RNG
from talos.testing import FakeClock
from talos.testing.processes import RegistryProcess, start_registry

MINUTE = 60.0
LIFETIME = 60 * MINUTE
A, B = b"\x0a" * 16, b"\x0b" * 16
CBOR = {"content-type": "application/cbor"}

#: Every series the registry exports from start-up (counters by their family name).
FAMILIES = {
    "talos_registry_requests": "counter",
    "talos_registry_request_duration_seconds": "histogram",
    "talos_registry_rejections": "counter",
    "talos_registry_live_agents": "gauge",
    "talos_registry_live_instances": "gauge",
    "talos_registry_duplicate_identities": "gauge",
    "talos_registry_duplicate_instances": "counter",
    "talos_registry_one_time_prekeys_served": "counter",
    "talos_registry_bundles_without_one_time_prekey": "counter",
    "talos_registry_one_time_prekeys_withheld": "counter",
    "talos_registry_db_errors": "counter",
    "talos_registry_records_swept": "counter",
    "talos_registry_clients_dropped": "counter",
    "talos_registry_connections_refused": "counter",
    "talos_registry_connections": "gauge",
}

#: The registry's schema version 1, as released: what an old database file holds.
SCHEMA_V1 = """
CREATE TABLE keylogs (
    agent_id TEXT PRIMARY KEY, log BLOB NOT NULL, sequence INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE prekeys (
    agent_id TEXT PRIMARY KEY, upload BLOB NOT NULL, sequence INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE one_time_prekeys (
    agent_id TEXT NOT NULL, prekey_id INTEGER NOT NULL, public_key BLOB NOT NULL,
    PRIMARY KEY (agent_id, prekey_id));
CREATE TABLE used_prekeys (
    agent_id TEXT NOT NULL, public_key BLOB NOT NULL, PRIMARY KEY (agent_id, public_key));
CREATE TABLE records (
    agent_id TEXT NOT NULL, instance_id BLOB NOT NULL, sequence INTEGER NOT NULL,
    endpoint TEXT NOT NULL, issued_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    record BLOB NOT NULL, PRIMARY KEY (agent_id, instance_id));
CREATE TABLE record_sequences (
    agent_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL);
CREATE TABLE revocations (
    issuer TEXT PRIMARY KEY, list BLOB NOT NULL, version INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
    agent_id TEXT NOT NULL, reason TEXT NOT NULL, known BLOB, offered BLOB NOT NULL);
PRAGMA user_version = 1;
"""


# -- a registry with its metrics port --------------------------------------------------------


@dataclass
class Served:
    server: RegistryProcess
    metrics_url: str
    log: Path

    @property
    def url(self) -> str:
        return self.server.url

    def scrape(self, url: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = httpx.get(f"{url or self.metrics_url}/metrics", timeout=5).text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.scrape()[(name, frozenset(labels.items()))]


def serve_with_metrics(
    directory: Path, db: Path | None = None, extra: tuple[str, ...] = ()
) -> Served:
    """``talos registry serve --metrics-port 0``, ready, with the metrics port from its log."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "registry.log"
    extra = ("--metrics-port", "0", *extra)
    server = start_registry(db or directory / "registry.db", log, ready=30, extra=extra)
    assert server.metrics_url is not None
    return Served(server, server.metrics_url, log)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Served]:
    served = serve_with_metrics(tmp_path / "fresh")
    try:
        yield served
    finally:
        served.server.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = serve_with_metrics(tmp_path_factory.mktemp("registry-ops"))
    try:
        yield served
    finally:
        served.server.stop()


# -- agents whose announcements we place in time ----------------------------------------------


@dataclass
class Agent:
    identity: Identity
    clock: FakeClock

    @classmethod
    def create(cls, name: str, *, minutes_ago: float) -> Agent:
        clock = FakeClock(time.time() - minutes_ago * MINUTE)
        return cls(Identity.create(name, rng=SYSTEM_RNG, clock=clock), clock)

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id

    def record(self, instance: bytes) -> PeerRecord:
        """An announcement as TalosClient makes it: sequence = issue time in ms."""
        now = self.clock.time()
        return PeerRecord.create(
            self.identity.signing_key,
            agent_id=self.agent_id,
            key_sequence=self.identity.sequence,
            instance_id=instance,
            endpoint=f"ws://10.0.0.{instance[0]}:7000",
            sequence=int(now * 1000),
            now=now,
            lifetime=LIFETIME,
        )

    def prekeys(self, one_time: int) -> PrekeyUpload:
        """A first prekey upload with ``one_time`` one-time prekeys."""
        store = PrekeyStore.create(
            agent_id=self.agent_id,
            signing_key=self.identity.signing_key,
            identity_dh=self.identity.dh_key,
            rng=SYSTEM_RNG,
        ).add_one_time_prekeys(one_time, SYSTEM_RNG)
        return PrekeyUpload.from_store(store, self.identity.signing_key, key_sequence=0, sequence=1)

    async def announce(self, client: RegistryClient, instance: bytes, then: float) -> None:
        """Publish a record of ``instance``, then let ``then`` minutes pass."""
        await client.publish_record(self.record(instance))
        self.clock.advance(then * MINUTE)


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_on_both_ports_list_every_series_at_start_up(fresh: Served) -> None:
    texts = [httpx.get(f"{url}/metrics").text for url in (fresh.metrics_url, fresh.url)]
    for text in texts:
        kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
        assert {name: kinds.get(name) for name in FAMILIES} == FAMILIES
    series = fresh.scrape()
    assert set(series) == set(fresh.scrape(fresh.url))
    totals = {k: v for k, v in series.items() if k[0].endswith(("_total", "_count"))}
    for key, count in totals.items():
        if dict(key[1]).get("route") not in ("/v1/time", "/metrics"):  # readiness checks
            assert count == 0, key
    for gauge in ("live_agents", "live_instances", "duplicate_identities"):
        assert series[(f"talos_registry_{gauge}", frozenset())] == 0
    counters = {name for name, _ in totals}
    for counter in ("duplicate_instances", "one_time_prekeys_served", "db_errors"):
        assert f"talos_registry_{counter}_total" in counters
    assert "talos_registry_bundles_without_one_time_prekey_total" in counters
    rejections = [labels for name, labels in series if name == "talos_registry_rejections_total"]
    assert len(rejections) == 4 * 16  # each submission kind by each refusal name
    requests = [dict(labels) for name, labels in series if name == "talos_registry_requests_total"]
    assert {"method": "PUT", "route": "/v1/agents/{agent_id}/record", "status": "4xx"} in requests
    assert {"method": "GET", "route": "/v1/duplicates", "status": "5xx"} in requests


@pytest.mark.asyncio
async def test_counters_move(registry: Served) -> None:
    bundle_route = {"method": "GET", "route": "/v1/agents/{agent_id}/bundle", "status": "2xx"}
    stale_record = {"kind": "record", "reason": "StaleSequence"}
    before = registry.scrape()
    agent = Agent.create("counted", minutes_ago=1)
    async with RegistryClient(registry.url) as client:
        await client.publish_keylog(agent.identity.keylog)
        await client.publish_prekeys(agent.prekeys(1))
        with_key = await client.fetch_bundle(agent.agent_id)
        without = await client.fetch_bundle(agent.agent_id)
        assert (with_key.one_time_prekey_id, without.one_time_prekey_id) == (0, None)
        record = agent.record(A)
        await client.publish_record(record)
        with pytest.raises(RegistryRejected, match="StaleSequence"):
            await client.publish_record(record)
    after = registry.scrape()

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before[key]

    assert moved("talos_registry_one_time_prekeys_served_total") == 1
    assert moved("talos_registry_bundles_without_one_time_prekey_total") == 1
    assert moved("talos_registry_rejections_total", **stale_record) == 1
    assert moved("talos_registry_requests_total", **bundle_route) == 2
    assert moved("talos_registry_live_instances") == 1
    assert re.search(r"refused record submission for \S+: StaleSequence", registry.log.read_text())


@pytest.mark.asyncio
async def test_one_time_prekeys_are_not_drained_by_one_address(tmp_path: Path) -> None:
    """``--one-time-prekeys-per-minute 2``: the third bundle 127.0.0.1 takes has no
    one-time prekey, 127.0.0.2 still gets one, and the operator sees both."""
    served = serve_with_metrics(tmp_path, extra=("--one-time-prekeys-per-minute", "2"))
    try:
        agent = Agent.create("drained", minutes_ago=1)
        async with RegistryClient(served.url) as client:
            await client.publish_keylog(agent.identity.keylog)
            await client.publish_prekeys(agent.prekeys(5))
            taken = [(await client.fetch_bundle(agent.agent_id)).one_time_prekey_id for _ in "abc"]
        assert taken == [0, 1, None]
        other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=other) as http:
            answer = await http.get(f"{served.url}/v1/agents/{agent.agent_id}/bundle")
        assert PrekeyBundle.from_bytes(answer.content).one_time_prekey_id == 2
        assert served.value("talos_registry_one_time_prekeys_withheld_total") == 1
        assert served.value("talos_registry_one_time_prekeys_served_total") == 3
        assert served.value("talos_registry_bundles_without_one_time_prekey_total") == 0
        log = served.log.read_text()
        assert f"withholding one-time prekeys of {agent.agent_id} from 127.0.0.1" in log
    finally:
        served.server.stop()


# -- split brain --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_restart_is_not_a_duplicate(registry: Served) -> None:
    agent = Agent.create("restarted", minutes_ago=40)
    async with RegistryClient(registry.url) as client:
        await client.publish_keylog(agent.identity.keylog)
        for _ in range(3):  # the first process: 40, 25 and 10 minutes ago, then it stops
            await agent.announce(client, A, then=15)
        agent.clock.set_time(time.time() - 5 * MINUTE)
        await agent.announce(client, B, then=4)  # restarted 5 minutes ago: a new instance
        await agent.announce(client, B, then=0)
        live = await client.instances(agent.agent_id)
        report = await client.duplicates(agent.agent_id)
        everyone = await client.all_duplicates()
    async with httpx.AsyncClient(base_url=registry.url) as http:
        answer = (await http.get(f"/v1/agents/{agent.agent_id}/duplicates")).json()
    assert {r.instance_id for r in live} == {A, B}  # the old record lives on for 50 minutes
    assert not report.duplicate
    assert {i.instance_id for i in report.instances} == {A.hex(), B.hex()}
    assert agent.agent_id not in {r.agent_id for r in everyone}
    assert answer["duplicate"] is False
    assert f"identity {agent.agent_id} announced" not in registry.log.read_text()


@pytest.mark.asyncio
async def test_concurrent_instances_are_duplicates(registry: Served) -> None:
    counted = registry.value("talos_registry_duplicate_instances_total")
    agent = Agent.create("twice", minutes_ago=40)
    async with RegistryClient(registry.url) as client:
        await client.publish_keylog(agent.identity.keylog)
        await agent.announce(client, A, then=10)  # host A, 40 minutes ago
        await agent.announce(client, B, then=5)  # host B starts 30 minutes ago
        assert not (await client.duplicates(agent.agent_id)).duplicate
        await agent.announce(client, A, then=10)  # A re-announces: both are running
        await agent.announce(client, B, then=5)
        await agent.announce(client, A, then=0)
        report = await client.duplicates(agent.agent_id)
        everyone = await client.all_duplicates()
    async with httpx.AsyncClient(base_url=registry.url) as http:
        listing = (await http.get("/v1/duplicates")).json()
        single = (await http.get(f"/v1/agents/{agent.agent_id}/duplicates")).json()
    assert report.duplicate
    assert [(i.instance_id, i.endpoint) for i in report.instances] == [
        (A.hex(), "ws://10.0.0.10:7000"),
        (B.hex(), "ws://10.0.0.11:7000"),
    ]
    first_a, first_b = (i.first_seen_ms for i in report.instances)
    assert first_a < first_b <= time.time() * 1000
    assert [r for r in everyone if r.agent_id == agent.agent_id] == [report]
    assert listing["truncated"] is False
    [entry] = [d for d in listing["duplicates"] if d["agent_id"] == agent.agent_id]
    assert entry == single
    assert set(entry["instances"][0]) == {
        "instance_id",
        "endpoint",
        "first_seen_ms",
        "issued_ms",
        "expires_ms",
    }
    assert registry.value("talos_registry_duplicate_instances_total") == counted + 1  # once
    assert registry.value("talos_registry_duplicate_identities") >= 1
    log = registry.log.read_text()
    assert f"identity {agent.agent_id} announced by 2 instances at once" in log
    assert isinstance(report, DuplicateReport)


# -- schema migration ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_old_schema_database_is_migrated(tmp_path: Path) -> None:
    agent = Agent.create("veteran", minutes_ago=20)
    old = agent.record(A)
    agent.clock.advance(5 * MINUTE)
    restarted = agent.record(B)
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as connection:
        connection.executescript(SCHEMA_V1)
        connection.execute(
            "INSERT INTO keylogs VALUES (?, ?, 0, 0)",
            (agent.agent_id, agent.identity.keylog.to_bytes()),
        )
        for r in (old, restarted):
            connection.execute(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    agent.agent_id,
                    r.instance_id,
                    r.sequence,
                    r.endpoint,
                    r.issued_ms,
                    r.expires_ms,
                    r.to_bytes(),
                ),
            )
        connection.execute(
            "INSERT INTO record_sequences VALUES (?, ?)", (agent.agent_id, restarted.sequence)
        )
    connection.close()
    served = serve_with_metrics(tmp_path / "migrated", db)
    try:
        async with RegistryClient(served.url) as client:
            before = await client.duplicates(agent.agent_id)
            agent.clock.set_time(time.time() - 60)
            await agent.announce(client, A, then=0)  # the older instance is still running
            after = await client.duplicates(agent.agent_id)
        assert served.value("talos_registry_live_instances") == 2
    finally:
        served.server.stop()
    assert not before.duplicate
    assert [(i.instance_id, i.first_seen_ms) for i in before.instances] == [
        (B.hex(), restarted.issued_ms),
        (A.hex(), old.issued_ms),
    ]
    assert after.duplicate
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 2
    connection.close()
