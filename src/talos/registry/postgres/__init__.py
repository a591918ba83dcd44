"""The registry's PostgreSQL backend, for several replicas sharing one database.

The schema (:mod:`.schema`), start-up and migration (:mod:`.migrate`), the
database (:mod:`.backend`) and one-time prekey shares across replicas
(:mod:`.shares`). Every PostgreSQL statement of the registry lives in this
package; the store reaches it only through
:class:`~talos.registry.backend.Backend`. Design: ``docs/design/registry-postgres.md``.
"""

from __future__ import annotations

from talos.registry.postgres.backend import PostgresBackend
from talos.registry.postgres.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "PostgresBackend"]
