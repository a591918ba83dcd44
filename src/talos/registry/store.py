"""The registry's state: what it stores, under which rules, in one transaction each.

:class:`RegistryStore` is what the API and ``talos registry`` use. Every
write is one check-and-set transaction of its :class:`~.backend.Backend`: it
reads what the agent has stored (its verified key log first), asks
:mod:`talos.registry.admission` whether the submission may pass, and writes,
so two concurrent submissions cannot both pass a check that only one of them
may pass. In particular a one-time prekey is removed in the same transaction
that hands it out, and is remembered as used so that a later upload that
lists it again cannot make the registry hand it out twice.

A submission the rules refuse raises :class:`~.admission.Refused` (kind and
reason, no HTTP status: the API maps it); nothing is written, except the
evidence of a fork (a security event, and the revocation list a fork
keeps), which is committed before the refusal is raised. Database failures
raise :class:`~talos.errors.StorageError`, bytes the store wrote that no
longer decode :class:`~talos.errors.StoreCorrupted`.

The registry is not trusted for keys: it verifies what it stores so that it
serves nothing useless, but clients verify everything again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import MergeOutcome, RevocationList, merge
from talos.core.x3dh import PrekeyBundle
from talos.errors import StoreCorrupted, TalosError
from talos.registry.admission import (
    Refusal,
    Refused,
    admit_keylog,
    admit_prekeys,
    admit_record,
    admit_revocations,
    judge_merge,
)
from talos.registry.backend import (
    Backend,
    DrainShares,
    InstanceInfo,
    LiveCounts,
    SecurityEvent,
    Transaction,
)
from talos.registry.database import is_database_url
from talos.registry.drain import ONE_TIME_PREKEYS_PER_MINUTE
from talos.registry.duplicates import Activity, duplicated, newly_overlapping
from talos.registry.sqlite import SCHEMA_VERSION, SqliteBackend

__all__ = [
    "MAX_LISTED_DUPLICATES",
    "MAX_LISTED_INSTANCES",
    "ONE_TIME_PREKEYS_PER_MINUTE",
    "SCHEMA_VERSION",
    "DuplicateStatus",
    "InstanceInfo",
    "LiveCounts",
    "Refused",
    "RegistryStore",
    "SecurityEvent",
]

#: Most instances listed for one agent in a duplicate report (newest first).
MAX_LISTED_INSTANCES: Final = 1000
#: Most duplicated identities listed at once, and most instances across them.
MAX_LISTED_DUPLICATES: Final = 1000
_MAX_LISTED_TOTAL: Final = 2000
log = logging.getLogger("talos.registry")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class DuplicateStatus:
    """Whether an agent runs as overlapping instances, and its live instances (newest first).

    ``instances`` lists at most :data:`MAX_LISTED_INSTANCES`; ``duplicate``
    considers all of them.
    """

    agent_id: str
    duplicate: bool
    instances: tuple[InstanceInfo, ...]


class RegistryStore:
    """Verified key logs, prekeys, peer records and revocation lists, in a :class:`Backend`.

    Thread-safe as its backend is (the SQLite one is); every operation runs
    in its own transaction.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @classmethod
    def open(cls, database: Path | str) -> RegistryStore:
        """Open (creating or migrating if needed) the registry database: a SQLite file,
        or a PostgreSQL database named by a ``postgresql://`` URL (a ``str``).

        Raises:
            StoreCorrupted: the file or database is not a registry database.
            StorageError: it cannot be opened or reached, or holds a newer schema.
        """
        if is_database_url(database):
            # Imported here: only a registry on PostgreSQL pays for the driver.
            from talos.registry.postgres import PostgresBackend

            return cls(PostgresBackend.open(str(database)))
        return cls(SqliteBackend.open(database))

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def ping(self) -> None:
        """Raises: StorageError: the database cannot be reached now."""
        self._backend.ping()

    def drain_shares(self, per_agent: int) -> DrainShares:
        """The one-time prekey shares of ``per_agent`` a minute, kept where the backend keeps
        them (in memory for SQLite, in the database for PostgreSQL)."""
        return self._backend.drain_shares(per_agent)

    def sweep(self, *, now_ms: int) -> int | None:
        """Delete records expired at ``now_ms``; how many, or ``None`` when another replica
        sweeps. Used prekeys and record sequences (what prevents replays) stay."""
        return self._backend.sweep(now_ms)

    # -- key logs ---------------------------------------------------------------------

    def put_keylog(self, offered: KeyLog, *, now_ms: int) -> bool:
        """Store a verified log, or extend the stored one. Returns whether anything changed.

        Raises:
            Refused: ``offered`` forks the stored log (also recorded as a
                security event) or is a shorter prefix of it (rollback).
        """
        with self._backend.transaction() as tx:
            known = _load_keylog(tx, offered.agent_id)
            if known is not None and known.events == offered.events:
                return False
            refusal = admit_keylog(known, offered)
            if refusal is None:
                tx.put_keylog(offered.agent_id, offered.to_bytes(), offered.state.sequence, now_ms)
                return True
            if known is not None:  # always: admit_keylog refuses only against a stored log
                _record_evidence(tx, refusal, now_ms, offered.agent_id, known.to_bytes(), offered)
        raise Refused(refusal)

    def keylog(self, agent_id: str) -> bytes | None:
        """The stored key log's bytes, or ``None``."""
        with self._backend.transaction() as tx:
            return tx.keylog(agent_id)

    # -- prekeys ----------------------------------------------------------------------

    def put_prekeys(self, upload: PrekeyUpload, *, now_ms: int) -> int:
        """Replace the agent's signed prekey and one-time prekey pool. Returns the pool size.

        One-time prekeys already handed out (by public key) are left out.

        Raises:
            Refused: unknown agent, not the current key, an upload sequence
                not higher than the stored one, or bad signatures.
        """
        agent = upload.agent_id
        with self._backend.transaction() as tx:
            keylog = _load_keylog(tx, agent)
            _refuse(admit_prekeys(upload, keylog, tx.prekey_sequence(agent)))
            return tx.replace_prekeys(
                agent, upload.to_bytes(), upload.sequence, now_ms, upload.one_time_prekeys
            )

    def take_bundle(self, agent_id: str, *, one_time: bool = True) -> PrekeyBundle | None:
        """A bundle with one unused one-time prekey, consumed atomically; ``None`` if unknown.

        The prekey is deleted from the pool and remembered as used in the
        same transaction that returns it: it is handed out once. When the
        pool is empty, or ``one_time`` is false (the caller is rate-limited),
        the bundle carries no one-time prekey and nothing is consumed.

        Raises:
            StorageError: the database failed (nothing was consumed).
        """
        with self._backend.transaction() as tx:
            raw = tx.prekey_upload(agent_id)
            keylog = _load_keylog(tx, agent_id)
            if raw is None or keylog is None:
                return None
            upload = _decode_stored(lambda: PrekeyUpload.from_bytes(raw), "prekeys", agent_id)
            opk = tx.take_one_time_prekey(agent_id) if one_time else None
            return upload.bundle(keylog.state, opk)

    def prekey_status(self, agent_id: str) -> tuple[int, int] | None:
        """(accepted upload sequence, one-time prekeys left), or ``None`` without prekeys."""
        with self._backend.transaction() as tx:
            sequence = tx.prekey_sequence(agent_id)
            if sequence is None:
                return None
            return sequence, tx.one_time_prekeys_left(agent_id)

    def one_time_prekeys_left(self, agent_id: str) -> int:
        """How many one-time prekeys of ``agent_id`` are still to hand out."""
        with self._backend.transaction() as tx:
            return tx.one_time_prekeys_left(agent_id)

    # -- peer records -------------------------------------------------------------------

    def put_record(self, record: PeerRecord, *, now: float) -> tuple[bytes, ...]:
        """Store a peer record signed by the agent's current key, current at ``now``.

        Returns the instance ids this record newly shows running concurrently
        (:func:`~talos.registry.duplicates.newly_overlapping`, logged as a
        ``duplicate_instance`` warning); empty when it reveals nothing new.

        Raises:
            Refused: unknown agent, not the current key, or a sequence not
                above every record accepted for the agent; a bad signature;
                expired or issued in the future beyond the clock skew; a
                sequence or time too large to store.
        """
        now_ms = int(now * 1000)
        agent = record.agent_id
        with self._backend.transaction() as tx:
            keylog = _load_keylog(tx, agent)
            _refuse(admit_record(record, keylog, tx.record_sequence(agent), now=now))
            tx.set_record_sequence(agent, record.sequence)
            tx.prune_records(agent, now_ms)
            others = {a.instance_id: a for a in tx.activities(agent, now_ms)}
            before = others.pop(record.instance_id, None)
            first = record.sequence if before is None else before.first_sequence
            after = Activity(record.instance_id, first, record.sequence)
            tx.put_record(record, now_ms)
            found = newly_overlapping(before, after, others.values())
        if found:
            log.warning(
                "identity %s announced by %d instances at once (split brain): %s",
                agent,
                len(found),
                ", ".join(i.hex() for i in found),
                extra={
                    "event": "duplicate_instance",
                    "peer_id": agent,
                    "instances": [i.hex() for i in found],
                },
            )
        return found

    def instances(self, agent_id: str, *, now_ms: int) -> list[InstanceInfo]:
        """The agent's live (unexpired at ``now_ms``) instances, newest sequence first."""
        with self._backend.transaction() as tx:
            return tx.live_instances(agent_id, now_ms)

    def record(self, agent_id: str, *, now_ms: int) -> bytes | None:
        """The live record with the highest sequence, or ``None``."""
        live = self.instances(agent_id, now_ms=now_ms)
        return live[0].record if live else None

    # -- split brain ------------------------------------------------------------------

    def duplicate_status(self, agent_id: str, *, now_ms: int) -> DuplicateStatus:
        """Whether ``agent_id`` runs as overlapping live instances (:mod:`.duplicates`).

        An agent without live records is not a duplicate and lists no instances.
        """
        with self._backend.transaction() as tx:
            duplicate = duplicated(tx.activities(agent_id, now_ms))
            listed = tx.live_instances(agent_id, now_ms, MAX_LISTED_INSTANCES)
        return DuplicateStatus(agent_id, duplicate, tuple(listed))

    def duplicate_statuses(self, *, now_ms: int) -> tuple[list[DuplicateStatus], bool]:
        """Every duplicated identity, by agent id, and whether the list was cut short.

        At most :data:`MAX_LISTED_DUPLICATES` identities, and no more
        instances in all than keep the answer well under a client's 1 MiB.
        """
        listed: list[DuplicateStatus] = []
        total = 0
        with self._backend.transaction() as tx:
            agents = tx.duplicated_agents(now_ms, MAX_LISTED_DUPLICATES + 1)
            for agent in agents[:MAX_LISTED_DUPLICATES]:
                live = tx.live_instances(agent, now_ms, MAX_LISTED_INSTANCES)
                if total + len(live) > _MAX_LISTED_TOTAL:
                    return listed, True
                total += len(live)
                listed.append(DuplicateStatus(agent, True, tuple(live)))
        return listed, len(agents) > MAX_LISTED_DUPLICATES

    def live_counts(self, *, now_ms: int) -> LiveCounts:
        """Agents and instances with a live record, and identities that are duplicated."""
        with self._backend.transaction() as tx:
            return tx.live_counts(now_ms)

    # -- revocation lists ----------------------------------------------------------------

    def put_revocations(self, offered: RevocationList, *, now_ms: int) -> MergeOutcome:
        """Merge ``offered`` into the issuer's stored list (:func:`~talos.core.revocation.merge`).

        The list merge keeps is stored even when the offer is refused (a fork
        keeps the list that revokes more).

        Raises:
            Refused: unknown issuer, a bad signature, an older version
                (stale), a fork or a list that drops revocations (both
                recorded as security events).
        """
        issuer = offered.issuer
        with self._backend.transaction() as tx:
            _refuse(admit_revocations(offered, _load_keylog(tx, issuer)))
            raw = tx.revocation_list(issuer)
            current = None
            if raw is not None:
                current = _decode_stored(
                    lambda: RevocationList.from_bytes(raw), "revocation list", issuer
                )
            merged = merge(current, offered)
            if merged.changed:
                tx.put_revocation_list(issuer, merged.kept.to_bytes(), merged.kept.version, now_ms)
            refusal = judge_merge(merged)
            if refusal is None:
                return merged.outcome
            # Evidence and the list a fork keeps are committed; the refusal follows.
            _record_evidence(tx, refusal, now_ms, issuer, raw, offered)
        raise Refused(refusal)

    def revocations(self, issuer: str) -> bytes | None:
        """The issuer's stored revocation list, or ``None``."""
        with self._backend.transaction() as tx:
            return tx.revocation_list(issuer)

    # -- security events -------------------------------------------------------------------

    def security_events(self, agent_id: str | None = None) -> list[SecurityEvent]:
        """Recorded forks and append-only violations, oldest first."""
        with self._backend.transaction() as tx:
            return tx.security_events(agent_id)


# -- helpers (all run inside a transaction) ------------------------------------------------


def _refuse(refusal: Refusal | None) -> None:
    """Raises: Refused: ``refusal`` is one (the transaction rolls back)."""
    if refusal is not None:
        raise Refused(refusal)


def _record_evidence(
    tx: Transaction,
    refusal: Refusal,
    now_ms: int,
    agent_id: str,
    known: bytes | None,
    offered: KeyLog | RevocationList,
) -> None:
    """Record ``refusal`` as a security event when it is evidence of one, and log it."""
    kind = refusal.kind.security_event
    if kind is None:
        return
    log.warning(
        "security event %s for %s: %s",
        kind,
        agent_id,
        refusal.reason,
        extra={"event": kind.replace("-", "_"), "peer_id": agent_id, "kind": kind},
    )
    tx.add_security_event(
        SecurityEvent(now_ms, kind, agent_id, refusal.reason, known, offered.to_bytes())
    )


def _decode_stored(decode: Callable[[], _T], what: str, key: str) -> _T:
    """Decode bytes this store wrote; a failure means the database was damaged.

    Raises:
        StoreCorrupted: the stored bytes no longer decode or verify.
    """
    try:
        return decode()
    except TalosError as exc:
        raise StoreCorrupted(
            f"stored {what} of {key} is damaged: {exc}", where=key, what=what
        ) from exc


def _load_keylog(tx: Transaction, agent_id: str) -> KeyLog | None:
    raw = tx.keylog(agent_id)
    if raw is None:
        return None
    return _decode_stored(lambda: KeyLog.from_bytes(raw), "key log", agent_id)
