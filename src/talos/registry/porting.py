"""Moving a registry from its SQLite file to PostgreSQL (``talos registry port-db``).

Every table of the SQLite schema is copied as it is into an empty
PostgreSQL registry database, in one PostgreSQL transaction, and the row
count of every table is compared before that transaction commits: a copy
that lost or gained a row is rolled back and reported. The SQLite file is
only read. Drain shares are not copied (they live a minute).

Stop the SQLite registry first: a bundle served during the copy would be
served again by the new database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from talos.errors import StorageError
from talos.registry.database import is_database_url, redacted

__all__ = ["PORTED_TABLES", "PortReport", "port_database"]

#: Table -> the columns copied, in the order both schemas share.
PORTED_TABLES: Final[dict[str, tuple[str, ...]]] = {
    "keylogs": ("agent_id", "log", "sequence", "updated_ms"),
    "prekeys": ("agent_id", "upload", "sequence", "updated_ms"),
    "one_time_prekeys": ("agent_id", "prekey_id", "public_key"),
    "used_prekeys": ("agent_id", "public_key"),
    "records": (
        "agent_id",
        "instance_id",
        "sequence",
        "endpoint",
        "issued_ms",
        "expires_ms",
        "record",
        "first_seen_ms",
        "first_sequence",
    ),
    "record_sequences": ("agent_id", "sequence"),
    "revocations": ("issuer", "list", "version", "updated_ms"),
    # Without the id: PostgreSQL numbers them again, in the same order.
    "security_events": ("at_ms", "kind", "agent_id", "reason", "known", "offered"),
}


@dataclass(frozen=True, slots=True)
class PortReport:
    """Rows copied per table (equal in both databases)."""

    rows: dict[str, int]


def port_database(source: Path, target: str) -> PortReport:
    """Copy the SQLite registry ``source`` into the empty PostgreSQL registry ``target``.

    Raises:
        StorageError: ``target`` is not a ``postgresql://`` URL, cannot be
            reached, holds registry data already, or the counts differ after
            the copy (nothing is committed then).
        StoreCorrupted: ``source`` is not a registry database.
    """
    if not is_database_url(target):
        raise StorageError(f"{redacted(target)} is not a postgresql:// URL")
    if not source.is_file():
        raise StorageError(f"no registry database at {source}")
    from talos.registry.postgres import PostgresBackend
    from talos.registry.sqlite import SqliteBackend

    reader = SqliteBackend.open(source)
    try:
        writer = PostgresBackend.open(target, pool_size=1)
        try:
            counts = writer.load(reader, PORTED_TABLES)
        finally:
            writer.close()
    finally:
        reader.close()
    return PortReport(counts)
