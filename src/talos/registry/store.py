"""The registry's persistent state: SQLite (stdlib ``sqlite3``) in WAL mode.

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

Every write is one check-and-set transaction (``BEGIN IMMEDIATE``): it reads
the agent's verified key log, verifies the submission against it, checks the
sequence rules and writes, so two concurrent submissions cannot both pass a
check that only one of them may pass. In particular a one-time prekey is
removed in the same transaction that hands it out, and is remembered in
``used_prekeys`` so that a later upload that lists it again cannot make the
registry hand it out twice.

Schema version 2 added ``records.first_seen_ms`` and ``records.first_sequence``
(split-brain detection, :mod:`talos.registry.duplicates`); a version 1 file is
migrated when it is opened, in one transaction.

Submissions are refused with :class:`Refused` (a status, a kind and a
reason), which the API turns into a 4xx answer; it never leaves the server.
Database failures raise :class:`~talos.errors.StorageError`.

The registry is not trusted for keys: it verifies what it stores so that it
serves nothing useless, but clients verify everything again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import MergeOutcome, RevocationList, merge
from talos.core.x3dh import PrekeyBundle
from talos.errors import (
    KeyLogInvalid,
    SignatureInvalid,
    StaleMessage,
    StorageError,
    StoreCorrupted,
    TalosError,
)
from talos.registry.duplicates import Activity, duplicated, newly_overlapping

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

#: One-time prekeys of one agent that one client address may take per minute
#: (and in a burst); the server hands out bundles without one past that. An
#: agent opening sessions to many peers takes one prekey per peer.
ONE_TIME_PREKEYS_PER_MINUTE = 20

SCHEMA_VERSION: Final = 2
#: Most instances listed for one agent in a duplicate report (newest first).
MAX_LISTED_INSTANCES: Final = 1000
#: Most duplicated identities listed at once, and most instances across them.
MAX_LISTED_DUPLICATES: Final = 1000
_MAX_LISTED_TOTAL: Final = 2000
#: SQLite integers are signed 64-bit; record fields are unsigned 64-bit.
_MAX_SQL_INT: Final = 2**63 - 1
log = logging.getLogger("talos.registry")
_T = TypeVar("_T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS keylogs (
    agent_id TEXT PRIMARY KEY, log BLOB NOT NULL, sequence INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS prekeys (
    agent_id TEXT PRIMARY KEY, upload BLOB NOT NULL, sequence INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS one_time_prekeys (
    agent_id TEXT NOT NULL, prekey_id INTEGER NOT NULL, public_key BLOB NOT NULL,
    PRIMARY KEY (agent_id, prekey_id));
CREATE TABLE IF NOT EXISTS used_prekeys (
    agent_id TEXT NOT NULL, public_key BLOB NOT NULL, PRIMARY KEY (agent_id, public_key));
CREATE TABLE IF NOT EXISTS records (
    agent_id TEXT NOT NULL, instance_id BLOB NOT NULL, sequence INTEGER NOT NULL,
    endpoint TEXT NOT NULL, issued_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    record BLOB NOT NULL, first_seen_ms INTEGER NOT NULL, first_sequence INTEGER NOT NULL,
    PRIMARY KEY (agent_id, instance_id));
CREATE INDEX IF NOT EXISTS records_by_expiry ON records (expires_ms);
CREATE TABLE IF NOT EXISTS record_sequences (
    agent_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (
    issuer TEXT PRIMARY KEY, list BLOB NOT NULL, version INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
    agent_id TEXT NOT NULL, reason TEXT NOT NULL, known BLOB, offered BLOB NOT NULL);
"""

#: Statements taking a database at schema version ``N`` (the key) to ``N + 1``.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    # 1 -> 2: when and with which sequence each instance was first seen. For rows
    # written before, the newest record is the oldest evidence left: the instance
    # was first seen no later than it (it was accepted near its issue time).
    1: (
        "ALTER TABLE records ADD COLUMN first_seen_ms INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE records ADD COLUMN first_sequence INTEGER NOT NULL DEFAULT 0",
        "UPDATE records SET first_seen_ms = issued_ms, first_sequence = sequence",
    ),
}

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


class Refused(Exception):
    """A submission the registry will not store; becomes a 4xx answer, never escapes.

    ``kind`` names the Talos exception or the rule that refused it (for the
    ``error`` field of the answer); ``reason`` is for humans.
    """

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.kind = kind
        self.reason = reason


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
class DuplicateStatus:
    """Whether an agent runs as overlapping instances, and its live instances (newest first).

    ``instances`` lists at most :data:`MAX_LISTED_INSTANCES`; ``duplicate``
    considers all of them.
    """

    agent_id: str
    duplicate: bool
    instances: tuple[InstanceInfo, ...]


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


class RegistryStore:
    """Verified key logs, prekeys, peer records and revocation lists in one SQLite file.

    Thread-safe: one connection guarded by a lock (SQLite serializes writers
    anyway), every operation in its own transaction.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> RegistryStore:
        """Open (creating if needed) the registry database at ``path``.

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

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back otherwise.

        Raises:
            StorageError: the database failed.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"registry database {self._path}: {exc}") from exc
            try:
                yield self._db
            except BaseException:
                self._rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StorageError(f"registry database {self._path}: {exc}") from exc

    def _rollback(self) -> None:
        """Undo the open transaction; SQLite may already have done so (e.g. disk full)."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed on %s", self._path)

    def _run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``operation`` in a transaction, translating SQLite failures.

        Raises:
            StorageError: the database failed.
            Refused: ``operation`` refused the submission (nothing was written).
        """
        try:
            with self._transaction() as db:
                return operation(db)
        except sqlite3.Error as exc:
            raise StorageError(f"registry database {self._path}: {exc}") from exc

    # -- key logs ---------------------------------------------------------------------

    def put_keylog(self, offered: KeyLog, *, now_ms: int) -> bool:
        """Store a verified log, or extend the stored one. Returns whether anything changed.

        Raises:
            Refused: 409 when ``offered`` forks the stored log (also recorded
                as a security event) or is a shorter prefix of it (rollback).
        """

        def operation(db: sqlite3.Connection) -> bool:
            known = _load_keylog(db, offered.agent_id)
            if known is not None:
                if known.events == offered.events:
                    return False
                _check_extends(db, known, offered, now_ms)
            db.execute(
                "INSERT OR REPLACE INTO keylogs VALUES (?, ?, ?, ?)",
                (offered.agent_id, offered.to_bytes(), offered.state.sequence, now_ms),
            )
            return True

        return self._run_recording(operation)

    def keylog(self, agent_id: str) -> bytes | None:
        """The stored key log's bytes, or ``None``."""
        return self._run(lambda db: _blob(db, "SELECT log FROM keylogs WHERE agent_id=?", agent_id))

    # -- prekeys ----------------------------------------------------------------------

    def put_prekeys(self, upload: PrekeyUpload, *, now_ms: int) -> int:
        """Replace the agent's signed prekey and one-time prekey pool. Returns the pool size.

        One-time prekeys already handed out (by public key) are left out.

        Raises:
            Refused: 409 unknown agent, not the current key, or an upload
                sequence not higher than the stored one; 403 bad signatures.
        """

        def operation(db: sqlite3.Connection) -> int:
            log = _require_keylog(db, upload.agent_id)
            if upload.key_sequence != log.state.sequence:
                raise Refused(
                    409,
                    "NotCurrentKey",
                    f"prekeys are signed with key sequence {upload.key_sequence}, "
                    f"the current key is {log.state.sequence}",
                )
            _verified(lambda: upload.verify(IssuerKeys([log])))
            _verified(lambda: _check_signed_prekey(upload, log))
            stored = _int(db, "SELECT sequence FROM prekeys WHERE agent_id=?", upload.agent_id)
            if stored is not None and upload.sequence <= stored:
                raise Refused(
                    409,
                    "StaleSequence",
                    f"prekey upload sequence {upload.sequence} is not above {stored}",
                )
            agent = upload.agent_id
            db.execute(
                "INSERT OR REPLACE INTO prekeys VALUES (?, ?, ?, ?)",
                (agent, upload.to_bytes(), upload.sequence, now_ms),
            )
            db.execute("DELETE FROM one_time_prekeys WHERE agent_id=?", (agent,))
            db.executemany(
                "INSERT INTO one_time_prekeys SELECT ?, ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM used_prekeys WHERE agent_id=? AND public_key=?)",
                [(agent, pid, key, agent, key) for pid, key in upload.one_time_prekeys],
            )
            count = db.execute(
                "SELECT count(*) FROM one_time_prekeys WHERE agent_id=?", (agent,)
            ).fetchone()
            return int(count[0])

        return self._run(operation)

    def take_bundle(self, agent_id: str, *, one_time: bool = True) -> PrekeyBundle | None:
        """A bundle with one unused one-time prekey, consumed atomically; ``None`` if unknown.

        The prekey is deleted from the pool and remembered as used in the
        same transaction that returns it: it is handed out once. When the
        pool is empty, or ``one_time`` is false (the caller is rate-limited),
        the bundle carries no one-time prekey and nothing is consumed.

        Raises:
            StorageError: the database failed (nothing was consumed).
        """

        def operation(db: sqlite3.Connection) -> PrekeyBundle | None:
            raw = _blob(db, "SELECT upload FROM prekeys WHERE agent_id=?", agent_id)
            log = _load_keylog(db, agent_id)
            if raw is None or log is None:
                return None
            upload = _decode_stored(lambda: PrekeyUpload.from_bytes(raw), "prekeys", agent_id)
            if not one_time:
                return upload.bundle(log.state, None)
            row = db.execute(
                "DELETE FROM one_time_prekeys WHERE rowid = (SELECT rowid FROM one_time_prekeys "
                "WHERE agent_id=? ORDER BY prekey_id LIMIT 1) RETURNING prekey_id, public_key",
                (agent_id,),
            ).fetchone()
            opk = None
            if row is not None:
                opk = (int(row[0]), bytes(row[1]))
                db.execute("INSERT OR IGNORE INTO used_prekeys VALUES (?, ?)", (agent_id, opk[1]))
            return upload.bundle(log.state, opk)

        return self._run(operation)

    def prekey_status(self, agent_id: str) -> tuple[int, int] | None:
        """(accepted upload sequence, one-time prekeys left), or ``None`` without prekeys."""

        def operation(db: sqlite3.Connection) -> tuple[int, int] | None:
            sequence = _int(db, "SELECT sequence FROM prekeys WHERE agent_id=?", agent_id)
            if sequence is None:
                return None
            left = _int(db, "SELECT count(*) FROM one_time_prekeys WHERE agent_id=?", agent_id)
            return sequence, left or 0

        return self._run(operation)

    def one_time_prekeys_left(self, agent_id: str) -> int:
        """How many one-time prekeys of ``agent_id`` are still to hand out."""
        count = self._run(
            lambda db: _int(db, "SELECT count(*) FROM one_time_prekeys WHERE agent_id=?", agent_id)
        )
        return count or 0

    # -- peer records -------------------------------------------------------------------

    def put_record(self, record: PeerRecord, *, now: float) -> tuple[bytes, ...]:
        """Store a peer record signed by the agent's current key, current at ``now``.

        Returns the instance ids this record newly shows running concurrently
        (:func:`~talos.registry.duplicates.newly_overlapping`, logged as a
        ``duplicate_instance`` warning); empty when it reveals nothing new.

        Raises:
            Refused: 409 unknown agent, not the current key, or a sequence not
                above every record accepted for the agent; 403 bad signature;
                422 expired or issued in the future beyond the clock skew;
                400 a sequence or time too large to store.
        """
        now_ms = int(now * 1000)

        def operation(db: sqlite3.Connection) -> tuple[bytes, ...]:
            log = _require_keylog(db, record.agent_id)
            if record.key_sequence != log.state.sequence:
                raise Refused(
                    409,
                    "NotCurrentKey",
                    f"record is signed with key sequence {record.key_sequence}, "
                    f"the current key is {log.state.sequence}",
                )
            _verified(lambda: record.verify(IssuerKeys([log]), now=now))
            if record.expires_ms <= now_ms:
                # Within the clock-skew tolerance for peers, but never served: refuse.
                raise Refused(422, "StaleMessage", f"peer record of {record.agent_id} expired")
            if max(record.sequence, record.expires_ms) > _MAX_SQL_INT:
                raise Refused(400, "MalformedFrame", "record sequence or expiry beyond 2**63 - 1")
            agent = record.agent_id
            best = _int(db, "SELECT sequence FROM record_sequences WHERE agent_id=?", agent)
            if best is not None and record.sequence <= best:
                raise Refused(
                    409, "StaleSequence", f"record sequence {record.sequence} is not above {best}"
                )
            db.execute(
                "INSERT OR REPLACE INTO record_sequences VALUES (?, ?)", (agent, record.sequence)
            )
            db.execute("DELETE FROM records WHERE agent_id=? AND expires_ms <= ?", (agent, now_ms))
            others = _activities(db, agent, now_ms)
            before = others.pop(record.instance_id, None)
            first = record.sequence if before is None else before.first_sequence
            after = Activity(record.instance_id, first, record.sequence)
            db.execute(
                _PUT_RECORD,
                (
                    agent,
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
            return newly_overlapping(before, after, others.values())

        found = self._run(operation)
        if found:
            log.warning(
                "identity %s announced by %d instances at once (split brain): %s",
                record.agent_id,
                len(found),
                ", ".join(i.hex() for i in found),
                extra={
                    "event": "duplicate_instance",
                    "peer_id": record.agent_id,
                    "instances": [i.hex() for i in found],
                },
            )
        return found

    def instances(self, agent_id: str, *, now_ms: int) -> list[InstanceInfo]:
        """The agent's live (unexpired at ``now_ms``) instances, newest sequence first."""
        return self._run(lambda db: _live_instances(db, agent_id, now_ms))

    # -- split brain ------------------------------------------------------------------

    def duplicate_status(self, agent_id: str, *, now_ms: int) -> DuplicateStatus:
        """Whether ``agent_id`` runs as overlapping live instances (:mod:`.duplicates`).

        An agent without live records is not a duplicate and lists no instances.
        """

        def operation(db: sqlite3.Connection) -> DuplicateStatus:
            duplicate = duplicated(_activities(db, agent_id, now_ms).values())
            listed = _live_instances(db, agent_id, now_ms, MAX_LISTED_INSTANCES)
            return DuplicateStatus(agent_id, duplicate, tuple(listed))

        return self._run(operation)

    def duplicate_statuses(self, *, now_ms: int) -> tuple[list[DuplicateStatus], bool]:
        """Every duplicated identity, by agent id, and whether the list was cut short.

        At most :data:`MAX_LISTED_DUPLICATES` identities, and no more
        instances in all than keep the answer well under a client's 1 MiB.
        """

        def operation(db: sqlite3.Connection) -> tuple[list[DuplicateStatus], bool]:
            agents = db.execute(
                _DUPLICATED_AGENTS, {"now": now_ms, "limit": MAX_LISTED_DUPLICATES + 1}
            ).fetchall()
            listed: list[DuplicateStatus] = []
            total = 0
            for (agent,) in agents[:MAX_LISTED_DUPLICATES]:
                live = _live_instances(db, agent, now_ms, MAX_LISTED_INSTANCES)
                if total + len(live) > _MAX_LISTED_TOTAL:
                    return listed, True
                total += len(live)
                listed.append(DuplicateStatus(agent, True, tuple(live)))
            return listed, len(agents) > MAX_LISTED_DUPLICATES

        return self._run(operation)

    def live_counts(self, *, now_ms: int) -> LiveCounts:
        """Agents and instances with a live record, and identities that are duplicated."""

        def operation(db: sqlite3.Connection) -> LiveCounts:
            agents, instances = db.execute(
                "SELECT count(DISTINCT agent_id), count(*) FROM records WHERE expires_ms > ?",
                (now_ms,),
            ).fetchone()
            # Duplicated identities are few (each one is an incident): count them here.
            duplicates = db.execute(_DUPLICATED_AGENTS, {"now": now_ms, "limit": -1}).fetchall()
            return LiveCounts(int(agents), int(instances), len(duplicates))

        return self._run(operation)

    def record(self, agent_id: str, *, now_ms: int) -> bytes | None:
        """The live record with the highest sequence, or ``None``."""
        live = self.instances(agent_id, now_ms=now_ms)
        return live[0].record if live else None

    # -- revocation lists ----------------------------------------------------------------

    def put_revocations(self, offered: RevocationList, *, now_ms: int) -> MergeOutcome:
        """Merge ``offered`` into the issuer's stored list (:func:`~talos.core.revocation.merge`).

        The list merge keeps is stored even when the offer is refused (a fork
        keeps the list that revokes more).

        Raises:
            Refused: 409 unknown issuer, an older version (stale), a fork or
                a list that drops revocations (both recorded as security
                events); 403 a bad signature.
        """

        def operation(db: sqlite3.Connection) -> MergeOutcome:
            log = _require_keylog(db, offered.issuer)
            _verified(lambda: offered.verify_signature(IssuerKeys([log])))
            raw = _blob(db, "SELECT list FROM revocations WHERE issuer=?", offered.issuer)
            current = None
            if raw is not None:
                current = _decode_stored(
                    lambda: RevocationList.from_bytes(raw), "revocation list", offered.issuer
                )
            result = merge(current, offered)
            if result.changed:
                db.execute(
                    "INSERT OR REPLACE INTO revocations VALUES (?, ?, ?, ?)",
                    (offered.issuer, result.kept.to_bytes(), result.kept.version, now_ms),
                )
            if result.security_event:
                reason = _REVOCATION_REASONS[result.outcome]
                _record_event(
                    db,
                    now_ms,
                    "revocation-" + result.outcome.value,
                    offered.issuer,
                    reason,
                    raw,
                    offered.to_bytes(),
                )
                raise _Deferred(Refused(409, _REVOCATION_KINDS[result.outcome], reason))
            if result.outcome is MergeOutcome.OLDER:
                raise Refused(
                    409,
                    "StaleSequence",
                    f"revocation list version {offered.version} is older than the stored "
                    f"version {result.kept.version}",
                )
            return result.outcome

        return self._run_recording(operation)

    def revocations(self, issuer: str) -> bytes | None:
        """The issuer's stored revocation list, or ``None``."""
        return self._run(
            lambda db: _blob(db, "SELECT list FROM revocations WHERE issuer=?", issuer)
        )

    # -- security events -------------------------------------------------------------------

    def security_events(self, agent_id: str | None = None) -> list[SecurityEvent]:
        """Recorded forks and append-only violations, oldest first."""

        def operation(db: sqlite3.Connection) -> list[SecurityEvent]:
            query = "SELECT at_ms, kind, agent_id, reason, known, offered FROM security_events"
            args: tuple[str, ...] = ()
            if agent_id is not None:
                query += " WHERE agent_id=?"
                args = (agent_id,)
            rows = db.execute(query + " ORDER BY id", args).fetchall()
            return [
                SecurityEvent(
                    int(r[0]), r[1], r[2], r[3], None if r[4] is None else bytes(r[4]), bytes(r[5])
                )
                for r in rows
            ]

        return self._run(operation)

    def _run_recording(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """:meth:`_run` for operations that commit evidence *and then* refuse.

        The operation raises :class:`_Deferred` to commit what it wrote (the
        security event, the list a fork keeps) before the refusal is raised.
        """
        results: list[_T] = []
        deferred: list[Refused] = []

        def wrapped(db: sqlite3.Connection) -> None:
            try:
                results.append(operation(db))
            except _Deferred as exc:
                deferred.append(exc.refusal)

        self._run(wrapped)
        if deferred:
            raise deferred[0]
        return results[0]


class _Deferred(Exception):
    """Commit the transaction, then raise ``refusal``."""

    def __init__(self, refusal: Refused) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


_REVOCATION_KINDS: Final = {
    MergeOutcome.FORKED: "RevocationListForked",
    MergeOutcome.NOT_APPEND_ONLY: "RevocationListNotAppendOnly",
}
_REVOCATION_REASONS: Final = {
    MergeOutcome.FORKED: "fork: a different revocation list with the same version is stored; "
    "the issuer's key may be compromised (the list revoking more is kept)",
    MergeOutcome.NOT_APPEND_ONLY: "a newer revocation list version drops revocations of an "
    "older one; the issuer's key may be compromised (the older list is kept)",
}


# -- helpers (all run inside a transaction) ------------------------------------------------


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
            for statement in _MIGRATIONS[step]:
                db.execute(statement)
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _live_instances(
    db: sqlite3.Connection, agent_id: str, now_ms: int, limit: int = -1
) -> list[InstanceInfo]:
    """The agent's instances unexpired at ``now_ms``, newest sequence first (``limit``: all)."""
    rows = db.execute(_LIVE_INSTANCES, (agent_id, now_ms, limit)).fetchall()
    return [
        InstanceInfo(
            bytes(r[0]), r[1], int(r[2]), int(r[3]), int(r[4]), bytes(r[5]), int(r[6]), int(r[7])
        )
        for r in rows
    ]


def _activities(db: sqlite3.Connection, agent_id: str, now_ms: int) -> dict[bytes, Activity]:
    """What the rule needs of the agent's live instances, by instance id (no record bytes)."""
    rows = db.execute(
        "SELECT instance_id, first_sequence, sequence FROM records "
        "WHERE agent_id=? AND expires_ms > ?",
        (agent_id, now_ms),
    ).fetchall()
    return {bytes(r[0]): Activity(bytes(r[0]), int(r[1]), int(r[2])) for r in rows}


def _blob(db: sqlite3.Connection, query: str, *args: object) -> bytes | None:
    row = db.execute(query, args).fetchone()
    return None if row is None else bytes(row[0])


def _int(db: sqlite3.Connection, query: str, *args: object) -> int | None:
    row = db.execute(query, args).fetchone()
    return None if row is None else int(row[0])


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


def _load_keylog(db: sqlite3.Connection, agent_id: str) -> KeyLog | None:
    raw = _blob(db, "SELECT log FROM keylogs WHERE agent_id=?", agent_id)
    if raw is None:
        return None
    return _decode_stored(lambda: KeyLog.from_bytes(raw), "key log", agent_id)


def _require_keylog(db: sqlite3.Connection, agent_id: str) -> KeyLog:
    """The agent's verified log. Raises: Refused: 409, the registry does not know the agent."""
    log = _load_keylog(db, agent_id)
    if log is None:
        raise Refused(409, "UnknownAgent", f"no key log for {agent_id}: publish it first")
    return log


def _check_extends(db: sqlite3.Connection, known: KeyLog, offered: KeyLog, now_ms: int) -> None:
    """Refuse a rollback (a shorter prefix) or a fork (recorded, then refused).

    Raises:
        Refused: 409 for either.
        _Deferred: a fork, once its security event is written.
    """
    shorter = len(offered) < len(known)
    if shorter and known.events[: len(offered)] == offered.events:
        raise Refused(
            409,
            "KeyLogRollback",
            f"offered key log ends at sequence {offered.state.sequence}, "
            f"the stored one at {known.state.sequence} (rollback)",
        )
    try:
        known.extend(offered.events)
    except KeyLogInvalid as exc:
        reason = f"{exc}: the stored key log is kept; the agent's keys may be compromised"
        _record_event(
            db, now_ms, "keylog-fork", known.agent_id, reason, known.to_bytes(), offered.to_bytes()
        )
        raise _Deferred(Refused(409, "KeyLogInvalid", reason)) from None


def _check_signed_prekey(upload: PrekeyUpload, log: KeyLog) -> None:
    """Raises: SignatureInvalid: the signed prekey does not vouch for the current keys."""
    try:
        upload.bundle(log.state).verify()
    except SignatureInvalid:
        raise SignatureInvalid(
            "the signed prekey signature does not cover the agent's current identity keys"
        ) from None


def _verified(check: Callable[[], None]) -> None:
    """Run a signature/freshness check, turning its failure into a refusal.

    Raises:
        Refused: 403 for a bad signature, 422 for an expired or future-dated record.
    """
    try:
        check()
    except SignatureInvalid as exc:
        raise Refused(403, "SignatureInvalid", str(exc)) from None
    except StaleMessage as exc:
        raise Refused(422, "StaleMessage", str(exc)) from None


def _record_event(
    db: sqlite3.Connection,
    now_ms: int,
    kind: str,
    agent_id: str,
    reason: str,
    known: bytes | None,
    offered: bytes,
) -> None:
    log.warning(
        "security event %s for %s: %s",
        kind,
        agent_id,
        reason,
        extra={"event": kind.replace("-", "_"), "peer_id": agent_id, "kind": kind},
    )
    db.execute(
        "INSERT INTO security_events (at_ms, kind, agent_id, reason, known, offered) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (now_ms, kind, agent_id, reason, known, offered),
    )
