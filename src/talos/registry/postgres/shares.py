"""One-time prekey shares kept in PostgreSQL, so that they hold across replicas.

The same two token buckets as :class:`talos.registry.drain.PrekeyLimiter`
(``per_agent`` per minute of each agent, ten times that across all agents),
one row each in ``drain_shares``, updated by one conditional upsert: the
bucket is refilled for the time passed and a token taken only if one is
there, atomically, whichever replica the client reaches. Time is the wall
clock (replicas share no monotonic clock); a clock that steps back refills
nothing. Buckets idle long enough to be full again carry no information and
are deleted by the sweep (:data:`~talos.registry.drain.REFILL_SECONDS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import psycopg

from talos.core.clock import Clock
from talos.registry.drain import ACROSS_AGENTS, REFILL_SECONDS

if TYPE_CHECKING:
    from talos.registry.postgres.backend import PostgresBackend

__all__ = ["PostgresShares"]

_TAKE: Final = """
INSERT INTO drain_shares AS b (client, agent, tokens, at_s)
VALUES (%(c)s, %(a)s, %(burst)s - 1, %(now)s)
ON CONFLICT (client, agent) DO UPDATE SET
    tokens = LEAST(%(burst)s, b.tokens + GREATEST(0, %(now)s - b.at_s) * %(rate)s) - 1,
    at_s = GREATEST(b.at_s, %(now)s)
WHERE LEAST(%(burst)s, b.tokens + GREATEST(0, %(now)s - b.at_s) * %(rate)s) >= 1
RETURNING tokens
"""


class PostgresShares:
    """How many one-time prekeys a client may take, counted in the database
    (a :class:`~talos.registry.backend.DrainShares`)."""

    def __init__(self, backend: PostgresBackend, per_agent: int) -> None:
        self._backend = backend
        self._per_agent = float(per_agent)

    def allow(self, client: str, agent: str, clock: Clock) -> bool:
        """Take one of ``agent``'s one-time prekeys for ``client`` now, if its shares allow.

        Raises:
            StorageError: the database failed.
        """
        now = clock.time()
        per_agent = self._per_agent
        with self._backend.transaction() as tx:
            conn = tx.connection
            if not _take(conn, client, "", ACROSS_AGENTS * per_agent, now):
                return False
            return _take(conn, client, agent, per_agent, now)

    def forget(self, client: str, agent: str) -> None:
        """Drop the (client, agent) bucket: ``agent`` turned out to be unknown."""
        with self._backend.transaction() as tx:
            tx.connection.execute(
                "DELETE FROM drain_shares WHERE client=%s AND agent=%s", (client, agent)
            )

    @staticmethod
    def sweep(conn: psycopg.Connection[tuple[Any, ...]], now: float) -> None:
        """Delete the buckets that are full again (they would allow a whole burst)."""
        conn.execute("DELETE FROM drain_shares WHERE at_s < %s", (now - REFILL_SECONDS,))


def _take(
    conn: psycopg.Connection[tuple[Any, ...]], client: str, agent: str, burst: float, now: float
) -> bool:
    args = {"c": client, "a": agent, "burst": burst, "rate": burst / REFILL_SECONDS, "now": now}
    return conn.execute(_TAKE, args).fetchone() is not None
