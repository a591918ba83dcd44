"""The tamper-evident audit log: an RFC 9162 Merkle tree of entries in LMDB.

:class:`AuditLog` is the public face. It owns the log's lifecycle (open,
close) and hands each operation to the module that owns it:

* :mod:`talos.audit.records` checks and encodes records before any lock;
* :mod:`talos.audit.writer` commits them (the tree border, the head,
  transactions), :mod:`talos.audit.group_commit` batches the appends of one
  event-loop tick, :mod:`talos.audit.blocks` seals blocks;
* :mod:`talos.audit.store` reads single rows, re-hashed;
  :mod:`talos.audit.reading` runs queries; :mod:`talos.audit.proofs` proves;
* :mod:`talos.audit.integrity` scans the whole chain;
  :mod:`talos.audit.backup` backs up and restores.

The log lives in the agent's LMDB environment
(:class:`talos.storage.environment.Environment`), which may hold other state
too: :meth:`AuditLog.append_with` commits audit entries and that state's rows
in one transaction. When an append returns, its transaction is on disk;
every read that feeds a decision re-hashes (LMDB has no checksums).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Self

import lmdb

from talos.audit import backup as _backup
from talos.audit import proofs
from talos.audit.blocks import (
    DEFAULT_BLOCK_ENTRIES,
    DEFAULT_BLOCK_SECONDS,
    BlockSealer,
    check_block_settings,
)
from talos.audit.group_commit import GroupCommit
from talos.audit.integrity import ChainProblem, ChainReport
from talos.audit.integrity import verify_chain as _verify_chain
from talos.audit.pruning import Pruner, PruneStep, Pruning
from talos.audit.reading import Query
from talos.audit.records import AuditRecord, prepare
from talos.audit.store import FORMAT_VERSION, AuditStore, Head, PrunedEntry
from talos.audit.writer import LogWriter
from talos.core.audit.checkpoint import (
    Block,
    Checkpoint,
    ConsistencyProof,
    InclusionProof,
    LogSigner,
)
from talos.core.audit.entry import AuditEntry
from talos.core.clock import Clock
from talos.core.crypto import VerifyKey
from talos.errors import ConfigurationError, LocalProtocolError, StorageError
from talos.storage.environment import Environment
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

#: Records as ``append_many`` and ``append_with`` take them: ``(kind, data, peer)``.
_Records = Iterable[tuple[str, Mapping[str, Any], str | None]]


class AuditLog:
    """An append-only, Merkle-hashed, block-sealed audit log in one LMDB environment.

    Open with :meth:`open` (or build one on an open :class:`Environment`);
    use as a context manager or call :meth:`close`. One process writes a log
    at a time; other processes may open it ``readonly`` to query and verify.
    """

    def __init__(
        self,
        environment: Environment,
        *,
        clock: Clock = SYSTEM_CLOCK,
        signer: LogSigner | None = None,
        block_entries: int = DEFAULT_BLOCK_ENTRIES,
        block_seconds: float = DEFAULT_BLOCK_SECONDS,
        commit_thread: bool = True,
        close_environment: bool = False,
        prune_after_anchor: bool = False,
    ) -> None:
        """Build the log on an open ``environment``; closed with it if ``close_environment``.

        With ``prune_after_anchor``, a log near its size limit (after each
        block) and an append that does not fit prune the payloads a final
        anchor covers first (:meth:`prune_anchored`).

        Raises:
            ConfigurationError: a block setting is not positive.
            UnsupportedVersion: the log was written by a newer Talos.
            StorageError: LMDB failed.
        """
        store = AuditStore(environment)
        with store.read() as txn:
            store.check_format(txn)
            head = store.head(txn)
        self._store = store
        self._environment = environment
        self._close_environment = close_environment
        self._signer = signer
        self._head = head
        sealer = BlockSealer(
            store, signer=signer, block_entries=block_entries, block_seconds=block_seconds
        )
        self._sealer = sealer
        self._writer = LogWriter(store, head, sealer, clock=clock)
        self._pruner = Pruner(store, self._writer, enabled=prune_after_anchor)
        if prune_after_anchor:
            self._writer.make_room = self._pruner.make_room
            self._writer.watch_blocks(lambda _block: self._pruner.check_room())
        self._group = GroupCommit(self._writer.commit, in_thread=commit_thread)

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
        prune_after_anchor: bool = False,
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
        check_block_settings(block_entries, block_seconds)
        environment = Environment.open(
            Path(path),
            max_size_bytes=max_size_bytes,
            readonly=readonly,
            extra_databases=extra_databases,
        )
        try:
            return cls(
                environment,
                clock=clock,
                signer=signer,
                block_entries=block_entries,
                block_seconds=block_seconds,
                commit_thread=commit_thread,
                close_environment=True,
                prune_after_anchor=prune_after_anchor,
            )
        except BaseException:
            environment.close()
            raise

    def close(self) -> None:
        """Commit what is still queued, seal a block if one is due, and close.

        Raises:
            AuditFull: the queued entries or the block did not fit (they are
                lost and their callers get the same error; earlier ones stay).
            StorageError: LMDB failed.
        """
        writer = self._writer
        if writer.closed:
            return
        try:
            if not self._store.readonly and (writer.started or self._group.pending):
                self._group.drain()
                writer.seal_if_due()
        finally:
            writer.stop()
            if self._close_environment:
                self._environment.close()

    async def aclose(self) -> None:
        """Wait for in-flight group commits, then :meth:`close`."""
        await self._group.wait()
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def environment(self) -> Environment:
        """The LMDB environment this log lives in."""
        return self._environment

    # -- head --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of committed entries (re-read from disk for a read-only log)."""
        return self._current_head().size

    def root(self) -> bytes:
        """Merkle root of all committed entries, O(1) (stored by every commit that appends)."""
        return self._current_head().root

    def root_at(self, size: int) -> bytes:
        """Merkle root of the first ``size`` entries, from O(log n) stored nodes.

        Raises:
            LocalProtocolError: ``size`` is larger than the log.
            StoreCorrupted: a stored node is missing.
        """
        return proofs.root_at(self._store, self._current_head(), size)

    def _current_head(self) -> Head:
        """A copy of the head, re-read first for a read-only log (another process writes)."""
        self._check_open()
        if self._store.readonly:
            self._writer.refresh_head()
        return Head(self._head.size, self._head.root)

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
        return self._writer.commit([prepare(kind, data, peer)])[0]

    def append_with(
        self, records: _Records, apply: Callable[[lmdb.Transaction[bytes]], None]
    ) -> list[int]:
        """Append ``records`` and run ``apply(txn)`` in the same durable transaction.

        ``apply`` writes the caller's own rows into databases named at
        :meth:`open` (see :meth:`database`). All or nothing: if ``apply`` or
        the append fails, neither the entries nor the rows are written, and
        the exception propagates. Returns the entries' sequence numbers.

        Raises:
            The same as :meth:`append`, and whatever ``apply`` raises.
        """
        prepared = [prepare(kind, data, peer) for kind, data, peer in records]
        return self._writer.commit(prepared, apply)

    def database(self, name: str) -> Any:
        """The handle of an extra database named at :meth:`open`.

        Raises:
            LocalProtocolError: no such database was opened.
        """
        return self._environment.database(name)

    def snapshot(self) -> AbstractContextManager[lmdb.Transaction[bytes]]:
        """A read transaction: a consistent view of the log and the extra databases
        (``with log.snapshot() as txn``).

        Raises:
            LocalProtocolError: the log is closed (at once, not on entering).
        """
        self._check_open()
        return self._store.read()

    def append_many(self, records: _Records) -> list[int]:
        """Append several entries in one durable transaction; all or none are written.

        Each item is ``(kind, data, peer)``, e.g. an :class:`AuditRecord`.

        Raises:
            The same as :meth:`append`.
        """
        prepared = [prepare(kind, data, peer) for kind, data, peer in records]
        if not prepared:
            return []
        return self._writer.commit(prepared)

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
        record = prepare(kind, data, peer)
        self._writer.check_writable()
        return await self._group.append(record)

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
        self._writer.seal_if_due()
        with contextlib.suppress(StorageError):
            self._environment.sync()

    def watch_blocks(self, callback: Callable[[Block], None]) -> None:
        """Call ``callback(block)`` in the writing thread once each sealed block is on disk."""
        self._writer.watch_blocks(callback)

    def seal_block(self) -> Block | None:
        """Seal the unsealed entries into a block now; ``None`` if there are none.

        Raises:
            AuditFull, StorageError: as for :meth:`append`.
        """
        self._writer.check_writable()
        return self._writer.seal_now()

    # -- reading ----------------------------------------------------------------------

    def entry(self, seq: int) -> AuditEntry:
        """Entry ``seq``, re-hashed against its stored leaf hash.

        Raises:
            LocalProtocolError: no such entry; ``EntryPruned`` (one) when its
                payload was pruned after anchoring.
            StoreCorrupted: the stored bytes do not match their leaf hash or do
                not decode.
        """
        self._check_open()
        with self._store.read() as txn:
            return self._store.entry(txn, seq, self._head.size)

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[AuditEntry]:
        """Entries ``start <= seq < stop`` in order, each re-hashed (one read snapshot).

        Raises:
            EntryPruned: an entry's payload was pruned (see :meth:`rows`).
            StoreCorrupted: as for :meth:`entry`.
        """
        size = self.size
        stop = size if stop is None else min(stop, size)
        with self._store.read() as txn:
            for seq in range(max(start, 0), stop):
                yield self._store.entry(txn, seq, self._head.size)

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[AuditEntry | PrunedEntry]:
        """As :meth:`entries`, with a :class:`PrunedEntry` (seq, leaf hash) for each pruned one.

        Raises:
            StoreCorrupted: as for :meth:`entry`.
        """
        size = self.size
        stop = size if stop is None else min(stop, size)
        with self._store.read() as txn:
            for seq in range(max(start, 0), stop):
                yield self._store.entry_or_pruned(txn, seq, size)

    # -- pruning -----------------------------------------------------------------------

    @property
    def prune_after_anchor(self) -> bool:
        """Whether this log prunes what final anchors cover (``audit_config``)."""
        return self._pruner.enabled

    def pruning(self) -> Pruning:
        """The pruning point (entries below it may be pruned) and the payloads dropped."""
        self._check_open()
        return self._pruner.state()

    def prune_anchored(self, *, limit: int | None = None) -> list[PruneStep]:
        """Drop the payloads of entries a final anchor covers; one transaction per step.

        Works whether or not the log was opened with ``prune_after_anchor``
        (that setting says who calls it: the anchoring driver, and a full
        log). Rules: :mod:`talos.core.audit.pruning`. Each step appends an
        ``AUDIT_PRUNED`` entry; returns the steps, none when nothing is due.

        Raises:
            LocalProtocolError: the log is read-only or closed.
            StoreCorrupted: an entry to prune does not match its leaf hash.
            AuditFull, StorageError: as for :meth:`append`; earlier steps stay done.
        """
        if limit is None:
            return self._pruner.prune()
        return self._pruner.prune(limit=limit)

    def watch_pruning(self, callback: Callable[[PruneStep], None]) -> None:
        """Call ``callback(step)`` after each pruning step is on disk."""
        self._pruner.watch(callback)

    def hold_pruning(self, needed_below: Callable[[], int]) -> None:
        """Keep the payloads at and past ``needed_below()`` when pruning after an anchor
        (the audit mirrors' acknowledged size: talos.client.mirroring)."""
        self._pruner.hold(needed_below)

    def block(self, height: int) -> Block:
        """The block at ``height`` (decoded; signatures are checked by verify_chain).

        Raises:
            LocalProtocolError: no such block.
            StoreCorrupted: it does not decode.
        """
        self._check_open()
        with self._store.read() as txn:
            return self._store.block(txn, height)

    @property
    def block_count(self) -> int:
        """Number of sealed blocks."""
        self._check_open()
        with self._store.read() as txn:
            return self._store.meta_count(txn, b"blocks")

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
        query = Query.checked(kind, peer, since, until, last)
        size = self.size
        with self._store.read() as txn:
            return query.run(self._store, txn, size)

    # -- proofs and checkpoints ------------------------------------------------------------

    def prove_inclusion(self, seq: int, *, size: int | None = None) -> InclusionProof:
        """Inclusion proof of entry ``seq`` in the tree of ``size`` (default: now).

        Reads O(log n) stored nodes, re-hashes the entry, and checks the proof
        against the root before returning it.

        Raises:
            LocalProtocolError: ``seq`` or ``size`` out of range.
            StoreCorrupted: the stored entry or nodes are damaged.
        """
        return proofs.prove_inclusion(self._store, self._current_head(), seq, size)

    def prove_consistency(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Consistency proof from the tree of ``old_size`` to ``new_size`` (default: now).

        Raises:
            LocalProtocolError: sizes out of range.
            StoreCorrupted: stored nodes are damaged (the proof fails its own check).
        """
        return proofs.prove_consistency(self._store, self._current_head(), old_size, new_size)

    def use_signer(self, signer: LogSigner) -> None:
        """Sign blocks and checkpoints from now on with ``signer`` (after a key rotation).

        Blocks name the key that signed them; ``verify-chain`` trusts every key
        of the agent's key log, so a chain signed by successive keys verifies.
        A block being sealed at this moment is signed by one key or the other.
        """
        self._signer = signer
        self._sealer.use_signer(signer)

    def checkpoint(self) -> Checkpoint:
        """A signed C2SP checkpoint of the current size and root.

        Raises:
            ConfigurationError: the log was opened without a signer.
        """
        self._check_open()
        if self._signer is None:
            raise ConfigurationError("this audit log has no signer; open it with signer=")
        return Checkpoint.sign(self._signer, self.size, self.root())

    # -- verification, backup and restore --------------------------------------------------

    def verify_chain(
        self,
        *,
        trusted_keys: Collection[VerifyKey] | None = None,
        progress: Callable[[int, int], None] | None = None,
        deep: bool = False,
    ) -> ChainReport:
        """Re-hash every entry, rebuild every node and root, check every block.

        Stops at the first problem and reports where and what it is (see
        :mod:`talos.audit.integrity`). With ``trusted_keys`` every block must
        be signed by one of them. ``deep`` also decodes every entry strictly
        (about 3x slower). ``progress(done, total)`` is called every 65,536 entries.

        Raises:
            StorageError: LMDB failed while reading (corruption is reported,
                not raised, as far as LMDB lets it be).
        """
        self._check_open()
        return _verify_chain(self._store, trusted_keys=trusted_keys, progress=progress, deep=deep)

    def backup(self, dest: Path | str) -> Path:
        """Write a consistent, compacted hot copy of the log into directory ``dest``.

        ``dest`` must not exist or be empty. Appends may continue meanwhile;
        the copy is the snapshot at its start.

        Raises:
            ConfigurationError: ``dest`` is not empty.
            StorageError: the copy could not be written.
        """
        self._check_open()
        return _backup.write_backup(self._store, Path(dest))

    @classmethod
    def restore(
        cls,
        path: Path | str,
        backup: Path | str,
        *,
        clock: Clock = SYSTEM_CLOCK,
        trusted_keys: Collection[VerifyKey] | None = None,
        signer: LogSigner | None = None,
        recorded: tuple[int, bytes] | None = None,
    ) -> _backup.Restored:
        """Replace the audit log at ``path`` with a verified copy of ``backup``.

        The backup's file structure and whole chain are checked first; a
        corrupt backup is refused and nothing changes. Only the audit log is
        restored: the agent state beside it (sessions, replay window, outbox,
        inbox, prekeys, anchors) stays the current one, so no key is rewound.
        The restored log gets a ``LOG_RESTORED`` entry (sealed into a block
        by ``signer`` when given) saying which backup, its size and, against
        ``recorded`` (the watermark's size and root), how many entries were
        lost. The replaced environment is moved to
        ``<path>.replaced-<UTC stamp>``, never deleted. The log must not be open.

        Raises:
            BackupInvalid: the backup is missing, damaged or fails verify_chain.
            StorageError: the files could not be moved or copied.
        """
        return _backup.restore(
            Path(path),
            Path(backup),
            clock=clock,
            trusted_keys=trusted_keys,
            signer=signer,
            recorded=recorded,
        )

    def _check_open(self) -> None:
        if self._writer.closed:
            raise LocalProtocolError("the audit log is closed")
