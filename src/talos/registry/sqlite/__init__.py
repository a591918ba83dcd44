"""The registry's SQLite backend: the schema (:mod:`.schema`) and the database (:mod:`.backend`).

Every SQLite-specific statement of the registry lives in this package; the
store reaches it only through :class:`~talos.registry.backend.Backend`.
"""

from __future__ import annotations

from talos.registry.sqlite.backend import SqliteBackend
from talos.registry.sqlite.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SqliteBackend"]
