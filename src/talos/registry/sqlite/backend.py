"""The registry's SQLite backend: one file, one connection, ``BEGIN IMMEDIATE`` as check-and-set.

SQLite through the standard library, WAL mode, ``synchronous=FULL`` (a power
cut must not forget that a one-time prekey was handed out). One connection
per process, guarded by a lock (SQLite serializes writers anyway); every
transaction takes the write lock up front (``BEGIN IMMEDIATE``), so what it
read is still true when it writes, also across processes sharing the file.
Opening a file creates or migrates its schema (:mod:`.schema`) in one such
transaction, so two processes opening an old file migrate it once.

Every SQL statement the registry runs on SQLite is in this package.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from talos.core.peer_record import PeerRecord
from talos.errors import StorageError, StoreCorrupted
from talos.registry.backend import DrainShares, InstanceInfo, LiveCounts, SecurityEvent
from talos.registry.drain import MemoryShares
from talos.registry.duplicates import Activity
from talos.registry.sqlite.schema import MIGRATIONS, SCHEMA_VERSION, TABLES

__all__ = ["SqliteBackend", "SqliteTransaction"]

log = logging.getLogger("talos.registry")

# Duplicated agents, as talos.registry.duplicates.duplicated decides (tests check that
# they agree), in one sorted pass rather than a quadratic self-join: a live instance is
# overlapped when an instance first seen before it announced after it was first seen
# ("earlier"), or when two first seen with the same sequence both announced again.
_DUPLICATED_AGENTS: Final = """
WITH live AS (
    SELECT agent_id, first_sequence,
        max(sequence) OVER (PARTITION BY agent_id ORDER BY first_sequence
                            RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier,
        sum(sequence > first_sequence) OVER (PARTITION BY agent_id, first_sequence) AS tied
    FROM records WHERE expires_ms > :now)
SELECT DISTINCT agent_id FROM live WHERE earlier > first_sequence OR tied > 1
ORDER BY agent_id LIMIT :limit
"""
_PUT_RECORD: Final = """
INSERT INTO records (agent_id, instance_id, sequence, endpoint, issued_ms, expires_ms, record,
                     first_seen_ms, first_sequence)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (agent_id, instance_id) DO UPDATE SET
    sequence=excluded.sequence, endpoint=excluded.endpoint, issued_ms=excluded.issued_ms,
    expires_ms=excluded.expires_ms, record=excluded.record
"""
_LIVE_INSTANCES: Final = """
SELECT instance_id, endpoint, sequence, issued_ms, expires_ms, record, first_seen_ms,
       first_sequence
FROM records WHERE agent_id=? AND expires_ms > ? ORDER BY sequence DESC LIMIT ?
"""
_TAKE_ONE_TIME_PREKEY: Final = """
DELETE FROM one_time_prekeys WHERE rowid = (SELECT rowid FROM one_time_prekeys
WHERE agent_id=? ORDER BY prekey_id LIMIT 1) RETURNING prekey_id, public_key
"""
_ADD_ONE_TIME_PREKEY: Final = """
INSERT INTO one_time_prekeys SELECT ?, ?, ? WHERE NOT EXISTS
(SELECT 1 FROM used_prekeys WHERE agent_id=? AND public_key=?)
"""


class SqliteBackend:
    """The registry's tables in one SQLite file (a :class:`~talos.registry.backend.Backend`).

    Thread-safe: one connection guarded by a lock, every transaction in turn.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> SqliteBackend:
        """Open (creating or migrating if needed) the registry database at ``path``.

        Raises:
            StoreCorrupted: the file is not a registry database.
            StorageError: the file cannot be opened, or was written by a newer schema.
        """
        path = Path(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open registry database {path}: {exc}") from exc
        try:
            _initialize(db, path)
        except BaseException:
            db.close()
            raise
        return cls(db, path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[SqliteTransaction]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back otherwise.

        Raises:
            StorageError: the database failed (rolled back).
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._failure(exc) from exc
            try:
                yield SqliteTransaction(self._db)
            except sqlite3.Error as exc:
                self._rollback()
                raise self._failure(exc) from exc
            except BaseException:
                self._rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._failure(exc) from exc

    def ping(self) -> None:
        """Raises: StorageError: the file cannot take a write lock now."""
        with self.transaction():
            pass

    def drain_shares(self, per_agent: int) -> DrainShares:
        """Shares in memory: one process serves the file (a second one gets its own)."""
        return MemoryShares(per_agent)

    def sweep(self, now_ms: int) -> int | None:
        """Delete expired records; used prekeys and record sequences stay."""
        with self.transaction() as tx:
            return tx.sweep(now_ms)

    def count_rows(self, table: str) -> int:
        """Rows of ``table`` (one of the schema's), for ``talos registry port-db``."""
        with self._lock:
            return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608

    def table_rows(self, table: str, columns: tuple[str, ...]) -> Iterator[tuple[object, ...]]:
        """Every row of ``table`` (one of the schema's), in storage order, for port-db.

        Reads in one snapshot; hold no transaction of this backend meanwhile.
        """
        query = f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid"  # noqa: S608
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for row in self._db.execute(query):
                    yield tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
            finally:
                self._db.execute("ROLLBACK")

    def _failure(self, exc: sqlite3.Error) -> StorageError:
        return StorageError(f"registry database {self._path}: {exc}")

    def _rollback(self) -> None:
        """Undo the open transaction; SQLite may already have done so (e.g. disk full)."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed on %s", self._path)


class SqliteTransaction:
    """The registry's reads and writes on SQLite, inside an open transaction
    (a :class:`~talos.registry.backend.Transaction`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- key logs

    def keylog(self, agent_id: str) -> bytes | None:
        return self._blob("SELECT log FROM keylogs WHERE agent_id=?", agent_id)

    def put_keylog(self, agent_id: str, log: bytes, sequence: int, now_ms: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO keylogs VALUES (?, ?, ?, ?)", (agent_id, log, sequence, now_ms)
        )

    # -- prekeys

    def prekey_upload(self, agent_id: str) -> bytes | None:
        return self._blob("SELECT upload FROM prekeys WHERE agent_id=?", agent_id)

    def prekey_sequence(self, agent_id: str) -> int | None:
        return self._int("SELECT sequence FROM prekeys WHERE agent_id=?", agent_id)

    def replace_prekeys(
        self,
        agent_id: str,
        upload: bytes,
        sequence: int,
        now_ms: int,
        one_time: Iterable[tuple[int, bytes]],
    ) -> int:
        db = self._db
        db.execute(
            "INSERT OR REPLACE INTO prekeys VALUES (?, ?, ?, ?)",
            (agent_id, upload, sequence, now_ms),
        )
        db.execute("DELETE FROM one_time_prekeys WHERE agent_id=?", (agent_id,))
        db.executemany(
            _ADD_ONE_TIME_PREKEY,
            [(agent_id, pid, key, agent_id, key) for pid, key in one_time],
        )
        return self.one_time_prekeys_left(agent_id)

    def take_one_time_prekey(self, agent_id: str) -> tuple[int, bytes] | None:
        row = self._db.execute(_TAKE_ONE_TIME_PREKEY, (agent_id,)).fetchone()
        if row is None:
            return None
        prekey = (int(row[0]), bytes(row[1]))
        self._db.execute("INSERT OR IGNORE INTO used_prekeys VALUES (?, ?)", (agent_id, prekey[1]))
        return prekey

    def one_time_prekeys_left(self, agent_id: str) -> int:
        count = self._int("SELECT count(*) FROM one_time_prekeys WHERE agent_id=?", agent_id)
        return count or 0

    # -- peer records

    def record_sequence(self, agent_id: str) -> int | None:
        return self._int("SELECT sequence FROM record_sequences WHERE agent_id=?", agent_id)

    def set_record_sequence(self, agent_id: str, sequence: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO record_sequences VALUES (?, ?)", (agent_id, sequence)
        )

    def prune_records(self, agent_id: str, now_ms: int) -> None:
        self._db.execute(
            "DELETE FROM records WHERE agent_id=? AND expires_ms <= ?", (agent_id, now_ms)
        )

    def activities(self, agent_id: str, now_ms: int) -> list[Activity]:
        rows = self._db.execute(
            "SELECT instance_id, first_sequence, sequence FROM records "
            "WHERE agent_id=? AND expires_ms > ?",
            (agent_id, now_ms),
        ).fetchall()
        return [Activity(bytes(r[0]), int(r[1]), int(r[2])) for r in rows]

    def put_record(self, record: PeerRecord, now_ms: int) -> None:
        self._db.execute(
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
        rows = self._db.execute(_LIVE_INSTANCES, (agent_id, now_ms, _limit(limit))).fetchall()
        return [
            InstanceInfo(
                bytes(r[0]),
                r[1],
                int(r[2]),
                int(r[3]),
                int(r[4]),
                bytes(r[5]),
                int(r[6]),
                int(r[7]),
            )
            for r in rows
        ]

    def duplicated_agents(self, now_ms: int, limit: int | None = None) -> list[str]:
        rows = self._db.execute(_DUPLICATED_AGENTS, {"now": now_ms, "limit": _limit(limit)})
        return [agent for (agent,) in rows.fetchall()]

    def live_counts(self, now_ms: int) -> LiveCounts:
        agents, instances = self._db.execute(
            "SELECT count(DISTINCT agent_id), count(*) FROM records WHERE expires_ms > ?",
            (now_ms,),
        ).fetchone()
        # Duplicated identities are few (each one is an incident): count them here.
        duplicates = self.duplicated_agents(now_ms)
        return LiveCounts(int(agents), int(instances), len(duplicates))

    # -- revocation lists

    def revocation_list(self, issuer: str) -> bytes | None:
        return self._blob("SELECT list FROM revocations WHERE issuer=?", issuer)

    def put_revocation_list(self, issuer: str, data: bytes, version: int, now_ms: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO revocations VALUES (?, ?, ?, ?)",
            (issuer, data, version, now_ms),
        )

    # -- security events

    def add_security_event(self, event: SecurityEvent) -> None:
        self._db.execute(
            "INSERT INTO security_events (at_ms, kind, agent_id, reason, known, offered) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (event.at_ms, event.kind, event.agent_id, event.reason, event.known, event.offered),
        )

    def security_events(self, agent_id: str | None) -> list[SecurityEvent]:
        query = "SELECT at_ms, kind, agent_id, reason, known, offered FROM security_events"
        args: tuple[str, ...] = ()
        if agent_id is not None:
            query += " WHERE agent_id=?"
            args = (agent_id,)
        rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [
            SecurityEvent(
                int(r[0]), r[1], r[2], r[3], None if r[4] is None else bytes(r[4]), bytes(r[5])
            )
            for r in rows
        ]

    # -- housekeeping

    def sweep(self, now_ms: int) -> int:
        """Delete every record expired at ``now_ms``; returns how many."""
        return self._db.execute("DELETE FROM records WHERE expires_ms <= ?", (now_ms,)).rowcount

    def _blob(self, query: str, *args: object) -> bytes | None:
        row = self._db.execute(query, args).fetchone()
        return None if row is None else bytes(row[0])

    def _int(self, query: str, *args: object) -> int | None:
        row = self._db.execute(query, args).fetchone()
        return None if row is None else int(row[0])


def _limit(limit: int | None) -> int:
    """SQLite's ``LIMIT`` for ``limit`` (-1: none)."""
    return -1 if limit is None else limit


def _initialize(db: sqlite3.Connection, path: Path) -> None:
    """WAL mode, full fsync, schema; refuse foreign files and newer schemas.

    Raises:
        StoreCorrupted: not an SQLite database.
        StorageError: a newer schema, or the database failed.
    """
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"registry database {path} has schema {version}; this build knows "
                f"{SCHEMA_VERSION}: upgrade Talos"
            )
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a power cut must not forget that a one-time prekey was handed out.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        _create_or_migrate(db, path)
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):
            raise StorageError(f"cannot open registry database {path}: {exc}") from exc
        raise StoreCorrupted(
            f"{path} is not a registry database: {exc}", where=str(path), what="format"
        ) from exc


def _create_or_migrate(db: sqlite3.Connection, path: Path) -> None:
    """Create the schema, or migrate an older one, in one transaction.

    The version is read again under the write lock, so two processes opening
    the same old file migrate it once.

    Raises:
        StorageError: a newer schema appeared meanwhile.
        sqlite3.DatabaseError: the database failed (rolled back).
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StorageError(f"registry database {path} has schema {version}: upgrade Talos")
        for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
            log.info("migrating registry database %s from schema %d", path, step)
            for statement in MIGRATIONS[step]:
                db.execute(statement)
        for statement in TABLES:
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
