"""The audit log's one writer: the tree's right border, the head, and write transactions.

Rules this module keeps:

* Append-only. Entry ``n`` is leaf ``n``; appending it stores the entry (with
  its leaf hash), every perfect subtree it completes, the new size and root,
  and, when one is due, a signed block, all in one LMDB write transaction,
  durable when :meth:`LogWriter.commit` returns.
* The index trails the log: an entry's index rows are written with the
  commit that brings the unindexed entries to :data:`INDEX_BATCH` (so a
  one-message commit writes no index page, and the batch's rows share
  their pages), with a commit that asks for it (``index=True``: pruning),
  and never later than that. ``meta["indexed"]`` says how far they go, in
  the same transaction; the rows are derived from the entries, so nothing
  the log promises waits on them.
* Entry times never go backwards: a batch gets ``max(clock, previous time)``,
  so the log is ordered by time as well as by sequence.
* In-memory state (border, size, root, open block) is built on a copy and
  installed only after the transaction committed; a failed transaction
  leaves it as it was.
* The border is loaded on the first write and must fold to the stored root;
  if it does not, nothing is written (:class:`~talos.errors.StoreCorrupted`).
* Another process may write between our transactions (a CLI command next to
  a running agent): the stored head is compared with ours inside every write
  transaction, and a stale writer reloads and retries.
* A full disk or map raises :class:`~talos.errors.AuditFull` and logs a
  warning on the ``talos.audit`` logger. With :attr:`LogWriter.make_room`
  set (``prune_after_anchor``), a commit that did not fit first asks it to
  prune anchored payloads, and is tried once more if it did.
* :attr:`LogWriter.lock` serializes every write and the log's closing.
* Block watchers (:meth:`LogWriter.watch_blocks`) are called with each sealed
  block after its transaction committed and the lock was released (the
  agent's watermark follows the log, never leads it).

Imported by :mod:`talos.audit.log`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import lmdb

from talos.audit.blocks import BlockSealer, OpenBlock
from talos.audit.records import PreparedRecord
from talos.audit.store import FORMAT_VERSION, AuditStore, Head, index_key
from talos.core.audit.checkpoint import Block
from talos.core.audit.entry import finish_entries
from talos.core.audit.merkle import EMPTY_ROOT, fold_subtrees
from talos.core.clock import Clock, time_ms
from talos.errors import AuditFull, LocalProtocolError, StorageError, StoreCorrupted
from talos.storage.lmdb import u64

__all__ = ["INDEX_BATCH", "LogWriter", "WriterState"]

_log = logging.getLogger("talos.audit")

_STALE_RETRIES: Final = 5
#: Unindexed entries that make a commit write their index rows. A query reads
#: at most this many entries beyond the index; 64 rows share a few pages.
INDEX_BATCH: Final = 64
_T = TypeVar("_T")
_sha256 = hashlib.sha256
_pack_u64 = struct.Struct(">Q").pack  # storage.lmdb.u64
_pack_node = struct.Struct(">QB").pack  # audit.store.node_key: (last leaf, level)


class _StaleWriter(Exception):
    """Another process committed since this writer loaded its state: reload and retry."""


@dataclass(slots=True)
class WriterState:
    """What a writer must know: the right border of the tree and the open block."""

    size: int
    stack: list[bytes]
    time_ms: int
    chain: OpenBlock
    root: bytes = field(default=EMPTY_ROOT)
    #: Entries below this have their index rows on disk (``meta["indexed"]``).
    indexed: int = 0
    #: The index keys of the entries from :attr:`indexed` to :attr:`size`, not yet written.
    unindexed: list[bytes] = field(default_factory=list)
    #: The last block sealed by the transaction this state was built in.
    sealed: Block | None = None

    def copy(self) -> WriterState:
        return WriterState(
            self.size,
            list(self.stack),
            self.time_ms,
            self.chain.copy(),
            self.root,
            self.indexed,
            list(self.unindexed),
        )

    def fold(self) -> bytes:
        return fold_subtrees(self.stack) if self.stack else EMPTY_ROOT


class LogWriter:
    """Commits entries and blocks to an :class:`AuditStore` and keeps the log's :class:`Head`."""

    def __init__(self, store: AuditStore, head: Head, sealer: BlockSealer, *, clock: Clock) -> None:
        self._store = store
        self._head = head
        self._sealer = sealer
        self._clock = clock
        #: Held by every write transaction, and while the log closes.
        self.lock = threading.Lock()
        self.closed = False
        self._state: WriterState | None = None
        self._watchers: list[Callable[[Block], None]] = []
        self._sealed: Block | None = None
        #: Called (without the lock) when a commit does not fit; True: try again.
        self.make_room: Callable[[], bool] | None = None
        #: Per thread: an AuditFull warning waits until pruning did not help.
        self._quiet = threading.local()

    def watch_blocks(self, callback: Callable[[Block], None]) -> None:
        """Call ``callback(block)`` after each block this writer sealed is committed."""
        self._watchers.append(callback)

    def _tell_watchers(self) -> None:
        """Hand the last committed block to the watchers (called without the lock)."""
        with self.lock:
            block, self._sealed = self._sealed, None
        if block is not None:
            for callback in self._watchers:
                callback(block)

    @property
    def started(self) -> bool:
        """Whether this writer has loaded its state (it wrote, or was asked to)."""
        return self._state is not None

    def check_writable(self) -> None:
        """Refuse to write to a closed or read-only log.

        Raises:
            LocalProtocolError: the log is closed or read-only.
        """
        if self.closed:
            raise LocalProtocolError("the audit log is closed")
        if self._store.readonly:
            raise LocalProtocolError("the audit log was opened read-only")

    def refresh_head(self) -> None:
        """Reread the head from disk (another process may have written)."""
        with self._store.read() as txn:
            stored = self._store.head(txn)
        self._head.size, self._head.root = stored.size, stored.root

    def stop(self) -> None:
        """Refuse every later write (waits for the one in progress)."""
        with self.lock:
            self.closed = True

    # -- transactions --------------------------------------------------------------

    def commit(
        self,
        records: Sequence[PreparedRecord],
        apply: Callable[[lmdb.Transaction[bytes]], None] | None = None,
        *,
        room: bool = True,
        index: bool = False,
    ) -> list[int]:
        """Append ``records`` (and run ``apply(txn)``) in one durable transaction.

        Returns the entries' sequence numbers. When it does not fit and
        ``room`` is true, :attr:`make_room` may free space first. With
        ``index``, every entry's index rows are written by this transaction
        (before ``apply`` runs), whatever :data:`INDEX_BATCH` says.

        Raises:
            LocalProtocolError: the log is read-only or closed.
            AuditFull: no room; nothing was written.
            StoreCorrupted: the stored border does not match the stored root.
            StorageError: LMDB failed, or the log kept changing under this writer.
        """
        if not room or self.make_room is None:
            return self._commit(records, apply, index)
        try:
            self._quiet.full = True
            return self._commit(records, apply, index)
        except AuditFull as full:
            if not self.make_room():
                _log.warning("%s", full, extra={"event": "audit_full"})
                raise
        finally:
            self._quiet.full = False
        return self._commit(records, apply, index)

    def _commit(
        self,
        records: Sequence[PreparedRecord],
        apply: Callable[[lmdb.Transaction[bytes]], None] | None,
        index: bool,
    ) -> list[int]:
        with self.lock:
            seqs = self._with_fresh_state(lambda: self._commit_once(records, apply, index))
        if self._watchers:
            self._tell_watchers()
        return seqs

    def seal_now(self) -> Block | None:
        """Seal the unsealed entries into a block now; ``None`` if there are none.

        Raises:
            AuditFull, StorageError: as for :meth:`commit`.
        """
        with self.lock:
            block = self._with_fresh_state(self._seal_now_once)
        if self._watchers:
            self._tell_watchers()
        return block

    def seal_if_due(self) -> None:
        """Seal a block if the oldest unsealed entry is old enough.

        Raises:
            AuditFull, StorageError: as for :meth:`commit`.
        """
        with self.lock:
            self._with_fresh_state(self._seal_if_due_once)
        if self._watchers:
            self._tell_watchers()

    def _with_fresh_state(self, operation: Callable[[], _T]) -> _T:
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
                self._state = None
                self.refresh_head()
        raise StorageError(f"audit log {self._store.path} keeps changing under this writer")

    def _seal_now_once(self) -> Block | None:
        self.check_writable()
        state = self._loaded().copy()
        if state.size == state.chain.sealed_size:
            return None
        with self._write_txn() as txn:
            block = self._seal(txn, state, time_ms(self._clock))
            self._put_head(txn, state)
        self._install(state)
        return block

    def _seal_if_due_once(self) -> None:
        state = self._loaded()
        now = time_ms(self._clock)
        if not self._sealer.due(state.chain, now):
            return
        state = state.copy()
        with self._write_txn() as txn:
            self._seal(txn, state, now)
            self._put_head(txn, state)
        self._install(state)

    def _commit_once(
        self,
        records: Sequence[PreparedRecord],
        apply: Callable[[lmdb.Transaction[bytes]], None] | None = None,
        index: bool = False,
    ) -> list[int]:
        """One write transaction for ``records`` (lock held). State changes only on success.

        The whole batch gets one time, ``max(clock, previous time)``: that is
        what stamping each entry in turn gave too, as times never go back.
        Entries, nodes and (when due) index rows are built first and then
        written with one ``putmulti`` per sub-database; entry and node keys
        only grow.
        """
        self.check_writable()
        state = self._loaded().copy()
        now = time_ms(self._clock)
        store, sealer, chain = self._store, self._sealer, state.chain
        block_entries = sealer.block_entries
        first = state.size
        with self._write_txn() as txn:
            if sealer.due(chain, now):
                self._seal(txn, state, now)
            if records:
                state.time_ms = max(now, state.time_ms)
            raws = finish_entries(first, state.time_ms, [r.middle for r in records])
            entry_rows: list[tuple[bytes, bytes]] = []
            node_rows: list[tuple[bytes, bytes]] = []
            unindexed = state.unindexed
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
                unindexed.append(record.kind_key + key)
                if record.peer_key is not None:
                    unindexed.append(record.peer_key + key)
                state.size = seq + 1
                if chain.oldest_unsealed_ms is None:
                    chain.oldest_unsealed_ms = state.time_ms
                if state.size - chain.sealed_size >= block_entries:
                    self._seal(txn, state, now)
            self._append_rows(txn, store.entries, entry_rows)
            self._append_rows(txn, store.nodes, node_rows)
            if index or state.size - state.indexed >= INDEX_BATCH:
                # In arrival order: sorting them first was no faster and left the
                # index a third larger (more half-full pages after splits).
                txn.cursor(db=store.index).putmulti([(key, b"") for key in unindexed])
                unindexed.clear()
                state.indexed = state.size
            if records or state.sealed is not None or not first:
                # Without entries or a block the head is unchanged: rewriting it
                # would cost the commit a page of the meta database for nothing.
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
                f"audit log {self._store.path} holds rows beyond its stored size; run verify_chain",
                where="meta",
                what="rows beyond size",
            )

    @contextlib.contextmanager
    def _write_txn(self) -> Iterator[lmdb.Transaction[bytes]]:
        """A write transaction whose AuditFull is logged and explained."""
        store = self._store
        try:
            with store.write() as txn:
                self._check_head(txn)
                yield txn
        except AuditFull as exc:
            limit = store.environment.max_size_bytes
            detail = f"limit {limit} bytes" if limit is not None else "disk or map full"
            message = (
                f"audit log {store.path} is full ({detail}); the entry was not written and "
                f"all {self._head.size} committed entries are intact"
            )
            if not getattr(self._quiet, "full", False):
                _log.warning("%s (%s)", message, exc, extra={"event": "audit_full"})
            raise AuditFull(message) from exc

    def _check_head(self, txn: lmdb.Transaction[bytes]) -> None:
        """Raise _StaleWriter if the stored head is not the one our writer state knows."""
        state = self._state
        if state is None:
            return
        store = self._store
        stored = (store.meta_count(txn, b"size"), store.meta_count(txn, b"blocks"))
        if stored != (state.size, state.chain.blocks):
            raise _StaleWriter

    def _seal(self, txn: lmdb.Transaction[bytes], state: WriterState, now: int) -> Block:
        state.sealed = self._sealer.seal(
            txn,
            state.chain,
            size=state.size,
            root=state.fold(),
            time_ms=max(now, state.time_ms),
        )
        return state.sealed

    def _put_head(self, txn: lmdb.Transaction[bytes], state: WriterState) -> None:
        state.root = state.fold()
        meta = self._store.meta
        txn.put(b"format", u64(FORMAT_VERSION), db=meta)
        txn.put(b"size", u64(state.size), db=meta)
        txn.put(b"root", state.root, db=meta)
        txn.put(b"time", u64(state.time_ms), db=meta)
        txn.put(b"indexed", u64(state.indexed), db=meta)

    def _install(self, state: WriterState) -> None:
        if state.sealed is not None:
            self._sealed, state.sealed = state.sealed, None
        self._state = state
        self._head.size = state.size
        self._head.root = state.root

    def _loaded(self) -> WriterState:
        """Load the tree border and open block on first write, checking them.

        Raises:
            StoreCorrupted: the border does not fold to the stored root, or the
                last block cannot be read.
        """
        if self._state is not None:
            return self._state
        store = self._store
        size, root = self._head.size, self._head.root
        with store.read() as txn:
            stack = store.border(txn, size)
            chain = OpenBlock.load(store, txn, size)
            indexed = store.indexed_below(txn, size)
            state = WriterState(
                size,
                stack,
                store.meta_count(txn, b"time"),
                chain,
                root,
                indexed,
                _index_keys(store, txn, indexed, size),
            )
        if state.fold() != root or chain.sealed_size > size:
            raise StoreCorrupted(
                f"audit log {store.path}: stored tree does not match the stored root; "
                "run verify_chain",
                where="meta",
                what="root mismatch",
            )
        self._state = state
        return state


def _index_keys(
    store: AuditStore, txn: lmdb.Transaction[bytes], start: int, size: int
) -> list[bytes]:
    """The index keys of entries ``[start, size)``, read back (fewer than INDEX_BATCH).

    An entry that cannot be read (damaged; or pruned, which the pruning point's
    rule forbids) gets no index rows and a warning: writing goes on, as it did
    when index rows were written with their entry, and a query that reaches the
    entry still says what is wrong with it.
    """
    keys: list[bytes] = []
    for seq in range(start, size):
        try:
            entry = store.entry(txn, seq, size)
        except (StoreCorrupted, LocalProtocolError) as exc:
            _log.warning(
                "audit entry %d not indexed: %s",
                seq,
                exc,
                extra={"event": "audit_entry_not_indexed", "entry": seq},
            )
            continue
        keys.append(index_key(b"k", entry.kind, seq))
        if entry.peer is not None:
            keys.append(index_key(b"p", entry.peer, seq))
    return keys
