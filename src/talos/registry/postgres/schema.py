"""The registry's PostgreSQL schema and its version steps, as data.

The same tables as :mod:`talos.registry.sqlite.schema` (read its table list),
in PostgreSQL types (``bytea``, ``bigint``), plus:

``drain_shares``   (client, agent) -> a token bucket of one-time prekeys
                   (:mod:`talos.registry.postgres.shares`); agent ``''``
                   is the client's bucket across all agents
``talos_schema``   one row: the schema version of the other tables

A new database gets :data:`TABLES` at :data:`SCHEMA_VERSION`; an older one
runs each step of :data:`MIGRATIONS` from its version up, then
:data:`TABLES` (every statement is ``IF NOT EXISTS``). Replicas starting
together migrate once: :mod:`.migrate` runs all of it in one transaction
holding an advisory lock. To change the schema: bump
:data:`SCHEMA_VERSION`, write the new shape into :data:`TABLES`, add the step
from the previous version to :data:`MIGRATIONS`.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "TABLES", "TABLE_NAMES"]

SCHEMA_VERSION: Final = 1

#: The registry's tables (a database holding one of them without ``talos_schema``
#: is someone else's).
TABLE_NAMES: Final = (
    "keylogs",
    "prekeys",
    "one_time_prekeys",
    "used_prekeys",
    "records",
    "record_sequences",
    "revocations",
    "security_events",
    "drain_shares",
)

#: The whole schema at :data:`SCHEMA_VERSION`, one statement each.
TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS keylogs (
    agent_id text PRIMARY KEY, log bytea NOT NULL, sequence bigint NOT NULL,
    updated_ms bigint NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS prekeys (
    agent_id text PRIMARY KEY, upload bytea NOT NULL, sequence bigint NOT NULL,
    updated_ms bigint NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS one_time_prekeys (
    agent_id text NOT NULL, prekey_id bigint NOT NULL, public_key bytea NOT NULL,
    PRIMARY KEY (agent_id, prekey_id))""",
    """CREATE TABLE IF NOT EXISTS used_prekeys (
    agent_id text NOT NULL, public_key bytea NOT NULL, PRIMARY KEY (agent_id, public_key))""",
    """CREATE TABLE IF NOT EXISTS records (
    agent_id text NOT NULL, instance_id bytea NOT NULL, sequence bigint NOT NULL,
    endpoint text NOT NULL, issued_ms bigint NOT NULL, expires_ms bigint NOT NULL,
    record bytea NOT NULL, first_seen_ms bigint NOT NULL, first_sequence bigint NOT NULL,
    PRIMARY KEY (agent_id, instance_id))""",
    # The gauges count live records at every scrape; the sweep deletes expired ones.
    "CREATE INDEX IF NOT EXISTS records_by_expiry ON records (expires_ms)",
    """CREATE TABLE IF NOT EXISTS record_sequences (
    agent_id text PRIMARY KEY, sequence bigint NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS revocations (
    issuer text PRIMARY KEY, list bytea NOT NULL, version bigint NOT NULL,
    updated_ms bigint NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS security_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at_ms bigint NOT NULL,
    kind text NOT NULL, agent_id text NOT NULL, reason text NOT NULL, known bytea,
    offered bytea NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS security_events_by_agent ON security_events (agent_id, id)",
    """CREATE TABLE IF NOT EXISTS drain_shares (
    client text NOT NULL, agent text NOT NULL, tokens double precision NOT NULL,
    at_s double precision NOT NULL, PRIMARY KEY (client, agent))""",
    "CREATE INDEX IF NOT EXISTS drain_shares_by_time ON drain_shares (at_s)",
)

#: Statements taking a database at schema version ``N`` (the key) to ``N + 1``.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {}
