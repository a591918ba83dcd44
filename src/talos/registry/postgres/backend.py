"""The registry's PostgreSQL backend: a connection pool, per-agent advisory locks as check-and-set.

Several registry processes (replicas) share one database and behave as one
registry. Guarantee 1 of :mod:`talos.registry.backend` (what a transaction
read is still true when it writes) holds because every transaction first
takes a transaction-level advisory lock on each agent it touches
(``pg_advisory_xact_lock``), before its first read of that agent: all
operations on one agent run one after another across every replica, the way
SQLite runs all of them one after another, while different agents proceed
in parallel. On top of that, each write that must never regress is written
so that it cannot (the record sequence is ``GREATEST`` of the stored and the
new one; a one-time prekey leaves the pool by ``DELETE ... RETURNING``).

Transactions run at ``READ COMMITTED``: each statement sees what committed
before it, so a read after the lock sees everything the previous holder
wrote. A transaction touching several agents (the duplicate report) locks
them in agent-id order; every other one locks a single agent, so no lock
cycle can form.

Driver: psycopg 3 with :class:`psycopg_pool.ConnectionPool`, synchronous,
called from the API's thread pool (``docs/design/registry-postgres.md``).
A connection the server closed (a restart, ``pg_terminate_backend``) fails
the request it was serving (503) and is replaced; connections are checked
when taken from the pool, so an idle one that died costs no request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Final, Protocol

import psycopg
import psycopg_pool

from talos.core.peer_record import PeerRecord
from talos.errors import StorageError
from talos.registry.backend import DrainShares, InstanceInfo, LiveCounts, SecurityEvent
from talos.registry.database import redacted
from talos.registry.duplicates import Activity
from talos.registry.postgres.migrate import connect, create_or_migrate
from talos.registry.postgres.shares import PostgresShares

__all__ = ["AGENT_LOCK", "SWEEP_LOCK", "PostgresBackend", "PostgresTransaction", "RowSource"]

log = logging.getLogger("talos.registry")

#: First key of the advisory locks (``pg_advisory_xact_lock(int, int)``): one per
#: agent (second key: ``hashtext(agent id)``), and the sweep's (second key 0).
AGENT_LOCK: Final = 0x7A105
SWEEP_LOCK: Final = 0x7A106
#: Connections one replica keeps at most, and how long a request waits for one.
POOL_SIZE: Final = 16
POOL_TIMEOUT: Final = 5.0
APPLICATION_NAME: Final = "talos-registry"

_DUPLICATED_AGENTS: Final = """
WITH live AS (
    SELECT agent_id, first_sequence,
        max(sequence) OVER (PARTITION BY agent_id ORDER BY first_sequence
                            RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier,
        count(*) FILTER (WHERE sequence > first_sequence)
            OVER (PARTITION BY agent_id, first_sequence) AS tied
    FROM records WHERE expires_ms > %(now)s)
SELECT DISTINCT agent_id FROM live WHERE earlier > first_sequence OR tied > 1
ORDER BY agent_id LIMIT %(limit)s
"""
_PUT_RECORD: Final = """
INSERT INTO records (agent_id, instance_id, sequence, endpoint, issued_ms, expires_ms, record,
                     first_seen_ms, first_sequence)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (agent_id, instance_id) DO UPDATE SET
    sequence=excluded.sequence, endpoint=excluded.endpoint, issued_ms=excluded.issued_ms,
    expires_ms=excluded.expires_ms, record=excluded.record
"""
_LIVE_INSTANCES: Final = """
SELECT instance_id, endpoint, sequence, issued_ms, expires_ms, record, first_seen_ms,
       first_sequence
FROM records WHERE agent_id=%s AND expires_ms > %s ORDER BY sequence DESC LIMIT %s
"""
_TAKE_ONE_TIME_PREKEY: Final = """
DELETE FROM one_time_prekeys WHERE (agent_id, prekey_id) = (
    SELECT agent_id, prekey_id FROM one_time_prekeys WHERE agent_id=%s
    ORDER BY prekey_id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING prekey_id, public_key
"""
_ADD_ONE_TIME_PREKEY: Final = """
INSERT INTO one_time_prekeys SELECT %s, %s, %s WHERE NOT EXISTS
(SELECT 1 FROM used_prekeys WHERE agent_id=%s AND public_key=%s)
"""
_UPSERT: Final = "INSERT INTO {table} VALUES ({values}) ON CONFLICT ({key}) DO UPDATE SET {set}"


class RowSource(Protocol):
    """Where :meth:`PostgresBackend.load` reads rows (the SQLite backend)."""

    def count_rows(self, table: str) -> int: ...

    def table_rows(self, table: str, columns: tuple[str, ...]) -> Iterator[tuple[object, ...]]: ...


def _upsert(table: str, key: str, columns: tuple[str, ...]) -> str:
    values = ", ".join(["%s"] * (1 + len(columns)))
    assignments = ", ".join(f"{c}=excluded.{c}" for c in columns)
    return _UPSERT.format(table=table, values=values, key=key, set=assignments)


class PostgresBackend:
    """The registry's tables in one PostgreSQL database (a :class:`~.backend.Backend`).

    Thread-safe: each transaction takes its own pooled connection.
    """

    def __init__(self, pool: psycopg_pool.ConnectionPool, url: str) -> None:
        self._pool = pool
        self._url = url

    @classmethod
    def open(cls, url: str, *, pool_size: int = POOL_SIZE) -> PostgresBackend:
        """Connect to ``url``, create or migrate the schema (once across replicas), open the pool.

        Raises:
            StorageError: the database cannot be reached or refuses us, or
                holds a schema this build does not know.
            StoreCorrupted: the database holds tables of another application.
        """
        with connect(url) as conn:
            create_or_migrate(conn, url)
        pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=POOL_TIMEOUT,
            kwargs={"application_name": APPLICATION_NAME, "connect_timeout": 5},
            check=psycopg_pool.ConnectionPool.check_connection,
            open=False,
            name=APPLICATION_NAME,
        )
        try:
            pool.open(wait=True, timeout=POOL_TIMEOUT)
        except psycopg_pool.PoolTimeout as exc:
            pool.close()
            raise StorageError(f"cannot connect to registry database {redacted(url)}") from exc
        return cls(pool, url)

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        """One transaction on a pooled connection: committed on success, rolled back otherwise.

        Raises:
            StorageError: the database failed or no connection came in time (rolled back).
        """
        try:
            with self._pool.connection() as conn:
                yield PostgresTransaction(conn)
        except psycopg.Error as exc:
            raise StorageError(f"registry database {redacted(self._url)}: {exc}") from exc

    def load(self, source: RowSource, tables: dict[str, tuple[str, ...]]) -> dict[str, int]:
        """Copy ``tables`` from ``source`` into this (empty) database in one transaction,
        committed only when every table holds as many rows as in ``source``.

        Raises:
            StorageError: this database holds registry data already, the
                database failed, or the counts differ (rolled back).
        """
        counts: dict[str, int] = {}
        with self.transaction() as tx:
            conn = tx.connection
            for table in tables:
                if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:  # noqa: S608
                    raise StorageError(f"{redacted(self._url)} is not empty: {table} has rows")
            for table, columns in tables.items():
                copy_sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
                with conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
                    for values in source.table_rows(table, columns):
                        copy.write_row(values)
                row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
                copied, expected = (0 if row is None else int(row[0])), source.count_rows(table)
                if copied != expected:
                    raise StorageError(f"{table}: {expected} rows in the source, {copied} copied")
                counts[table] = copied
        return counts

    def ping(self) -> None:
        """Raises: StorageError: no connection to the database now."""
        with self.transaction() as tx:
            tx.connection.execute("SELECT 1")

    def drain_shares(self, per_agent: int) -> DrainShares:
        """One-time prekey shares kept in the database: they hold across replicas."""
        return PostgresShares(self, per_agent)

    def sweep(self, now_ms: int) -> int | None:
        """Delete expired records and idle drain buckets; ``None`` when another replica sweeps.

        Keeps what prevents replays: used prekeys and record sequences.
        """
        with self.transaction() as tx:
            return tx.sweep(now_ms)


class PostgresTransaction:
    """The registry's reads and writes on PostgreSQL, inside an open transaction
    (a :class:`~talos.registry.backend.Transaction`)."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._conn = conn
        self._locked: set[str] = set()

    @property
    def connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The transaction's connection, for the rest of this package."""
        return self._conn

    def _lock(self, agent_id: str) -> None:
        """Serialize with every other transaction on ``agent_id``, in any replica."""
        if agent_id not in self._locked:
            self._conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (AGENT_LOCK, agent_id)
            )
            self._locked.add(agent_id)

    # -- key logs

    def keylog(self, agent_id: str) -> bytes | None:
        return self._blob("SELECT log FROM keylogs WHERE agent_id=%s", agent_id)

    def put_keylog(self, agent_id: str, log: bytes, sequence: int, now_ms: int) -> None:
        self._lock(agent_id)
        self._conn.execute(
            _upsert("keylogs", "agent_id", ("log", "sequence", "updated_ms")),
            (agent_id, log, sequence, now_ms),
        )

    # -- prekeys

    def prekey_upload(self, agent_id: str) -> bytes | None:
        return self._blob("SELECT upload FROM prekeys WHERE agent_id=%s", agent_id)

    def prekey_sequence(self, agent_id: str) -> int | None:
        return self._int("SELECT sequence FROM prekeys WHERE agent_id=%s", agent_id)

    def replace_prekeys(
        self,
        agent_id: str,
        upload: bytes,
        sequence: int,
        now_ms: int,
        one_time: Iterable[tuple[int, bytes]],
    ) -> int:
        self._lock(agent_id)
        conn = self._conn
        conn.execute(
            _upsert("prekeys", "agent_id", ("upload", "sequence", "updated_ms")),
            (agent_id, upload, sequence, now_ms),
        )
        conn.execute("DELETE FROM one_time_prekeys WHERE agent_id=%s", (agent_id,))
        rows = [(agent_id, pid, key, agent_id, key) for pid, key in one_time]
        if rows:
            with conn.cursor() as cursor:
                cursor.executemany(_ADD_ONE_TIME_PREKEY, rows)
        return self.one_time_prekeys_left(agent_id)

    def take_one_time_prekey(self, agent_id: str) -> tuple[int, bytes] | None:
        self._lock(agent_id)
        row = self._conn.execute(_TAKE_ONE_TIME_PREKEY, (agent_id,)).fetchone()
        if row is None:
            return None
        prekey = (int(row[0]), bytes(row[1]))
        self._conn.execute(
            "INSERT INTO used_prekeys VALUES (%s, %s) ON CONFLICT DO NOTHING", (agent_id, prekey[1])
        )
        return prekey

    def one_time_prekeys_left(self, agent_id: str) -> int:
        return self._int("SELECT count(*) FROM one_time_prekeys WHERE agent_id=%s", agent_id) or 0

    # -- peer records

    def record_sequence(self, agent_id: str) -> int | None:
        return self._int("SELECT sequence FROM record_sequences WHERE agent_id=%s", agent_id)

    def set_record_sequence(self, agent_id: str, sequence: int) -> None:
        self._lock(agent_id)
        # Never backwards, whatever a caller read: the high-water mark only rises.
        self._conn.execute(
            "INSERT INTO record_sequences VALUES (%s, %s) ON CONFLICT (agent_id) DO UPDATE "
            "SET sequence = GREATEST(record_sequences.sequence, excluded.sequence)",
            (agent_id, sequence),
        )

    def prune_records(self, agent_id: str, now_ms: int) -> None:
        self._lock(agent_id)
        self._conn.execute(
            "DELETE FROM records WHERE agent_id=%s AND expires_ms <= %s", (agent_id, now_ms)
        )

    def activities(self, agent_id: str, now_ms: int) -> list[Activity]:
        self._lock(agent_id)
        rows = self._conn.execute(
            "SELECT instance_id, first_sequence, sequence FROM records "
            "WHERE agent_id=%s AND expires_ms > %s",
            (agent_id, now_ms),
        ).fetchall()
        return [Activity(bytes(r[0]), int(r[1]), int(r[2])) for r in rows]

    def put_record(self, record: PeerRecord, now_ms: int) -> None:
        self._lock(record.agent_id)
        self._conn.execute(
            _PUT_RECORD,
            (
                record.agent_id,
                record.instance_id,
                record.sequence,
                record.endpoint,
                record.issued_ms,
                record.expires_ms,
                record.to_bytes(),
                now_ms,
                record.sequence,
            ),
        )

    def live_instances(
        self, agent_id: str, now_ms: int, limit: int | None = None
    ) -> list[InstanceInfo]:
        self._lock(agent_id)
        rows = self._conn.execute(_LIVE_INSTANCES, (agent_id, now_ms, limit)).fetchall()
        return [_instance(r) for r in rows]

    def duplicated_agents(self, now_ms: int, limit: int | None = None) -> list[str]:
        rows = self._conn.execute(_DUPLICATED_AGENTS, {"now": now_ms, "limit": limit})
        return [str(agent) for (agent,) in rows.fetchall()]

    def live_counts(self, now_ms: int) -> LiveCounts:
        row = self._conn.execute(
            "SELECT count(DISTINCT agent_id), count(*) FROM records WHERE expires_ms > %s",
            (now_ms,),
        ).fetchone()
        if row is None:  # an aggregate always answers one row
            raise StorageError("counting live records answered nothing")
        duplicates = self.duplicated_agents(now_ms)
        return LiveCounts(int(row[0]), int(row[1]), len(duplicates))

    # -- revocation lists

    def revocation_list(self, issuer: str) -> bytes | None:
        return self._blob("SELECT list FROM revocations WHERE issuer=%s", issuer)

    def put_revocation_list(self, issuer: str, data: bytes, version: int, now_ms: int) -> None:
        self._lock(issuer)
        self._conn.execute(
            _upsert("revocations", "issuer", ("list", "version", "updated_ms")),
            (issuer, data, version, now_ms),
        )

    # -- security events

    def add_security_event(self, event: SecurityEvent) -> None:
        self._conn.execute(
            "INSERT INTO security_events (at_ms, kind, agent_id, reason, known, offered) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (event.at_ms, event.kind, event.agent_id, event.reason, event.known, event.offered),
        )

    def security_events(self, agent_id: str | None) -> list[SecurityEvent]:
        query = "SELECT at_ms, kind, agent_id, reason, known, offered FROM security_events"
        args: tuple[str, ...] = ()
        if agent_id is not None:
            query += " WHERE agent_id=%s"
            args = (agent_id,)
        rows = self._conn.execute(query + " ORDER BY id", args).fetchall()
        return [
            SecurityEvent(
                int(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                None if r[4] is None else bytes(r[4]),
                bytes(r[5]),
            )
            for r in rows
        ]

    # -- housekeeping

    def sweep(self, now_ms: int) -> int | None:
        """Delete expired records and drain buckets idle long enough to be full again,
        unless another replica is sweeping (``None``)."""
        row = self._conn.execute("SELECT pg_try_advisory_xact_lock(%s, 0)", (SWEEP_LOCK,))
        got = row.fetchone()
        if got is None or not got[0]:
            return None
        deleted = self._conn.execute("DELETE FROM records WHERE expires_ms <= %s", (now_ms,))
        PostgresShares.sweep(self._conn, now_ms / 1000)
        return deleted.rowcount

    def _blob(self, query: str, agent_id: str) -> bytes | None:
        self._lock(agent_id)
        row = self._conn.execute(query, (agent_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def _int(self, query: str, agent_id: str) -> int | None:
        self._lock(agent_id)
        row = self._conn.execute(query, (agent_id,)).fetchone()
        return None if row is None else int(row[0])


def _instance(r: tuple[Any, ...]) -> InstanceInfo:
    return InstanceInfo(
        bytes(r[0]),
        str(r[1]),
        int(r[2]),
        int(r[3]),
        int(r[4]),
        bytes(r[5]),
        int(r[6]),
        int(r[7]),
    )
