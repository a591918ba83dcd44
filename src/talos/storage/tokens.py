"""Persistent capability state in the agent home: tokens and revocation lists.

One LMDB environment at ``<home>/capabilities/`` with four named databases:

``granted``      token id -> token bytes, tokens this agent issued
``held``         token id -> token bytes, tokens granted to this agent
``revocations``  issuer agent id -> record {list bytes, last synchronized time}
``reasons``      token id -> why this agent revoked it (text, for operators)
``keylogs``      agent id -> that agent's key event log, as last verified
``witnessed``    origin agent id -> the newest checkpoint of its audit log this
                 agent accepted as a witness (:mod:`talos.client.witnessing`)
``meta``         format version; ``generation``, bumped by every write

The store keeps encoded bytes and knows nothing of their meaning: decoding
and verification stay in :mod:`talos.core.capability` and
:mod:`talos.core.revocation`. Every write is one durable transaction, so a
token is on disk before anyone is shown it.

The generation (``meta["generation"]``, u64) counts writes: every write
bumps it in its own transaction, so an emptied or rolled-back store shows a
lower one than the agent recorded in its watermark
(:mod:`talos.storage.watermark`). A store written before the counter existed
starts at 1 if it holds anything. Watchers (:meth:`TokenStore.watch`) are told
the new generation after each write committed.

It is opened like every LMDB store (:func:`talos.storage.lmdb.open_environment`):
a truncated file is a named :class:`~talos.errors.StoreCorrupted`, never a
SIGBUS; its files are 0600; a full disk or map is
:class:`~talos.errors.AuditFull`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Final

import lmdb

from talos.core.encoding import canonical_dumps, strict_loads
from talos.errors import MalformedFrame, StoreCorrupted, UnsupportedVersion
from talos.storage.lmdb import ReadTransaction, lmdb_errors, open_environment, read_u64, u64

__all__ = ["TokenStore"]

FORMAT_VERSION: Final = 1
_MAP_SIZE = 256 << 20
_MAX_RECORD = 1 << 20
_STORE: Final = "capabilities store"
_DATABASES = (
    b"granted",
    b"held",
    b"revocations",
    b"reasons",
    b"keylogs",
    b"witnessed",
    b"meta",
)


class TokenStore:
    """Tokens granted and held, and the revocation lists this agent knows."""

    def __init__(self, env: lmdb.Environment, path: Path) -> None:
        self._env = env
        self._path = path
        self._watchers: list[Callable[[int], None]] = []
        with lmdb_errors(path, store=_STORE):
            self._dbs = {name: env.open_db(name) for name in _DATABASES}
        self._check_version()

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        """Open (creating if needed) the store at ``path``.

        Raises:
            StoreCorrupted: the data file is truncated or damaged, or not LMDB
                (named; checked before it is mapped, see
                :func:`~talos.storage.lmdb.open_environment`).
            UnsupportedVersion: written by a newer Talos.
            AuditFull: the disk is full.
            StorageError: the directory cannot be opened.
        """
        env = open_environment(path, store=_STORE, map_size=_MAP_SIZE, max_dbs=len(_DATABASES))
        try:
            with lmdb_errors(path, store=_STORE):
                return cls(env, path)
        except BaseException:
            env.close()
            raise

    def close(self) -> None:
        self._env.close()

    def generation(self) -> int:
        """How many writes this store has committed (0 for a new, empty store)."""
        with self._read() as txn:
            return self._generation(txn)

    def watch(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(generation)`` after every write of this process committed."""
        self._watchers.append(callback)

    def _generation(self, txn: lmdb.Transaction[bytes]) -> int:
        raw = txn.get(b"generation", db=self._dbs[b"meta"])
        return 0 if raw is None else read_u64(bytes(raw))

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- tokens -----------------------------------------------------------------

    def add_granted(self, token_id: bytes, token: bytes) -> None:
        """Record a token this agent issued (durable when this returns)."""
        self._put(b"granted", token_id, token)

    def add_held(self, token_id: bytes, token: bytes) -> None:
        """Record a token granted to this agent (durable when this returns)."""
        self._put(b"held", token_id, token)

    def granted(self) -> Iterator[bytes]:
        """Every token this agent issued, in token-id order."""
        return self._values(b"granted")

    def granted_count(self) -> int:
        """How many tokens this agent issued (one read, nothing decoded)."""
        with self._read() as txn:
            return int(txn.stat(self._dbs[b"granted"])["entries"])

    def held(self) -> Iterator[bytes]:
        """Every token granted to this agent, in token-id order."""
        return self._values(b"held")

    def find(self, token_id: bytes) -> bytes | None:
        """A granted or held token by id, or None."""
        with self._read() as txn:
            for name in (b"granted", b"held"):
                value = txn.get(token_id, db=self._dbs[name])
                if value is not None:
                    return bytes(value)
        return None

    # -- revocation lists -------------------------------------------------------

    def put_revocation_list(self, issuer: str, data: bytes, *, synced_at: float) -> None:
        """Store an issuer's list and when it was last synchronized."""
        record = canonical_dumps({"list": data, "synced_ms": int(synced_at * 1000)})
        self._put(b"revocations", issuer.encode(), record)

    def revocation_lists(self) -> Iterator[tuple[str, bytes, float]]:
        """``(issuer, list bytes, synchronized at)`` for every stored list.

        Raises:
            StoreCorrupted: a record is damaged.
        """
        with self._read() as txn:
            items = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._dbs[b"revocations"])]
        for key, value in items:
            yield self._revocation_record(key, value)

    def revocation_list(self, issuer: str) -> tuple[bytes, float] | None:
        """``(list bytes, synchronized at)`` of one issuer, or None (one read).

        Raises:
            StoreCorrupted: the record is damaged.
        """
        key = issuer.encode()
        with self._read() as txn:
            value = txn.get(key, db=self._dbs[b"revocations"])
        if value is None:
            return None
        _, data, synced = self._revocation_record(key, bytes(value))
        return data, synced

    def _revocation_record(self, key: bytes, value: bytes) -> tuple[str, bytes, float]:
        try:
            record = strict_loads(value, max_size=_MAX_RECORD)
            issuer = key.decode()
            if not isinstance(record, dict) or set(record) != {"list", "synced_ms"}:
                raise MalformedFrame("bad revocation record")
            data, synced = record["list"], record["synced_ms"]
            if type(data) is not bytes or type(synced) is not int:
                raise MalformedFrame("bad revocation record fields")
        except (MalformedFrame, UnicodeDecodeError) as exc:
            raise StoreCorrupted(
                f"revocation record in {self._path} is damaged: {exc}",
                where=str(self._path),
                what="revocation record",
            ) from None
        return issuer, data, synced / 1000

    def put_reason(self, token_id: bytes, reason: str) -> None:
        """Remember why a token was revoked."""
        self._put(b"reasons", token_id, reason.encode())

    def reason(self, token_id: bytes) -> str | None:
        with self._read() as txn:
            value = txn.get(token_id, db=self._dbs[b"reasons"])
        return None if value is None else bytes(value).decode(errors="replace")

    # -- peers' key logs --------------------------------------------------------

    def put_keylog(self, agent_id: str, data: bytes) -> None:
        """Store a key log the caller has verified (and checked against the old one)."""
        self._put(b"keylogs", agent_id.encode(), data)

    def keylog(self, agent_id: str) -> bytes | None:
        with self._read() as txn:
            value = txn.get(agent_id.encode(), db=self._dbs[b"keylogs"])
        return None if value is None else bytes(value)

    def keylogs(self) -> Iterator[bytes]:
        """Every stored key log (to be verified again by the reader)."""
        return self._values(b"keylogs")

    # -- checkpoints witnessed ----------------------------------------------------

    def put_witnessed(self, origin: str, record: bytes) -> None:
        """Store the newest head of ``origin``'s log this agent accepted as a witness
        (durable when this returns; the caller judged it against the old one)."""
        self._put(b"witnessed", origin.encode(), record)

    def put_witnessed_evicting(self, origin: str, record: bytes, evict: str) -> None:
        """:meth:`put_witnessed`, dropping the head of ``evict`` in the same durable
        transaction (the witness's cap on origins, docs/design/witnesses.md)."""
        with lmdb_errors(self._path, store=_STORE), self._env.begin(write=True) as txn:
            txn.delete(evict.encode(), db=self._dbs[b"witnessed"])
            txn.put(origin.encode(), record, db=self._dbs[b"witnessed"])
            generation = self._generation(txn) + 1
            txn.put(b"generation", u64(generation), db=self._dbs[b"meta"])
        for callback in self._watchers:
            callback(generation)

    def witnessed_count(self) -> int:
        """How many origins' heads are stored."""
        with self._read() as txn:
            return int(txn.stat(self._dbs[b"witnessed"])["entries"])

    def witnessed_all(self) -> list[tuple[str, bytes]]:
        """Every stored head, by origin (decoded by the caller)."""
        with self._read() as txn:
            return [
                (bytes(k).decode(), bytes(v)) for k, v in txn.cursor(db=self._dbs[b"witnessed"])
            ]

    def witnessed(self, origin: str) -> bytes | None:
        """The stored head of ``origin``'s log, or None (decoded by the caller)."""
        with self._read() as txn:
            value = txn.get(origin.encode(), db=self._dbs[b"witnessed"])
        return None if value is None else bytes(value)

    # -- internals --------------------------------------------------------------

    def _put(self, db: bytes, key: bytes, value: bytes) -> None:
        """One durable write.

        Raises:
            AuditFull: the store's map or the disk is full; nothing was written.
            StoreCorrupted: LMDB found the file damaged.
            StorageError: any other LMDB failure.
        """
        with lmdb_errors(self._path, store=_STORE), self._env.begin(write=True) as txn:
            txn.put(key, value, db=self._dbs[db])
            generation = self._generation(txn) + 1
            txn.put(b"generation", u64(generation), db=self._dbs[b"meta"])
        for callback in self._watchers:
            callback(generation)

    def _read(self) -> ReadTransaction:
        """A read transaction; a damaged file is StoreCorrupted naming it."""
        return ReadTransaction(self._env, str(self._path), store=_STORE)

    def _values(self, db: bytes) -> Iterator[bytes]:
        with self._read() as txn:
            values = [bytes(v) for _, v in txn.cursor(db=self._dbs[db])]
        return iter(values)

    def _holds_anything(self, txn: lmdb.Transaction[bytes]) -> bool:
        return any(txn.stat(self._dbs[name])["entries"] for name in _DATABASES if name != b"meta")

    def _check_version(self) -> None:
        meta = self._dbs[b"meta"]
        with lmdb_errors(self._path, store=_STORE), self._env.begin(write=True) as txn:
            stored = txn.get(b"version", db=meta)
            if stored is None:
                txn.put(b"version", str(FORMAT_VERSION).encode(), db=meta)
            if txn.get(b"generation", db=meta) is None and self._holds_anything(txn):
                txn.put(b"generation", u64(1), db=meta)  # written before the counter
            if stored is None:
                return
        if stored != str(FORMAT_VERSION).encode():
            raise UnsupportedVersion(
                f"token store {self._path} has format {bytes(stored)!r}; this Talos reads "
                f"{FORMAT_VERSION}"
            )
