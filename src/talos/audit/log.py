"""The tamper-evident audit log: an RFC 9162 Merkle tree of entries in LMDB.

Rules this module keeps:

* Append-only. Entry ``n`` is leaf ``n``; appending it stores the entry (with
  its leaf hash), every perfect subtree it completes, the index rows for
  :meth:`AuditLog.query`, the new size and root, and, when one is due, a
  signed block, all in one LMDB write transaction. When ``append`` (or the
  awaited ``append_async``) returns, that transaction is synced to disk.
* Group commit: every :meth:`AuditLog.append_async` made during one event-loop
  tick joins one transaction, committed in a worker thread so the loop keeps
  running; appends that arrive meanwhile form the next one. Each caller
  resumes only after *its* transaction is durable.
* Entry times never go backwards: an entry gets ``max(clock, previous time)``,
  so the log is ordered by time as well as by sequence and ``since``/``until``
  queries are binary searches.
* LMDB has no checksums, so every read that feeds a decision re-hashes:
  :meth:`AuditLog.entry` checks the stored leaf hash, proofs are checked
  against the root before they are handed out, and :meth:`AuditLog.verify_chain`
  rebuilds the whole tree, every stored node and every block.
* A full disk or map raises :class:`~talos.errors.AuditFull` and logs a
  warning on the ``talos.audit`` logger; the failed transaction is aborted,
  in-memory state is left as it was, and everything committed before stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, TypeVar

import lmdb

from talos.core.audit.checkpoint import (
    GENESIS_HASH,
    Block,
    Checkpoint,
    ConsistencyProof,
    InclusionProof,
    LogSigner,
)
from talos.core.audit.entry import (
    AuditEntry,
    check_kind,
    check_peer,
    encode_data,
    entry_middle,
    finish_entries,
)
from talos.core.audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    NodeID,
    consistency_nodes,
    fold_subtrees,
    inclusion_nodes,
    leaf_hash,
    node_hash,
    root_nodes,
)
from talos.core.clock import Clock, time_ms
from talos.core.crypto import VerifyKey
from talos.errors import (
    AuditFull,
    BackupInvalid,
    ConfigurationError,
    ConsistencyError,
    InclusionProofError,
    LocalProtocolError,
    MalformedFrame,
    SignatureInvalid,
    StorageError,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.storage.lmdb import (
    DATA_FILE,
    AuditStore,
    check_data_file,
    index_key,
    node_key,
    read_u64,
    u64,
)
from talos.system import SYSTEM_CLOCK

__all__ = [
    "DEFAULT_BLOCK_ENTRIES",
    "DEFAULT_BLOCK_SECONDS",
    "FORMAT_VERSION",
    "AuditLog",
    "AuditRecord",
    "ChainProblem",
    "ChainReport",
]

_log = logging.getLogger("talos.audit")

#: Version of the LMDB layout (``meta["format"]``).
FORMAT_VERSION: Final = 1

#: A block is sealed once this many entries are unsealed ...
DEFAULT_BLOCK_ENTRIES: Final = 1024

#: ... or once the oldest unsealed entry is this many seconds old (checked on write).
DEFAULT_BLOCK_SECONDS: Final = 60.0

_PROGRESS_EVERY = 1 << 16
_sha256 = hashlib.sha256
_pack_u64 = struct.Struct(">Q").pack  # storage.lmdb.u64
_pack_node = struct.Struct(">QB").pack  # storage.lmdb.node_key: (last leaf, level)


class AuditRecord(NamedTuple):
    """One entry to append: what :meth:`AuditLog.append_many` takes."""

    kind: str
    data: Mapping[str, Any]
    peer: str | None = None


class _Prepared(NamedTuple):
    """A validated record: its seq-independent bytes and its index key prefixes."""

    middle: bytes
    kind_key: bytes
    peer_key: bytes | None


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first thing :meth:`AuditLog.verify_chain` found wrong, and where."""

    where: str  # "file", "entry", "node", "block" or "meta"
    what: str
    seq: int | None = None
    height: int | None = None
    node: NodeID | None = None

    def __str__(self) -> str:
        place = [self.where]
        if self.seq is not None:
            place.append(f"seq {self.seq}")
        if self.height is not None:
            place.append(f"height {self.height}")
        if self.node is not None:
            begin, end = self.node.coverage()
            place.append(f"node level {self.node.level} index {self.node.index} [{begin}, {end})")
        return f"{', '.join(place)}: {self.what}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    """Outcome of :meth:`AuditLog.verify_chain`: counts, the rebuilt root, the first problem."""

    entries: int
    blocks: int
    root: bytes
    problem: ChainProblem | None = None
    signers: tuple[bytes, ...] = ()
    unsigned_blocks: int = 0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def raise_for_problem(self) -> None:
        """Raise if the chain is damaged.

        Raises:
            StoreCorrupted: with ``where`` (e.g. ``"seq 17"``) and ``what``.
        """
        if self.problem is not None:
            problem = self.problem
            where = problem.where
            if problem.seq is not None:
                where = f"seq {problem.seq}"
            elif problem.height is not None:
                where = f"height {problem.height}"
            raise StoreCorrupted(f"audit chain damaged: {problem}", where=where, what=problem.what)


class _StaleWriter(Exception):
    """Another process committed since this writer loaded its state: reload and retry."""


_STALE_RETRIES: Final = 5
_T = TypeVar("_T")


class _Broken(Exception):
    """Raised inside the chain scan; carries the first problem."""

    def __init__(self, problem: ChainProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@dataclass(slots=True)
class _WriterState:
    """What a writer must know: the right border of the tree and the open block."""

    size: int
    stack: list[bytes]
    time_ms: int
    blocks: int
    block_hash: bytes
    sealed_size: int
    oldest_unsealed_ms: int | None
    root: bytes = field(default=EMPTY_ROOT)

    def copy(self) -> _WriterState:
        return _WriterState(
            self.size,
            list(self.stack),
            self.time_ms,
            self.blocks,
            self.block_hash,
            self.sealed_size,
            self.oldest_unsealed_ms,
            self.root,
        )

    def fold(self) -> bytes:
        return fold_subtrees(self.stack) if self.stack else EMPTY_ROOT


class AuditLog:
    """An append-only, Merkle-hashed, block-sealed audit log in one LMDB directory.

    Open with :meth:`open`; use as a context manager or call :meth:`close`.
    One process writes a log at a time; other processes may open it
    ``readonly`` to query and verify.
    """

    def __init__(
        self,
        store: AuditStore,
        *,
        clock: Clock,
        signer: LogSigner | None,
        block_entries: int,
        block_seconds: float,
        commit_thread: bool = True,
    ) -> None:
        self._store = store
        self._commit_thread = commit_thread
        self._clock = clock
        self._signer = signer
        self._block_entries = block_entries
        self._block_ms = int(block_seconds * 1000)
        self._lock = threading.Lock()
        self._writer: _WriterState | None = None
        self._pending: list[tuple[_Prepared, asyncio.Future[int]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        with store.read() as txn:
            raw_version = store.meta_value(txn, b"format")
            size = store.meta_value(txn, b"size")
            root = store.meta_value(txn, b"root")
        if raw_version is not None and read_u64(raw_version) != FORMAT_VERSION:
            store.close()
            raise UnsupportedVersion(f"audit log format {read_u64(raw_version)} is not supported")
        self._size = 0 if size is None else read_u64(size)
        self._root = EMPTY_ROOT if root is None else bytes(root)

    # -- opening and closing -----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        max_size_bytes: int | None = None,
        clock: Clock = SYSTEM_CLOCK,
        signer: LogSigner | None = None,
        block_entries: int = DEFAULT_BLOCK_ENTRIES,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
        readonly: bool = False,
        commit_thread: bool = True,
        extra_databases: Sequence[str] = (),
    ) -> AuditLog:
        """Open the log in directory ``path``, creating it unless ``readonly``.

        ``extra_databases`` are named databases for other state kept in the
        same LMDB environment (an agent's sessions, inbox, outbox...), so that
        :meth:`append_with` can commit an audit entry and the state change it
        records in one transaction.

        The size and root come from the metadata (O(1)); the right border of
        the tree is read on the first append (O(log n)). Group commits run in
        a worker thread so the event loop keeps serving during ``fsync``;
        ``commit_thread=False`` commits on the loop itself, which is about
        8% faster and blocks the loop for each ``fsync``.

        Raises:
            ConfigurationError: ``max_size_bytes`` too small, or a block
                setting is not positive.
            StoreCorrupted: the data file is truncated or not LMDB.
            UnsupportedVersion: written by a newer Talos.
            StorageError: the directory cannot be used.
        """
        if block_entries < 1 or not block_seconds > 0:
            raise ConfigurationError("block_entries and block_seconds must be positive")
        store = AuditStore.open(
            Path(path),
            max_size_bytes=max_size_bytes,
            readonly=readonly,
            extra_databases=extra_databases,
        )
        return cls(
            store,
            clock=clock,
            signer=signer,
            block_entries=block_entries,
            block_seconds=block_seconds,
            commit_thread=commit_thread,
        )

    def close(self) -> None:
        """Commit what is still queued, seal a block if one is due, and close.

        Raises:
            AuditFull: the queued entries or the block did not fit (they are
                lost and their callers get the same error; earlier ones stay).
            StorageError: LMDB failed.
        """
        if self._closed:
            return
        try:
            if not self._store.readonly and (self._writer is not None or self._pending):
                with self._lock:
                    self._drain_pending()
                    self._seal_if_due()
        finally:
            with self._lock:
                self._closed = True
                self._store.close()

    async def aclose(self) -> None:
        """Wait for in-flight group commits, then :meth:`close`."""
        while self._committer is not None and not self._committer.done():
            await asyncio.wait([self._committer])
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def path(self) -> Path:
        return self._store.path

    # -- head --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of committed entries (re-read from disk for a read-only log)."""
        self._check_open()
        if self._store.readonly:
            self._refresh_head()
        return self._size

    def root(self) -> bytes:
        """Merkle root of all committed entries, O(1) (stored with every commit)."""
        self._check_open()
        if self._store.readonly:
            self._refresh_head()
        return self._root

    def _refresh_head(self) -> None:
        with self._store.read() as txn:
            size = self._store.meta_value(txn, b"size")
            root = self._store.meta_value(txn, b"root")
        self._size = 0 if size is None else read_u64(size)
        self._root = EMPTY_ROOT if root is None else bytes(root)

    def root_at(self, size: int) -> bytes:
        """Merkle root of the first ``size`` entries, from O(log n) stored nodes.

        Raises:
            LocalProtocolError: ``size`` is larger than the log.
            StoreCorrupted: a stored node is missing.
        """
        head = self.size
        if not 0 <= size <= head:
            raise LocalProtocolError(f"tree size {size} is outside 0..{head}")
        if size == head:
            return self._root
        with self._store.read() as txn:
            return self._fold_stored(txn, size)

    def _fold_stored(self, txn: lmdb.Transaction[bytes], size: int) -> bytes:
        if size == 0:
            return EMPTY_ROOT
        return fold_subtrees([self._node(txn, node) for node in root_nodes(size)])

    def _node(self, txn: lmdb.Transaction[bytes], node: NodeID) -> bytes:
        value = self._store.node(txn, node)
        if value is None or len(value) != HASH_SIZE:
            raise StoreCorrupted(
                f"audit log node {node} is missing or malformed",
                where=f"node level {node.level} index {node.index}",
                what="missing node",
            )
        return bytes(value)

    # -- appending -----------------------------------------------------------------------

    def append(self, kind: str, data: Mapping[str, Any], *, peer: str | None = None) -> int:
        """Append one entry and return its sequence number once it is on disk.

        ``data`` holds hashes and metadata, never plaintext (see
        :mod:`talos.core.audit.entry` for the bounds).

        Raises:
            LocalProtocolError: invalid kind, peer or data; the log is read-only or closed.
            AuditFull: no room (map, ``max_size_bytes`` or disk); nothing was written.
            StoreCorrupted: the stored tree border does not match the stored root.
            StorageError: LMDB failed.
        """
        record = _prepare(kind, data, peer)
        with self._lock:
            return self._commit([record])[0]

    def append_with(
        self,
        records: Iterable[tuple[str, Mapping[str, Any], str | None]],
        apply: Callable[[lmdb.Transaction[bytes]], None],
    ) -> list[int]:
        """Append ``records`` and run ``apply(txn)`` in the same durable transaction.

        ``apply`` writes the caller's own rows into databases named at
        :meth:`open` (see :meth:`database`). All or nothing: if ``apply`` or
        the append fails, neither the entries nor the rows are written, and
        the exception propagates. Returns the entries' sequence numbers.

        Raises:
            The same as :meth:`append`, and whatever ``apply`` raises.
        """
        prepared = [_prepare(kind, data, peer) for kind, data, peer in records]
        with self._lock:
            return self._commit(prepared, apply)

    def database(self, name: str) -> Any:
        """The handle of an extra database named at :meth:`open`.

        Raises:
            LocalProtocolError: no such database was opened.
        """
        try:
            return self._store.extra[name]
        except KeyError:
            raise LocalProtocolError(f"no extra database {name!r} in this audit log") from None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[lmdb.Transaction[bytes]]:
        """A read transaction: a consistent view of the log and the extra databases."""
        self._check_open()
        with self._store.read() as txn:
            yield txn

    def append_many(
        self, records: Iterable[tuple[str, Mapping[str, Any], str | None]]
    ) -> list[int]:
        """Append several entries in one durable transaction; all or none are written.

        Each item is ``(kind, data, peer)``, e.g. an :class:`AuditRecord`.

        Raises:
            The same as :meth:`append`.
        """
        prepared = [_prepare(kind, data, peer) for kind, data, peer in records]
        if not prepared:
            return []
        with self._lock:
            return self._commit(prepared)

    async def append_async(
        self, kind: str, data: Mapping[str, Any], *, peer: str | None = None
    ) -> int:
        """Append with group commit; resume once the shared transaction is durable.

        Appends made during one event-loop tick share one transaction. A
        caller cancelled while waiting does not withdraw its entry: it may
        still be committed.

        Raises:
            The same as :meth:`append`; a failed transaction fails every
            caller in it.
        """
        record = _prepare(kind, data, peer)
        self._check_writable()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append((record, future))
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._group_commits())
        return await future

    async def _group_commits(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                records = [r for r, _ in batch]
                if self._commit_thread:
                    seqs = await asyncio.to_thread(self._commit_locked, records)
                else:
                    seqs = self._commit_locked(records)
            except BaseException as exc:
                error = (
                    exc if isinstance(exc, Exception) else StorageError("group commit cancelled")
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), seq in zip(batch, seqs, strict=True):
                if not future.done():
                    future.set_result(seq)

    def _commit_locked(self, records: list[_Prepared]) -> list[int]:
        with self._lock:
            return self._commit(records)

    def _drain_pending(self) -> None:
        """Commit group-commit requests still queued (called by close, lock held)."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            seqs = self._commit([r for r, _ in batch])
        except Exception as exc:
            for _, future in batch:
                future.get_loop().call_soon_threadsafe(_settle, future, None, exc)
            raise
        for (_, future), seq in zip(batch, seqs, strict=True):
            future.get_loop().call_soon_threadsafe(_settle, future, seq, None)

    def flush(self) -> None:
        """Seal a block if one is due by time, and sync the environment.

        Appends are already durable when they return; this is for the time
        rule of blocks, which is otherwise checked on the next append.

        Raises:
            AuditFull, StorageError: as for :meth:`append`.
        """
        self._check_open()
        if self._store.readonly:
            return
        with self._lock:
            self._seal_if_due()
        with contextlib.suppress(lmdb.Error):
            self._store.env.sync(True)

    def seal_block(self) -> Block | None:
        """Seal the unsealed entries into a block now; ``None`` if there are none.

        Raises:
            AuditFull, StorageError: as for :meth:`append`.
        """
        self._check_writable()
        with self._lock:
            return self._with_fresh_writer(self._seal_now)

    def _seal_now(self) -> Block | None:
        state = self._writer_state().copy()
        if state.size == state.sealed_size:
            return None
        with self._write_txn() as txn:
            block = self._seal(txn, state, time_ms(self._clock))
            self._put_head(txn, state)
        self._install(state)
        return block

    def _seal_if_due(self) -> None:
        self._with_fresh_writer(self._seal_if_due_once)

    def _seal_if_due_once(self) -> None:
        state = self._writer_state()
        now = time_ms(self._clock)
        if not self._block_due(state, now):
            return
        state = state.copy()
        with self._write_txn() as txn:
            self._seal(txn, state, now)
            self._put_head(txn, state)
        self._install(state)

    def _block_due(self, state: _WriterState, now: int) -> bool:
        oldest = state.oldest_unsealed_ms
        return oldest is not None and now - oldest >= self._block_ms

    def _commit(
        self,
        records: Sequence[_Prepared],
        apply: Callable[[lmdb.Transaction[bytes]], None] | None = None,
    ) -> list[int]:
        """:meth:`_commit_once`, again from disk if another process wrote meanwhile."""
        return self._with_fresh_writer(lambda: self._commit_once(records, apply))

    def _with_fresh_writer(self, operation: Callable[[], _T]) -> _T:
        """Run a write ``operation``; if another process (e.g. a CLI command next to a
        running agent) changed the log since our state was loaded, reload and retry.

        LMDB serializes writers across processes; this writer's cached tree
        border is what must not go stale, so :meth:`_write_txn` checks it
        against the stored head inside the exclusive write transaction.

        Raises:
            StorageError: the log kept changing under this writer.
        """
        for _ in range(_STALE_RETRIES):
            try:
                return operation()
            except _StaleWriter:
                self._writer = None
                self._refresh_head()
        raise StorageError(f"audit log {self.path} keeps changing under this writer")

    def _commit_once(
        self,
        records: Sequence[_Prepared],
        apply: Callable[[lmdb.Transaction[bytes]], None] | None = None,
    ) -> list[int]:
        """One write transaction for ``records`` (lock held). State changes only on success.

        The whole batch gets one time, ``max(clock, previous time)``: that is
        what stamping each entry in turn gave too, as times never go back.
        Entries, nodes and index rows are built first and then written with
        one ``putmulti`` per sub-database; entry and node keys only grow.
        """
        self._check_writable()
        state = self._writer_state().copy()
        now = time_ms(self._clock)
        store = self._store
        first = state.size
        with self._write_txn() as txn:
            if self._block_due(state, now):
                self._seal(txn, state, now)
            if records:
                state.time_ms = max(now, state.time_ms)
            raws = finish_entries(first, state.time_ms, [r.middle for r in records])
            entry_rows: list[tuple[bytes, bytes]] = []
            node_rows: list[tuple[bytes, bytes]] = []
            index_rows: list[tuple[bytes, bytes]] = []
            stack = state.stack
            for seq, (raw, record) in enumerate(zip(raws, records, strict=True), first):
                leaf = _sha256(b"\x00" + raw).digest()  # RFC 9162 leaf, as merkle.leaf_hash
                key = _pack_u64(seq)
                entry_rows.append((key, leaf + raw))
                # Leaf ``seq`` completes one perfect subtree per trailing 1 bit of
                # ``seq``, lowest first; each of them ends at leaf ``seq``.
                value, bits, level = leaf, seq, 0
                while bits & 1:
                    value = _sha256(b"\x01" + stack.pop() + value).digest()  # merkle.node_hash
                    bits >>= 1
                    level += 1
                    node_rows.append((_pack_node(seq, level), value))
                stack.append(value)
                index_rows.append((record.kind_key + key, b""))
                if record.peer_key is not None:
                    index_rows.append((record.peer_key + key, b""))
                state.size = seq + 1
                if state.oldest_unsealed_ms is None:
                    state.oldest_unsealed_ms = state.time_ms
                if state.size - state.sealed_size >= self._block_entries:
                    self._seal(txn, state, now)
            self._append_rows(txn, store.entries, entry_rows)
            self._append_rows(txn, store.nodes, node_rows)
            # In arrival order: sorting them first was no faster and left the
            # index a third larger (more half-full pages after splits).
            txn.cursor(db=store.index).putmulti(index_rows)
            self._put_head(txn, state)
            if apply is not None:
                apply(txn)
        self._install(state)
        return list(range(first, state.size))

    def _append_rows(
        self, txn: lmdb.Transaction[bytes], db: Any, rows: list[tuple[bytes, bytes]]
    ) -> None:
        """Put rows whose keys are past every stored key (LMDB skips any that are not)."""
        if rows and txn.cursor(db=db).putmulti(rows, append=True)[1] != len(rows):
            raise StoreCorrupted(
                f"audit log {self.path} holds rows beyond its stored size; run verify_chain",
                where="meta",
                what="rows beyond size",
            )

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[lmdb.Transaction[bytes]]:
        """A write transaction whose AuditFull is logged and explained."""
        try:
            with self._store.write() as txn:
                self._check_head(txn)
                yield txn
        except AuditFull as exc:
            limit = self._store.max_size_bytes
            detail = f"limit {limit} bytes" if limit is not None else "disk or map full"
            message = (
                f"audit log {self.path} is full ({detail}); the entry was not written and "
                f"all {self._size} committed entries are intact"
            )
            _log.warning("%s (%s)", message, exc, extra={"event": "audit_full"})
            raise AuditFull(message) from exc

    def _check_head(self, txn: lmdb.Transaction[bytes]) -> None:
        """Raise _StaleWriter if the stored head is not the one our writer state knows."""
        writer = self._writer
        if writer is None:
            return
        size = self._store.meta_value(txn, b"size")
        blocks = self._store.meta_value(txn, b"blocks")
        stored = (
            0 if size is None else read_u64(size),
            0 if blocks is None else read_u64(blocks),
        )
        if stored != (writer.size, writer.blocks):
            raise _StaleWriter

    def _put_head(self, txn: lmdb.Transaction[bytes], state: _WriterState) -> None:
        state.root = state.fold()
        meta = self._store.meta
        txn.put(b"format", u64(FORMAT_VERSION), db=meta)
        txn.put(b"size", u64(state.size), db=meta)
        txn.put(b"root", state.root, db=meta)
        txn.put(b"time", u64(state.time_ms), db=meta)

    def _install(self, state: _WriterState) -> None:
        self._writer = state
        self._size = state.size
        self._root = state.root

    def _seal(self, txn: lmdb.Transaction[bytes], state: _WriterState, now: int) -> Block:
        block = Block(
            height=state.blocks,
            previous=state.block_hash,
            first_seq=state.sealed_size,
            last_seq=state.size - 1,
            tree_size=state.size,
            root=state.fold(),
            time_ms=max(now, state.time_ms),
        )
        if self._signer is not None:
            block = block.signed_by(self._signer.key)
        encoded = block.to_bytes()
        txn.put(u64(block.height), encoded, db=self._store.blocks, append=True)
        state.blocks += 1
        state.block_hash = block.block_hash()
        state.sealed_size = state.size
        state.oldest_unsealed_ms = None
        txn.put(b"blocks", u64(state.blocks), db=self._store.meta)
        txn.put(b"block_hash", state.block_hash, db=self._store.meta)
        return block

    def _writer_state(self) -> _WriterState:
        """Load the tree border and open block on first write, checking them.

        Raises:
            StoreCorrupted: the border does not fold to the stored root, or the
                last block cannot be read.
        """
        if self._writer is not None:
            return self._writer
        store = self._store
        with store.read() as txn:
            size, root = self._size, self._root
            stack = [self._node(txn, node) for node in root_nodes(size)]
            raw_time = store.meta_value(txn, b"time")
            raw_blocks = store.meta_value(txn, b"blocks")
            blocks = 0 if raw_blocks is None else read_u64(raw_blocks)
            block_hash, sealed = GENESIS_HASH, 0
            if blocks:
                last = self._block(txn, blocks - 1)
                block_hash, sealed = last.block_hash(), last.tree_size
            oldest = None
            if sealed < size:
                oldest = self._entry(txn, sealed).time_ms
        state = _WriterState(
            size=size,
            stack=stack,
            time_ms=0 if raw_time is None else read_u64(raw_time),
            blocks=blocks,
            block_hash=block_hash,
            sealed_size=sealed,
            oldest_unsealed_ms=oldest,
            root=root,
        )
        if state.fold() != root or sealed > size:
            raise StoreCorrupted(
                f"audit log {self.path}: stored tree does not match the stored root; "
                "run verify_chain",
                where="meta",
                what="root mismatch",
            )
        self._writer = state
        return state

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("the audit log is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._store.readonly:
            raise LocalProtocolError("the audit log was opened read-only")

    # -- reading ----------------------------------------------------------------------

    def entry(self, seq: int) -> AuditEntry:
        """Entry ``seq``, re-hashed against its stored leaf hash.

        Raises:
            LocalProtocolError: no such entry.
            StoreCorrupted: the stored bytes do not match their leaf hash or do
                not decode.
        """
        self._check_open()
        with self._store.read() as txn:
            return self._entry(txn, seq)

    def _entry(self, txn: lmdb.Transaction[bytes], seq: int) -> AuditEntry:
        if type(seq) is not int or seq < 0:
            raise LocalProtocolError("sequence numbers are non-negative integers")
        value = self._store.entry(txn, seq)
        if value is None:
            if seq < self._size:
                raise StoreCorrupted(
                    f"audit entry {seq} is missing", where=f"seq {seq}", what="missing entry"
                )
            raise LocalProtocolError(f"no audit entry {seq}; the log holds {self._size}")
        stored, raw = value[:HASH_SIZE], value[HASH_SIZE:]
        if leaf_hash(raw) != stored:
            raise StoreCorrupted(
                f"audit entry {seq} does not match its leaf hash",
                where=f"seq {seq}",
                what="leaf hash mismatch",
            )
        try:
            entry = AuditEntry.from_bytes(raw)
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise StoreCorrupted(
                f"audit entry {seq} does not decode: {exc}", where=f"seq {seq}", what="undecodable"
            ) from None
        if entry.seq != seq:
            raise StoreCorrupted(
                f"audit entry stored at {seq} says {entry.seq}", where=f"seq {seq}", what="seq"
            )
        return entry

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[AuditEntry]:
        """Entries ``start <= seq < stop`` in order, each re-hashed (one read snapshot).

        Raises:
            StoreCorrupted: as for :meth:`entry`.
        """
        self._check_open()
        stop = self.size if stop is None else min(stop, self.size)
        with self._store.read() as txn:
            for seq in range(max(start, 0), stop):
                yield self._entry(txn, seq)

    def block(self, height: int) -> Block:
        """The block at ``height`` (decoded; signatures are checked by verify_chain).

        Raises:
            LocalProtocolError: no such block.
            StoreCorrupted: it does not decode.
        """
        self._check_open()
        with self._store.read() as txn:
            return self._block(txn, height)

    @property
    def block_count(self) -> int:
        """Number of sealed blocks."""
        self._check_open()
        with self._store.read() as txn:
            raw = self._store.meta_value(txn, b"blocks")
        return 0 if raw is None else read_u64(raw)

    def _block(self, txn: lmdb.Transaction[bytes], height: int) -> Block:
        raw = txn.get(u64(height), db=self._store.blocks)
        if raw is None:
            raise LocalProtocolError(f"no audit block at height {height}")
        try:
            block = Block.from_bytes(raw)
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise StoreCorrupted(
                f"audit block {height} does not decode: {exc}",
                where=f"height {height}",
                what="undecodable block",
            ) from None
        if block.height != height:
            raise StoreCorrupted(
                f"audit block stored at {height} says {block.height}",
                where=f"height {height}",
                what="height",
            )
        return block

    def query(
        self,
        kind: str | None = None,
        peer: str | None = None,
        since: int | None = None,
        until: int | None = None,
        last: int | None = None,
    ) -> list[AuditEntry]:
        """Entries matching every given filter, oldest first.

        ``since`` (inclusive) and ``until`` (exclusive) are Unix times in
        milliseconds; ``last`` keeps only the most recent matches. Kind and
        peer filters use an index; every returned entry is re-hashed and
        re-checked against the filters.

        Raises:
            LocalProtocolError: an invalid filter.
            StoreCorrupted: a matching entry fails its leaf hash.
        """
        self._check_open()
        if last is not None and (type(last) is not int or last < 0):
            raise LocalProtocolError("last must be a non-negative integer")
        if kind is not None:
            kind = check_kind(kind)
        if peer is not None:
            peer = check_peer(peer)
        size = self.size
        with self._store.read() as txn:
            low = 0 if since is None else self._first_at_or_after(txn, since, size)
            high = size if until is None else self._first_at_or_after(txn, until, size)
            if kind is not None:
                seqs = self._index_seqs(txn, b"k", kind, low, high, reverse=last is not None)
            elif peer is not None:
                seqs = self._index_seqs(txn, b"p", peer, low, high, reverse=last is not None)
            else:
                seqs = iter(range(high - 1, low - 1, -1) if last is not None else range(low, high))
            found: list[AuditEntry] = []
            for seq in seqs:
                if last is not None and len(found) >= last:
                    break
                entry = self._entry(txn, seq)
                if (kind is None or entry.kind == kind) and (peer is None or entry.peer == peer):
                    found.append(entry)
        if last is not None:
            found.reverse()
        return found

    def _first_at_or_after(self, txn: lmdb.Transaction[bytes], when: int, size: int) -> int:
        """Smallest seq whose time is >= ``when``: a binary search, as times never decrease."""
        low, high = 0, size
        while low < high:
            mid = (low + high) // 2
            if self._entry(txn, mid).time_ms < when:
                low = mid + 1
            else:
                high = mid
        return low

    def _index_seqs(
        self,
        txn: lmdb.Transaction[bytes],
        prefix: bytes,
        value: str,
        low: int,
        high: int,
        *,
        reverse: bool,
    ) -> Iterator[int]:
        if low >= high:
            return
        head = index_key(prefix, value, 0)[:-8]
        cursor = txn.cursor(db=self._store.index)
        if reverse:
            found = cursor.set_range(head + u64(high))
            moved = cursor.prev() if found else cursor.last()
            while moved:
                key = cursor.key()
                if not key.startswith(head) or len(key) != len(head) + 8:
                    return
                seq = read_u64(key[-8:])
                if seq < low:
                    return
                if seq < high:
                    yield seq
                moved = cursor.prev()
            return
        if not cursor.set_range(head + u64(low)):
            return
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(head) or len(key) != len(head) + 8:
                return
            seq = read_u64(key[-8:])
            if seq >= high:
                return
            yield seq

    # -- proofs and checkpoints ------------------------------------------------------------

    def prove_inclusion(self, seq: int, *, size: int | None = None) -> InclusionProof:
        """Inclusion proof of entry ``seq`` in the tree of ``size`` (default: now).

        Reads O(log n) stored nodes, re-hashes the entry, and checks the proof
        against the root before returning it.

        Raises:
            LocalProtocolError: ``seq`` or ``size`` out of range.
            StoreCorrupted: the stored entry or nodes are damaged.
        """
        self._check_open()
        head = self.size
        tree = head if size is None else size
        if not (type(tree) is int and type(seq) is int and 0 <= seq < tree <= head):
            raise LocalProtocolError(f"no entry {seq} in a tree of {tree} (log holds {head})")
        plan = inclusion_nodes(seq, tree)
        with self._store.read() as txn:
            leaf = self._leaf(txn, seq)
            hashes = plan.rehash([self._node(txn, node) for node in plan.ids])
            root = self._root if tree == head else self._fold_stored(txn, tree)
        proof = InclusionProof(seq, tree, leaf, tuple(hashes))
        try:
            proof.verify(root)
        except InclusionProofError:
            raise StoreCorrupted(
                f"stored nodes for entry {seq} do not lead to the root",
                where=f"seq {seq}",
                what="node mismatch",
            ) from None
        return proof

    def _leaf(self, txn: lmdb.Transaction[bytes], seq: int) -> bytes:
        value = self._store.entry(txn, seq)
        if value is None or leaf_hash(value[HASH_SIZE:]) != value[:HASH_SIZE]:
            raise StoreCorrupted(
                f"audit entry {seq} is missing or does not match its leaf hash",
                where=f"seq {seq}",
                what="leaf hash mismatch",
            )
        return bytes(value[:HASH_SIZE])

    def prove_consistency(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Consistency proof from the tree of ``old_size`` to ``new_size`` (default: now).

        Raises:
            LocalProtocolError: sizes out of range.
            StoreCorrupted: stored nodes are damaged (the proof fails its own check).
        """
        self._check_open()
        head = self.size
        second = head if new_size is None else new_size
        if not (type(old_size) is int and type(second) is int and 0 <= old_size <= second <= head):
            raise LocalProtocolError(f"invalid sizes {old_size} -> {second} (log holds {head})")
        plan = consistency_nodes(old_size, second)
        with self._store.read() as txn:
            hashes = plan.rehash([self._node(txn, node) for node in plan.ids])
            root1 = self._fold_stored(txn, old_size)
            root2 = self._root if second == head else self._fold_stored(txn, second)
        proof = ConsistencyProof(old_size, second, tuple(hashes))
        try:
            proof.verify(root1, root2)
        except ConsistencyError:
            raise StoreCorrupted(
                f"stored nodes do not prove {old_size} -> {second}",
                where=f"tree sizes {old_size}..{second}",
                what="node mismatch",
            ) from None
        return proof

    def checkpoint(self) -> Checkpoint:
        """A signed C2SP checkpoint of the current size and root.

        Raises:
            ConfigurationError: the log was opened without a signer.
        """
        self._check_open()
        if self._signer is None:
            raise ConfigurationError("this audit log has no signer; open it with signer=")
        return Checkpoint.sign(self._signer, self.size, self.root())

    # -- verification ----------------------------------------------------------------------

    def verify_chain(
        self,
        *,
        trusted_keys: Collection[VerifyKey] | None = None,
        progress: Callable[[int, int], None] | None = None,
        deep: bool = False,
    ) -> ChainReport:
        """Re-hash every entry, rebuild every node and root, check every block.

        Stops at the first problem, in sequence order, and reports where it is
        and what is wrong. Blocks are checked against the key each one names;
        with ``trusted_keys`` every block must also be signed by one of them.
        ``deep`` also decodes every entry strictly (about 3x slower).
        ``progress(done, total)`` is called every 65,536 entries.

        Raises:
            StorageError: LMDB failed while reading (corruption is reported,
                not raised, as far as LMDB lets it be).
        """
        self._check_open()
        try:
            check_data_file(self.path / DATA_FILE)
        except StoreCorrupted as exc:
            return ChainReport(0, 0, EMPTY_ROOT, ChainProblem("file", f"{exc}"))
        with self._store.read() as txn:
            scan = _ChainScan(self._store, txn, trusted_keys, progress, deep)
            return scan.run()

    # -- backup and restore ------------------------------------------------------------

    def backup(self, dest: Path | str) -> Path:
        """Write a consistent, compacted hot copy of the log into directory ``dest``.

        ``dest`` must not exist or be empty. Appends may continue meanwhile;
        the copy is the snapshot at its start.

        Raises:
            ConfigurationError: ``dest`` is not empty.
            StorageError: the copy could not be written.
        """
        self._check_open()
        target = Path(dest)
        if target.exists() and any(target.iterdir()):
            raise ConfigurationError(f"backup directory {target} is not empty")
        try:
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not create {target}: {exc.strerror or exc}") from exc
        self._store.copy_to(target)
        _fsync_tree(target)
        return target

    @classmethod
    def restore(
        cls,
        path: Path | str,
        backup: Path | str,
        *,
        clock: Clock = SYSTEM_CLOCK,
        trusted_keys: Collection[VerifyKey] | None = None,
    ) -> Path | None:
        """Replace the log at ``path`` with a verified copy of ``backup``.

        The backup is checked first: its file structure (read without
        mapping), then its whole chain. A corrupt backup is refused and
        nothing changes. The log being replaced is moved aside to
        ``<path>.replaced-<UTC stamp>`` and never deleted; that path is
        returned (``None`` if there was no log). The log must not be open.

        Raises:
            BackupInvalid: the backup is missing, damaged or fails verify_chain.
            StorageError: the files could not be moved or copied.
        """
        target, source = Path(path), Path(backup)
        _verify_backup(source, trusted_keys)
        stamp = datetime.fromtimestamp(clock.time(), tz=UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        staging = target.parent / f".{target.name}.restoring-{stamp}"
        aside = target.parent / f"{target.name}.replaced-{stamp}"
        try:
            staging.mkdir(mode=0o700, parents=True)
            shutil.copyfile(source / DATA_FILE, staging / DATA_FILE)
            _fsync_tree(staging)
            moved = None
            if target.exists():
                os.replace(target, aside)
                moved = aside
            os.replace(staging, target)
            _fsync_tree(target.parent)
        except OSError as exc:
            raise StorageError(f"could not restore {target}: {exc.strerror or exc}") from exc
        _log.warning(
            "audit log %s restored from %s; previous log kept at %s",
            target,
            source,
            moved,
            extra={"event": "audit_restored"},
        )
        return moved


def _verify_backup(source: Path, trusted_keys: Collection[VerifyKey] | None) -> None:
    if not (source / DATA_FILE).is_file():
        raise BackupInvalid(f"no audit log backup in {source}")
    try:
        check_data_file(source / DATA_FILE, full=True)
        store = AuditStore.open(source, readonly=True, lock=False)
    except (StoreCorrupted, StorageError) as exc:
        raise BackupInvalid(f"audit backup {source} is damaged: {exc}") from None
    try:
        log = AuditLog(
            store,
            clock=SYSTEM_CLOCK,
            signer=None,
            block_entries=DEFAULT_BLOCK_ENTRIES,
            block_seconds=DEFAULT_BLOCK_SECONDS,
        )
        report = log.verify_chain(trusted_keys=trusted_keys)
    except (StorageError, UnsupportedVersion) as exc:
        store.close()
        raise BackupInvalid(f"audit backup {source} cannot be read: {exc}") from None
    log.close()
    if report.problem is not None:
        raise BackupInvalid(f"audit backup {source} fails verification: {report.problem}")


def _fsync_tree(directory: Path) -> None:
    """fsync every file in ``directory`` and the directory itself."""
    for item in directory.iterdir():
        if item.is_file():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(future: asyncio.Future[int], seq: int | None, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    elif seq is not None:
        future.set_result(seq)


def _prepare(kind: str, data: Mapping[str, Any], peer: str | None) -> _Prepared:
    """Validate and encode a record before any lock is taken (worst-case size check)."""
    # The caches below take plain text: anything else (an AuditKind, a bad
    # type) is checked, and turned into a plain ``str`` or refused, first.
    if type(kind) is not str:
        kind = check_kind(kind)
    if peer is not None and type(peer) is not str:
        peer = check_peer(peer)
    kind, kind_key = _kind_key(kind)
    peer_key = None
    if peer is not None:
        peer, peer_key = _peer_key(peer)
    return _Prepared(entry_middle(kind, peer, encode_data(data)), kind_key, peer_key)


# A process logs few kinds and a bounded working set of peers: checking and
# encoding each once saves a regex match and two key encodings per append.
@functools.lru_cache(maxsize=256)
def _kind_key(kind: str) -> tuple[str, bytes]:
    """The checked kind (a plain ``str``) and its index key prefix."""
    kind = check_kind(kind)
    return kind, index_key(b"k", kind, 0)[:-8]


@functools.lru_cache(maxsize=4096)
def _peer_key(peer: str) -> tuple[str, bytes]:
    """The checked peer (a plain ``str``) and its index key prefix."""
    check_peer(peer)
    peer = str(peer)
    return peer, index_key(b"p", peer, 0)[:-8]


class _ChainScan:
    """One pass over entries, nodes and blocks in key order (see verify_chain)."""

    def __init__(
        self,
        store: AuditStore,
        txn: lmdb.Transaction[bytes],
        trusted_keys: Collection[VerifyKey] | None,
        progress: Callable[[int, int], None] | None,
        deep: bool,
    ) -> None:
        self.store, self.txn = store, txn
        self.trusted = None if trusted_keys is None else {key.raw: key for key in trusted_keys}
        self.progress, self.deep = progress, deep
        self.stack: list[bytes] = []
        self.size = 0
        self.height = 0
        self.previous = GENESIS_HASH
        self.signers: dict[bytes, None] = {}
        self.unsigned = 0
        self.last_time = 0
        self.expected_first = 0

    def run(self) -> ChainReport:
        try:
            self._scan()
        except _Broken as broken:
            return self._report(broken.problem)
        return self._report(None)

    def _report(self, problem: ChainProblem | None) -> ChainReport:
        root = fold_subtrees(self.stack) if self.stack else EMPTY_ROOT
        return ChainReport(
            self.size, self.height, root, problem, tuple(self.signers), self.unsigned
        )

    def _scan(self) -> None:
        store, txn = self.store, self.txn
        raw_size = store.meta_value(txn, b"size")
        total = 0 if raw_size is None else read_u64(raw_size)
        nodes = txn.cursor(db=store.nodes).iternext()
        blocks = txn.cursor(db=store.blocks).iternext()
        block = self._next_block(blocks)
        for key, value in txn.cursor(db=store.entries).iternext():
            seq = self.size
            if key != u64(seq):
                raise _Broken(ChainProblem("entry", "entry missing or out of order", seq=seq))
            leaf = leaf_hash(value[HASH_SIZE:])
            if len(value) <= HASH_SIZE or leaf != value[:HASH_SIZE]:
                raise _Broken(
                    ChainProblem("entry", "entry bytes do not match the stored leaf hash", seq=seq)
                )
            if self.deep:
                self._check_entry(seq, value[HASH_SIZE:])
            self._push(leaf, seq, nodes)
            while block is not None and block.tree_size == self.size:
                self._check_block(block)
                block = self._next_block(blocks)
            if block is not None and block.tree_size < self.size:
                raise _Broken(
                    ChainProblem("block", "block out of order or range", height=block.height)
                )
            if self.progress is not None and self.size % _PROGRESS_EVERY == 0:
                self.progress(self.size, total)
        self._finish(nodes, block, total)

    def _push(self, leaf: bytes, seq: int, nodes: Iterator[tuple[bytes, bytes]]) -> None:
        value, index, level = leaf, seq, 0
        stack = self.stack
        while index & 1:
            value = node_hash(stack.pop(), value)
            index >>= 1
            level += 1
            node = NodeID(level, index)
            stored = next(nodes, None)
            if stored is None or stored[0] != node_key(node):
                raise _Broken(ChainProblem("node", "stored node missing", seq=seq, node=node))
            if stored[1] != value:
                raise _Broken(
                    ChainProblem(
                        "node", "stored node does not match the entries", seq=seq, node=node
                    )
                )
        stack.append(value)
        self.size += 1

    def _check_entry(self, seq: int, raw: bytes) -> None:
        try:
            entry = AuditEntry.from_bytes(raw)
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise _Broken(ChainProblem("entry", f"entry does not decode: {exc}", seq=seq)) from None
        if entry.seq != seq:
            raise _Broken(ChainProblem("entry", f"entry says seq {entry.seq}", seq=seq))
        if entry.time_ms < self.last_time:
            raise _Broken(ChainProblem("entry", "entry time goes backwards", seq=seq))
        self.last_time = entry.time_ms

    def _next_block(self, blocks: Iterator[tuple[bytes, bytes]]) -> Block | None:
        item = next(blocks, None)
        if item is None:
            return None
        height = self.height
        if item[0] != u64(height):
            raise _Broken(ChainProblem("block", "block missing or out of order", height=height))
        try:
            return Block.from_bytes(item[1])
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise _Broken(
                ChainProblem("block", f"block does not decode: {exc}", height=height)
            ) from None

    def _check_block(self, block: Block) -> None:
        height = self.height
        problems = [
            (block.height != height, "block names another height"),
            (block.previous != self.previous, "previous-block hash does not match"),
            (block.first_seq != self.expected_first, "block range does not follow the last one"),
            (block.root != fold_subtrees(self.stack), "block root does not match the entries"),
        ]
        for bad, what in problems:
            if bad:
                raise _Broken(ChainProblem("block", what, height=height))
        self._check_signature(block)
        self.previous = block.block_hash()
        self.expected_first = block.last_seq + 1
        self.height += 1

    def _check_signature(self, block: Block) -> None:
        height = block.height
        if block.public_key is None:
            if self.trusted is not None:
                raise _Broken(ChainProblem("block", "block is not signed", height=height))
            self.unsigned += 1
            return
        key = None
        if self.trusted is not None:
            key = self.trusted.get(block.public_key)
            if key is None:
                raise _Broken(ChainProblem("block", "signed by an untrusted key", height=height))
        try:
            block.verify_signature(key)
        except SignatureInvalid as exc:
            raise _Broken(ChainProblem("block", f"signature: {exc}", height=height)) from None
        self.signers[block.public_key] = None

    def _finish(
        self, nodes: Iterator[tuple[bytes, bytes]], block: Block | None, total: int
    ) -> None:
        if next(nodes, None) is not None:
            raise _Broken(ChainProblem("node", "stored node beyond the last entry"))
        if block is not None:
            raise _Broken(ChainProblem("block", "block beyond the last entry", height=block.height))
        store, txn = self.store, self.txn
        root = fold_subtrees(self.stack) if self.stack else EMPTY_ROOT
        raw_blocks = store.meta_value(txn, b"blocks")
        raw_hash = store.meta_value(txn, b"block_hash")
        stored_root = store.meta_value(txn, b"root") or EMPTY_ROOT
        blocks = 0 if raw_blocks is None or len(raw_blocks) != 8 else read_u64(raw_blocks)
        checks = [
            (total != self.size, f"metadata says {total} entries, found {self.size}"),
            (stored_root != root, "stored root does not match the entries"),
            (blocks != self.height, f"metadata says {blocks} blocks, found {self.height}"),
            ((raw_hash or GENESIS_HASH) != self.previous, "last block hash does not match"),
        ]
        for bad, what in checks:
            if bad:
                raise _Broken(ChainProblem("meta", what))
        if self.progress is not None:
            self.progress(self.size, total)
