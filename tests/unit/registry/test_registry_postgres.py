"""What only the PostgreSQL backend promises: shares and migration across replicas,
start-up errors that say what is wrong."""

from __future__ import annotations

import threading

import pytest

from talos.errors import StorageError, StoreCorrupted
from talos.registry.postgres.schema import SCHEMA_VERSION
from talos.registry.store import RegistryStore
from talos.testing import FakeClock
from talos.testing.postgres import PostgresCluster


def test_drain_shares_hold_across_replicas(postgres_url: str, clock: FakeClock) -> None:
    with RegistryStore.open(postgres_url) as one, RegistryStore.open(postgres_url) as two:
        shares = [one.drain_shares(4), two.drain_shares(4)]
        allowed = [shares[i % 2].allow("10.0.0.1", "agent", clock) for i in range(8)]
        assert allowed == [True] * 4 + [False] * 4  # one share in total, not one per replica
        clock.advance(61)
        assert one.sweep(now_ms=int(clock.time() * 1000)) == 0
        assert [r[0] for r in _count(postgres_url)] == [0]  # full buckets are swept


def _count(url: str) -> list[tuple[int]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM drain_shares").fetchall()


def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    opened: list[RegistryStore] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        opened.append(RegistryStore.open(postgres_url))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(opened) == 6
    finally:
        for store in opened:
            store.close()
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM talos_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused(postgres_url: str, postgres_cluster: PostgresCluster) -> None:
    RegistryStore.open(postgres_url).close()
    name = postgres_url.rsplit("/", 1)[1]
    newer = f"UPDATE talos_schema SET version = {SCHEMA_VERSION + 1}"  # noqa: S608
    postgres_cluster.sql(newer, name)
    with pytest.raises(StorageError, match=f"has schema {SCHEMA_VERSION + 1}.*upgrade Talos"):
        RegistryStore.open(postgres_url)


def test_another_applications_database_is_refused(
    postgres_url: str, postgres_cluster: PostgresCluster
) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    postgres_cluster.sql("CREATE TABLE records (id int)", name)
    with pytest.raises(StoreCorrupted, match="not a registry database"):
        RegistryStore.open(postgres_url)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda url: url.rsplit("/", 1)[0] + "/no_such_database",
        lambda url: url.replace("postgres@", "nobody:secret@"),
        lambda url: "postgresql://127.0.0.1:1/x",
        lambda url: "postgresql://[bad",
    ],
    ids=["missing-database", "unknown-user", "nothing-listening", "malformed"],
)
def test_unreachable_or_wrong_urls_are_a_storage_error(postgres_url: str, mangle: object) -> None:
    url = mangle(postgres_url)  # type: ignore[operator]
    with pytest.raises(StorageError, match="cannot connect to registry database") as caught:
        RegistryStore.open(url)
    assert "secret" not in str(caught.value)
