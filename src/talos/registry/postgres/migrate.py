"""Reaching the registry's PostgreSQL database and bringing its schema to this build's.

:func:`connect` turns every way of failing to reach the database (a wrong
host or port, a refused login, a missing database, a malformed URL) into one
:class:`~talos.errors.StorageError` whose message names the database without
its password. :func:`create_or_migrate` runs in one transaction that first
takes an advisory lock, so replicas starting together on an empty database
create its tables once, and replicas of an older build leave a newer schema
alone (they refuse to start).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import psycopg

from talos.errors import StorageError, StoreCorrupted
from talos.registry.database import redacted
from talos.registry.postgres.schema import MIGRATIONS, SCHEMA_VERSION, TABLE_NAMES, TABLES

__all__ = ["MIGRATION_LOCK", "connect", "create_or_migrate", "schema_version"]

log = logging.getLogger("talos.registry")

#: Advisory lock key (``pg_advisory_xact_lock(int, int)``) held while creating or migrating.
MIGRATION_LOCK: Final = 0x7A104
CONNECT_TIMEOUT: Final = 5


def connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    """One connection to ``url`` (not from the pool: for start-up and tools).

    Raises:
        StorageError: the database cannot be reached or refuses the connection.
    """
    try:
        return psycopg.connect(
            url, connect_timeout=CONNECT_TIMEOUT, application_name="talos-registry"
        )
    except psycopg.Error as exc:
        raise StorageError(
            f"cannot connect to registry database {redacted(url)}: {_first_line(exc)}"
        ) from exc


def schema_version(conn: psycopg.Connection[tuple[Any, ...]]) -> int | None:
    """The registry schema version of the database, ``None`` when it has none."""
    present = conn.execute("SELECT to_regclass('talos_schema') IS NOT NULL").fetchone()
    if present is None or not present[0]:
        return None
    row = conn.execute("SELECT version FROM talos_schema").fetchone()
    return None if row is None else int(row[0])


def create_or_migrate(conn: psycopg.Connection[tuple[Any, ...]], url: str) -> None:
    """Create the schema in an empty database, or migrate an older one, in one transaction.

    Raises:
        StorageError: the database holds a newer schema, or failed.
        StoreCorrupted: the database holds tables named like the registry's
            but no registry schema version (another application's).
    """
    where = redacted(url)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (MIGRATION_LOCK,))
            version = schema_version(conn)
            if version is None:
                _refuse_foreign_tables(conn, where)
            elif version > SCHEMA_VERSION:
                raise StorageError(
                    f"registry database {where} has schema {version}; this build knows "
                    f"{SCHEMA_VERSION}: upgrade Talos"
                )
            elif version < 1:
                raise StoreCorrupted(
                    f"registry database {where} has schema version {version}",
                    where=where,
                    what="schema version",
                )
            _apply(conn, version, where)
    except psycopg.Error as exc:
        raise StorageError(f"registry database {where}: {_first_line(exc)}") from exc


def _apply(conn: psycopg.Connection[tuple[Any, ...]], version: int | None, where: str) -> None:
    for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
        log.info("migrating registry database %s from schema %d", where, step)
        for statement in MIGRATIONS[step]:
            conn.execute(statement)
    for statement in TABLES:
        conn.execute(statement)
    if version is None:
        conn.execute("CREATE TABLE talos_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO talos_schema VALUES (%s)", (SCHEMA_VERSION,))
        log.info("created the registry schema %d in %s", SCHEMA_VERSION, where)
    elif version != SCHEMA_VERSION:
        conn.execute("UPDATE talos_schema SET version=%s", (SCHEMA_VERSION,))


def _refuse_foreign_tables(conn: psycopg.Connection[tuple[Any, ...]], where: str) -> None:
    """Raises: StoreCorrupted: a table of ours exists without our version table."""
    for name in TABLE_NAMES:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
        if row is not None and row[0]:
            raise StoreCorrupted(
                f"database {where} has a table {name!r} but no registry schema version: "
                "it is not a registry database",
                where=where,
                what="schema",
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
