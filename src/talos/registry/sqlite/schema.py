"""The registry's SQLite schema and its version steps, as data.

Tables:

``keylogs``          agent id -> verified key event log (bytes), its last sequence
``prekeys``          agent id -> the accepted :class:`~talos.core.prekeys.PrekeyUpload`
``one_time_prekeys`` (agent id, prekey id) -> public key: the pool still to hand out
``used_prekeys``     (agent id, public key): every one-time prekey already handed out
``records``          (agent id, instance id) -> the newest peer record of that instance,
                     when and with which sequence the instance was first seen
``record_sequences`` agent id -> the highest peer record sequence ever accepted
``revocations``      issuer -> the revocation list in use
``security_events``  forks and append-only violations, with the offered bytes as evidence

The version lives in ``PRAGMA user_version``. A new file gets :data:`TABLES`
at :data:`SCHEMA_VERSION`; an older one runs each step of :data:`MIGRATIONS`
from its version up, then :data:`TABLES` (every statement is ``IF NOT
EXISTS``, so it only adds what a step did not). To change the schema: bump
:data:`SCHEMA_VERSION`, write the new shape into :data:`TABLES`, and add the
step from the previous version to :data:`MIGRATIONS`; keep a file of the old
version in the tests.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "TABLES"]

SCHEMA_VERSION: Final = 2

#: The whole schema at :data:`SCHEMA_VERSION`, one statement each.
TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS keylogs (
    agent_id TEXT PRIMARY KEY, log BLOB NOT NULL, sequence INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS prekeys (
    agent_id TEXT PRIMARY KEY, upload BLOB NOT NULL, sequence INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS one_time_prekeys (
    agent_id TEXT NOT NULL, prekey_id INTEGER NOT NULL, public_key BLOB NOT NULL,
    PRIMARY KEY (agent_id, prekey_id))""",
    """CREATE TABLE IF NOT EXISTS used_prekeys (
    agent_id TEXT NOT NULL, public_key BLOB NOT NULL, PRIMARY KEY (agent_id, public_key))""",
    """CREATE TABLE IF NOT EXISTS records (
    agent_id TEXT NOT NULL, instance_id BLOB NOT NULL, sequence INTEGER NOT NULL,
    endpoint TEXT NOT NULL, issued_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    record BLOB NOT NULL, first_seen_ms INTEGER NOT NULL, first_sequence INTEGER NOT NULL,
    PRIMARY KEY (agent_id, instance_id))""",
    # The gauges count live records at every scrape.
    "CREATE INDEX IF NOT EXISTS records_by_expiry ON records (expires_ms)",
    """CREATE TABLE IF NOT EXISTS record_sequences (
    agent_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS revocations (
    issuer TEXT PRIMARY KEY, list BLOB NOT NULL, version INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
    agent_id TEXT NOT NULL, reason TEXT NOT NULL, known BLOB, offered BLOB NOT NULL)""",
)

#: Statements taking a database at schema version ``N`` (the key) to ``N + 1``.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    # 1 -> 2: when and with which sequence each instance was first seen. For rows
    # written before, the newest record is the oldest evidence left: the instance
    # was first seen no later than it (it was accepted near its issue time).
    # TABLES then adds the index on expires_ms.
    1: (
        "ALTER TABLE records ADD COLUMN first_seen_ms INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE records ADD COLUMN first_sequence INTEGER NOT NULL DEFAULT 0",
        "UPDATE records SET first_seen_ms = issued_ms, first_sequence = sequence",
    ),
}
