"""The database interface of the registry: what a backend must provide, and its rows.

:class:`~talos.registry.store.RegistryStore` speaks only to a
:class:`Backend`; SQLite (:mod:`talos.registry.sqlite`) is the one there is.
A second backend (PostgreSQL, for several replicas) implements the same two
protocols next to it and is handed to ``RegistryStore(backend)``.

What every backend must guarantee:

1. **Check-and-set.** Everything read and written through one
   :meth:`Backend.transaction` is atomic with respect to every other
   transaction, also from other processes sharing the database: what the
   store read is still true when it writes. SQLite takes its write lock up
   front (``BEGIN IMMEDIATE``); PostgreSQL would lock the rows it reads
   (``SELECT ... FOR UPDATE``) or run serializable transactions and retry.
2. **Commit or nothing.** Leaving the ``with`` block normally commits; an
   exception rolls back and propagates. Durable on commit: a one-time prekey
   handed out is never handed out again, even after a power cut.
3. **One kind of failure.** A database failure, on open, inside a
   transaction or on commit, raises :class:`~talos.errors.StorageError`; a
   file or database that is not a registry raises
   :class:`~talos.errors.StoreCorrupted`. Driver exceptions never escape.
4. **Thread-safe.** The store is called from a thread pool.

Backends store bytes and integers; decoding and every rule are the store's
and :mod:`talos.registry.admission`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from talos.core.clock import Clock
from talos.core.peer_record import PeerRecord
from talos.registry.duplicates import Activity

__all__ = ["Backend", "DrainShares", "InstanceInfo", "LiveCounts", "SecurityEvent", "Transaction"]


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """One live instance of an agent, as its newest peer record announces it.

    ``first_seen_ms`` (the registry's clock) and ``first_sequence`` describe
    the first record accepted from the instance.
    """

    instance_id: bytes
    endpoint: str
    sequence: int
    issued_ms: int
    expires_ms: int
    record: bytes
    first_seen_ms: int = 0
    first_sequence: int = 0


@dataclass(frozen=True, slots=True)
class LiveCounts:
    """What the registry's gauges show: agents and instances with a live record."""

    agents: int
    instances: int
    duplicate_identities: int


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """Evidence of a fork (key log or revocation list) or an append-only violation."""

    at_ms: int
    kind: str
    agent_id: str
    reason: str
    known: bytes | None
    offered: bytes


class Transaction(Protocol):
    """Reads and writes inside one check-and-set transaction (guarantee 1).

    "Live" means unexpired at ``now_ms``: ``expires_ms > now_ms``. A
    ``limit`` of ``None`` means all.
    """

    # -- key logs
    def keylog(self, agent_id: str) -> bytes | None: ...

    def put_keylog(self, agent_id: str, log: bytes, sequence: int, now_ms: int) -> None: ...

    # -- prekeys
    def prekey_upload(self, agent_id: str) -> bytes | None: ...

    def prekey_sequence(self, agent_id: str) -> int | None: ...

    def replace_prekeys(
        self,
        agent_id: str,
        upload: bytes,
        sequence: int,
        now_ms: int,
        one_time: Iterable[tuple[int, bytes]],
    ) -> int:
        """Store the upload and make ``one_time`` the pool, leaving out public keys
        already handed out. Returns the pool size."""
        ...

    def take_one_time_prekey(self, agent_id: str) -> tuple[int, bytes] | None:
        """Remove the lowest-id one-time prekey from the pool, remember its public
        key as handed out, and return (prekey id, public key); ``None``: pool empty."""
        ...

    def one_time_prekeys_left(self, agent_id: str) -> int: ...

    # -- peer records
    def record_sequence(self, agent_id: str) -> int | None:
        """The highest record sequence ever accepted for the agent (kept after pruning)."""
        ...

    def set_record_sequence(self, agent_id: str, sequence: int) -> None: ...

    def prune_records(self, agent_id: str, now_ms: int) -> None:
        """Delete the agent's expired records."""
        ...

    def activities(self, agent_id: str, now_ms: int) -> list[Activity]:
        """What split-brain detection needs of the agent's live instances."""
        ...

    def put_record(self, record: PeerRecord, now_ms: int) -> None:
        """Store ``record`` as its instance's newest; a new instance is first seen now,
        with this record's sequence, and an instance's first sighting never changes."""
        ...

    def live_instances(
        self, agent_id: str, now_ms: int, limit: int | None = None
    ) -> list[InstanceInfo]:
        """The agent's live instances, newest sequence first."""
        ...

    def duplicated_agents(self, now_ms: int, limit: int | None = None) -> list[str]:
        """Agents with two overlapping live instances, by agent id.

        The same rule as :func:`talos.registry.duplicates.duplicated`, in work
        linear in the live records (an agent decides how many instances it
        announces).
        """
        ...

    def live_counts(self, now_ms: int) -> LiveCounts: ...

    # -- revocation lists
    def revocation_list(self, issuer: str) -> bytes | None: ...

    def put_revocation_list(self, issuer: str, data: bytes, version: int, now_ms: int) -> None: ...

    # -- security events
    def add_security_event(self, event: SecurityEvent) -> None: ...

    def security_events(self, agent_id: str | None) -> list[SecurityEvent]:
        """Recorded events, oldest first; all agents' when ``agent_id`` is ``None``."""
        ...


class DrainShares(Protocol):
    """How many one-time prekeys each client address may take (:mod:`talos.registry.drain`).

    Where the shares are kept is the backend's choice: one process may keep
    them in memory; replicas sharing a database must share them too, or a
    client reaching N replicas gets N shares.
    """

    def allow(self, client: str, agent: str, clock: Clock) -> bool:
        """Take one of ``agent``'s one-time prekeys for ``client`` now, if its shares allow.

        Raises:
            StorageError: the database keeping the shares failed.
        """
        ...

    def forget(self, client: str, agent: str) -> None:
        """Drop the (client, agent) bucket: ``agent`` turned out to be unknown."""
        ...


class Backend(Protocol):
    """A database holding the registry's state (guarantees 1 to 4)."""

    def ping(self) -> None:
        """Check that the database answers now (one trivial transaction).

        Raises:
            StorageError: it does not.
        """
        ...

    def drain_shares(self, per_agent: int) -> DrainShares:
        """Where this backend keeps the one-time prekey shares of ``per_agent`` a minute."""
        ...

    def sweep(self, now_ms: int) -> int | None:
        """Delete records expired at ``now_ms`` (and other state that expired); returns
        how many records, or ``None`` when another process sweeps right now.

        Never deletes what prevents replays: used prekeys and record sequences.
        """
        ...

    def transaction(self) -> AbstractContextManager[Transaction]:
        """One check-and-set transaction: committed when the block ends, rolled back
        when it raises."""
        ...

    def close(self) -> None: ...
