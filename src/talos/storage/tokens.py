"""Persistent capability state in the agent home: tokens and revocation lists.

One LMDB environment at ``<home>/capabilities/`` with four named databases:

``granted``      token id -> token bytes, tokens this agent issued
``held``         token id -> token bytes, tokens granted to this agent
``revocations``  issuer agent id -> record {list bytes, last synchronized time}
``reasons``      token id -> why this agent revoked it (text, for operators)
``keylogs``      agent id -> that agent's key event log, as last verified
``meta``         format version

The store keeps encoded bytes and knows nothing of their meaning: decoding
and verification stay in :mod:`talos.core.capability` and
:mod:`talos.core.revocation`. Every write is one durable transaction, so a
token is on disk before anyone is shown it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Final

import lmdb

from talos.core.encoding import canonical_dumps, strict_loads
from talos.errors import MalformedFrame, StorageError, StoreCorrupted, UnsupportedVersion

__all__ = ["TokenStore"]

FORMAT_VERSION: Final = 1
_MAP_SIZE = 256 << 20
_MAX_RECORD = 1 << 20
_DATABASES = (b"granted", b"held", b"revocations", b"reasons", b"keylogs", b"meta")


class TokenStore:
    """Tokens granted and held, and the revocation lists this agent knows."""

    def __init__(self, env: lmdb.Environment, path: Path) -> None:
        self._env = env
        self._path = path
        self._dbs = {name: env.open_db(name) for name in _DATABASES}
        self._check_version()

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        """Open (creating if needed) the store at ``path``.

        Raises:
            StoreCorrupted: the files are not a Talos token store.
            UnsupportedVersion: written by a newer Talos.
            StorageError: the directory cannot be opened.
        """
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            env = lmdb.open(str(path), map_size=_MAP_SIZE, max_dbs=len(_DATABASES), subdir=True)
        except lmdb.InvalidError as exc:
            raise StoreCorrupted(
                f"{path} is not a valid LMDB store", where=str(path), what="format"
            ) from exc
        except (lmdb.Error, OSError) as exc:
            raise StorageError(f"cannot open token store {path}: {exc}") from exc
        try:
            return cls(env, path)
        except BaseException:
            env.close()
            raise

    def close(self) -> None:
        self._env.close()

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

    def held(self) -> Iterator[bytes]:
        """Every token granted to this agent, in token-id order."""
        return self._values(b"held")

    def find(self, token_id: bytes) -> bytes | None:
        """A granted or held token by id, or None."""
        with self._env.begin() as txn:
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
        with self._env.begin(db=self._dbs[b"revocations"]) as txn:
            items = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
        for key, value in items:
            yield self._revocation_record(key, value)

    def revocation_list(self, issuer: str) -> tuple[bytes, float] | None:
        """``(list bytes, synchronized at)`` of one issuer, or None (one read).

        Raises:
            StoreCorrupted: the record is damaged.
        """
        key = issuer.encode()
        with self._env.begin(db=self._dbs[b"revocations"]) as txn:
            value = txn.get(key)
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
        with self._env.begin(db=self._dbs[b"reasons"]) as txn:
            value = txn.get(token_id)
        return None if value is None else bytes(value).decode(errors="replace")

    # -- peers' key logs --------------------------------------------------------

    def put_keylog(self, agent_id: str, data: bytes) -> None:
        """Store a key log the caller has verified (and checked against the old one)."""
        self._put(b"keylogs", agent_id.encode(), data)

    def keylog(self, agent_id: str) -> bytes | None:
        with self._env.begin(db=self._dbs[b"keylogs"]) as txn:
            value = txn.get(agent_id.encode())
        return None if value is None else bytes(value)

    def keylogs(self) -> Iterator[bytes]:
        """Every stored key log (to be verified again by the reader)."""
        return self._values(b"keylogs")

    # -- internals --------------------------------------------------------------

    def _put(self, db: bytes, key: bytes, value: bytes) -> None:
        try:
            with self._env.begin(write=True, db=self._dbs[db]) as txn:
                txn.put(key, value)
        except lmdb.MapFullError as exc:
            raise StorageError(f"token store {self._path} is full") from exc
        except lmdb.Error as exc:
            if getattr(exc, "errno", None) == errno.ENOSPC or "No space" in str(exc):
                raise StorageError(f"disk full writing {self._path}") from exc
            raise StorageError(f"cannot write token store {self._path}: {exc}") from exc

    def _values(self, db: bytes) -> Iterator[bytes]:
        with self._env.begin(db=self._dbs[db]) as txn:
            values = [bytes(v) for _, v in txn.cursor()]
        return iter(values)

    def _check_version(self) -> None:
        meta = self._dbs[b"meta"]
        with self._env.begin(write=True, db=meta) as txn:
            stored = txn.get(b"version")
            if stored is None:
                txn.put(b"version", str(FORMAT_VERSION).encode())
                return
        if stored != str(FORMAT_VERSION).encode():
            raise UnsupportedVersion(
                f"token store {self._path} has format {bytes(stored)!r}; this Talos reads "
                f"{FORMAT_VERSION}"
            )
