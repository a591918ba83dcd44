"""What an agent keeps for audit mirroring, in its own LMDB store (docs/design/mirrors.md).

One small LMDB environment at ``<home>/mirrors/`` (0700, files 0600),
separate from the agent's audit environment so that losing one never costs
the other::

    entries      origin 0x00 u64be(seq)   -> the origin's entry bytes, as it hashed them
    checkpoints  origin 0x00 u64be(size)  -> the origin's signed checkpoint note at size
    origins      origin                   -> {v, size, used, border}: held tree, bytes used
    progress     mirror peer id           -> {v, size}: how far OUR log is mirrored there
    meta         b"version"

Rules this module keeps:

* **A batch is verified before anything is stored** (:meth:`MirrorStore.accept`):
  the checkpoint names the origin's log and is signed by the key the caller
  gives (the origin's current key from the key log it holds); the batch
  starts at or before what is held (no gaps); entries it repeats equal the
  held ones byte for byte; and the held tree extended by the new entries has
  exactly the checkpoint's root. Otherwise :class:`MirrorRefused` with its
  :class:`~talos.core.mirror.RefusalCode`, and nothing changes.
* **Quota**: an origin's entries and checkpoints together stay within
  ``quota_bytes``; a batch past it is refused (``quota``), never half-stored.
  At most :data:`MAX_ORIGINS` origins are held.
* **Serving** (:meth:`MirrorStore.serve`) returns a stretch that ends at a
  stored checkpoint, with that checkpoint, so the reader can verify it.
* Each write is one durable transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import lmdb

from talos.core.audit.checkpoint import Checkpoint
from talos.core.crypto import VerifyKey
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.mirror import Batch, Entries, RefusalCode, TreeBorder, leaves_root
from talos.errors import (
    MalformedFrame,
    SignatureInvalid,
    StoreCorrupted,
    TalosError,
    UnsupportedVersion,
)
from talos.storage.lmdb import lmdb_errors, open_environment, read_u64, u64

__all__ = [
    "DEFAULT_QUOTA_BYTES",
    "MAX_ORIGINS",
    "MIRROR_DIR",
    "MirrorRefused",
    "MirrorStore",
    "audit_origin",
]

MIRROR_DIR: Final = "mirrors"
#: Default room per origin: 256 MiB of entries and checkpoints.
DEFAULT_QUOTA_BYTES: Final = 256 << 20
#: Most origins one agent mirrors for.
MAX_ORIGINS: Final = 16
_STORE: Final = "mirror store"
_MAP_SIZE: Final = 1 << 40  # address space only; the quotas bound the file
_DATABASES: Final = (b"entries", b"checkpoints", b"origins", b"progress", b"meta")
_VERSION: Final = 1
_MAX_RECORD: Final = 64 * 1024


def audit_origin(agent_id: str) -> str:
    """The origin line of ``agent_id``'s audit checkpoints (see ``own_keys.audit_signer``)."""
    return f"{agent_id}/audit"


class MirrorRefused(TalosError):
    """A mirror batch was refused; ``code`` says why (sent back in a REFUSED body)."""

    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:200]


@dataclass(frozen=True, slots=True)
class OriginState:
    size: int
    used: int
    border: TreeBorder


def _key(origin: str, number: int) -> bytes:
    return origin.encode() + b"\x00" + u64(number)


class MirrorStore:
    """Entries held for other agents, and how far this agent's own log is mirrored."""

    def __init__(self, env: lmdb.Environment, path: Path, quota_bytes: int) -> None:
        self._env, self._path, self.quota_bytes = env, path, quota_bytes
        with lmdb_errors(path, store=_STORE):
            self._dbs = {name: env.open_db(name) for name in _DATABASES}
            with env.begin(write=True) as txn:
                stored = txn.get(b"version", db=self._dbs[b"meta"])
                if stored is None:
                    txn.put(b"version", u64(_VERSION), db=self._dbs[b"meta"])
        if stored is not None and read_u64(bytes(stored)) != _VERSION:
            raise UnsupportedVersion(f"mirror store {path} has an unknown format")

    @classmethod
    def open(cls, path: Path, *, quota_bytes: int = DEFAULT_QUOTA_BYTES) -> MirrorStore:
        """Open (creating if needed) the store in directory ``path``.

        Raises:
            StoreCorrupted: the data file is truncated or damaged.
            UnsupportedVersion: written by a newer Talos.
            StorageError: the directory cannot be opened.
        """
        env = open_environment(path, store=_STORE, map_size=_MAP_SIZE, max_dbs=len(_DATABASES))
        try:
            return cls(env, path, quota_bytes)
        except BaseException:
            env.close()
            raise

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> MirrorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _txn(self, *, write: bool = False) -> Iterator[lmdb.Transaction[bytes]]:
        with lmdb_errors(self._path, store=_STORE), self._env.begin(write=write) as txn:
            yield txn

    # -- mirroring for others ---------------------------------------------------------

    def origin(self, origin: str) -> OriginState:
        """What is held for ``origin`` (empty if nothing)."""
        with self._txn() as txn:
            return self._origin(txn, origin)

    def origins(self) -> list[tuple[str, OriginState]]:
        with self._txn() as txn:
            keys = [bytes(k) for k, _ in txn.cursor(db=self._dbs[b"origins"])]
            return [(k.decode(), self._origin(txn, k.decode())) for k in keys]

    def accept(self, origin: str, batch: Batch, key: VerifyKey) -> int:
        """Verify ``batch`` of ``origin``'s log and store what is new; the held size.

        Raises:
            MirrorRefused: the batch fails a check (nothing is stored).
            AuditFull, StoreCorrupted, StorageError: the store failed.
        """
        checkpoint = batch.checkpoint
        if checkpoint.origin != audit_origin(origin):
            raise MirrorRefused(RefusalCode.BAD_CHECKPOINT, "checkpoint names another log")
        try:
            checkpoint.verify(key, origin)
        except SignatureInvalid:
            raise MirrorRefused(
                RefusalCode.BAD_CHECKPOINT, "checkpoint is not signed by the origin's key"
            ) from None
        with self._txn(write=True) as txn:
            held = self._origin(txn, origin)
            if held.size == 0 and not txn.get(origin.encode(), db=self._dbs[b"origins"]):
                if txn.stat(self._dbs[b"origins"])["entries"] >= MAX_ORIGINS:
                    raise MirrorRefused(RefusalCode.QUOTA, "this mirror holds its most origins")
            if batch.start > held.size:
                raise MirrorRefused(
                    RefusalCode.GAP, f"batch starts at {batch.start}; {held.size} are held"
                )
            repeated = held.size - batch.start
            for offset, raw in enumerate(batch.entries[:repeated]):
                stored = txn.get(_key(origin, batch.start + offset), db=self._dbs[b"entries"])
                if stored is None or bytes(stored) != raw:
                    raise MirrorRefused(
                        RefusalCode.INCONSISTENT,
                        f"entry {batch.start + offset} differs from the one held",
                    )
            new = batch.entries[repeated:]
            if not new:
                return held.size
            border, root = leaves_root(held.border, new)
            if root != checkpoint.root:
                raise MirrorRefused(
                    RefusalCode.INCONSISTENT, f"entries do not hash to the root at {border.size}"
                )
            note = checkpoint.to_text().encode()
            used = held.used + sum(len(raw) for raw in new) + len(note)
            if used > self.quota_bytes:
                raise MirrorRefused(
                    RefusalCode.QUOTA,
                    f"quota of {self.quota_bytes} bytes for this origin would be exceeded",
                )
            rows = [(_key(origin, held.size + i), raw) for i, raw in enumerate(new)]
            txn.cursor(db=self._dbs[b"entries"]).putmulti(rows)
            txn.put(_key(origin, border.size), note, db=self._dbs[b"checkpoints"])
            txn.put(origin.encode(), _encode_origin(border, used), db=self._dbs[b"origins"])
        return border.size

    def serve(self, origin: str, start: int, limit: int) -> Entries:
        """Held entries of ``origin`` from ``start`` up to the next stored checkpoint.

        The stretch ends where a stored checkpoint covers it (at most
        ``limit`` entries); empty when nothing is held from ``start``.

        Raises:
            StoreCorrupted: a stored entry or checkpoint is missing or damaged.
        """
        with self._txn() as txn:
            held = self._origin(txn, origin).size
            if start >= held:
                return Entries(start, (), None, held)
            cursor = txn.cursor(db=self._dbs[b"checkpoints"])
            found = cursor.set_range(_key(origin, start + 1))
            key = bytes(cursor.key()) if found else b""
            if not key.startswith(origin.encode() + b"\x00"):
                raise self._damaged(origin, f"no checkpoint after entry {start}")
            end = read_u64(key[-8:])
            if end - start > limit:
                return Entries(start, (), None, held)
            entries = []
            for seq in range(start, end):
                raw = txn.get(_key(origin, seq), db=self._dbs[b"entries"])
                if raw is None:
                    raise self._damaged(origin, f"entry {seq} is missing")
                entries.append(bytes(raw))
            try:
                checkpoint = Checkpoint.parse(bytes(cursor.value()))
            except MalformedFrame:
                raise self._damaged(origin, f"checkpoint at {end} does not parse") from None
            if checkpoint.size != end:
                # Served as it is, the stretch would be cut short under its checkpoint
                # (an answer that cannot even be encoded): say the store is damaged.
                raise self._damaged(
                    origin, f"checkpoint stored at {end} is of size {checkpoint.size}"
                )
        return Entries(start, tuple(entries), checkpoint, held)

    def _origin(self, txn: lmdb.Transaction[bytes], origin: str) -> OriginState:
        raw = txn.get(origin.encode(), db=self._dbs[b"origins"])
        if raw is None:
            return OriginState(0, 0, TreeBorder.empty())
        try:
            fields = strict_versioned_map(
                bytes(raw),
                max_size=_MAX_RECORD,
                fields=frozenset({"v", "size", "used", "border"}),
                version=_VERSION,
                what="mirror origin record",
            )
            size, used, stack = fields["size"], fields["used"], fields["border"]
            if type(size) is not int or type(used) is not int or type(stack) is not list:
                raise MalformedFrame("mirror origin record fields have the wrong types")
            if not all(type(h) is bytes and len(h) == 32 for h in stack):
                raise MalformedFrame("mirror origin border must hold hashes")
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise self._damaged(origin, str(exc)) from None
        return OriginState(size, used, TreeBorder(size, list(stack)))

    def _damaged(self, origin: str, what: str) -> StoreCorrupted:
        return StoreCorrupted(
            f"mirror store {self._path}: {what} for {origin}",
            where=str(self._path),
            what="mirror store",
        )

    # -- our own log's mirrors ----------------------------------------------------------

    def progress(self, mirror: str) -> int:
        """How many of our entries ``mirror`` acknowledged holding (0 if none)."""
        with self._txn() as txn:
            raw = txn.get(mirror.encode(), db=self._dbs[b"progress"])
        return 0 if raw is None else read_u64(bytes(raw))

    def set_progress(self, mirror: str, size: int) -> None:
        """Record that ``mirror`` holds ``size`` of our entries (one durable write)."""
        with self._txn(write=True) as txn:
            txn.put(mirror.encode(), u64(size), db=self._dbs[b"progress"])

    def mirrors(self) -> dict[str, int]:
        """Every peer this agent mirrored its log to, and how far."""
        with self._txn() as txn:
            return {
                bytes(k).decode(): read_u64(bytes(v))
                for k, v in txn.cursor(db=self._dbs[b"progress"])
            }


def _encode_origin(border: TreeBorder, used: int) -> bytes:
    record: dict[str, Any] = {"v": _VERSION, "size": border.size, "used": used}
    record["border"] = list(border.stack)
    return canonical_dumps(record)
