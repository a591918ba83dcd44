"""The integrity scan: one pass that re-hashes the whole log and reports the first problem.

:func:`verify_chain` walks ``entries``, ``nodes`` and ``blocks`` in key order
with three cursors inside one read snapshot. It recomputes every leaf and
every stored node (in the order they were written), checks every block's
range, root, previous-block link and signature, and at the end the metadata
(size, root, block count, last block hash).

Rules this module keeps:

* The data file is checked against its committed pages first
  (:func:`~talos.storage.lmdb.check_data_file`); a file truncated under an
  open log is reported as a ``file`` problem and is not mapped.
* Corruption is reported, never raised: the scan stops at the first problem,
  in sequence order, and :class:`ChainReport` says where (entry, node,
  block, meta or file, with the seq, height or node) and what is wrong.
* Blocks are checked against the key each one names; with ``trusted_keys``
  every block must also be signed by one of them.
* A pruned log (``prune_after_anchor``) verifies: below the pruning point
  (``meta["pruned"]``) a row that is its leaf hash alone is a pruned entry,
  taken as it is (the nodes, the roots, the signed blocks and the anchor
  above it still pin it) and counted; from the pruning point on, such a row
  is damage, and the count must match ``meta["pruned_entries"]``.

Imported by :mod:`talos.audit.log` and :mod:`talos.audit.backup`;
:class:`ChainReport` and :class:`ChainProblem` are public (``talos.audit``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Final

import lmdb

from talos.audit.store import AuditStore, node_key
from talos.core.audit.checkpoint import GENESIS_HASH, Block
from talos.core.audit.entry import AuditEntry
from talos.core.audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    NodeID,
    fold_subtrees,
    leaf_hash,
    node_hash,
)
from talos.core.crypto import VerifyKey
from talos.errors import MalformedFrame, SignatureInvalid, StoreCorrupted, UnsupportedVersion
from talos.storage.lmdb import DATA_FILE, check_data_file, read_u64, u64

__all__ = ["ChainProblem", "ChainReport", "verify_chain"]

_PROGRESS_EVERY: Final = 1 << 16


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

    @property
    def location(self) -> str:
        """Where, in the short form a ``StoreCorrupted`` carries (e.g. ``"seq 17"``)."""
        if self.seq is not None:
            return f"seq {self.seq}"
        if self.height is not None:
            return f"height {self.height}"
        return self.where


@dataclass(frozen=True, slots=True)
class ChainReport:
    """Outcome of :meth:`AuditLog.verify_chain`: counts, the rebuilt root, the first problem."""

    entries: int
    blocks: int
    root: bytes
    problem: ChainProblem | None = None
    signers: tuple[bytes, ...] = ()
    unsigned_blocks: int = 0
    #: Entries whose payload was pruned after anchoring (leaf hash kept).
    pruned: int = 0
    #: The pruning point: every pruned entry is below it.
    pruned_below: int = 0

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
            raise StoreCorrupted(
                f"audit chain damaged: {problem}", where=problem.location, what=problem.what
            )


class Broken(Exception):
    """A check found ``problem``: the scan (or the head check) stops there."""

    def __init__(self, problem: ChainProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def decode_entry(seq: int, raw: bytes) -> AuditEntry:
    """The entry stored at ``seq``, which must decode and name ``seq``.

    Raises:
        Broken: it does not.
    """
    try:
        entry = AuditEntry.from_bytes(raw)
    except (MalformedFrame, UnsupportedVersion) as exc:
        raise Broken(ChainProblem("entry", f"entry does not decode: {exc}", seq=seq)) from None
    if entry.seq != seq:
        raise Broken(ChainProblem("entry", f"entry says seq {entry.seq}", seq=seq))
    return entry


def decode_block(height: int, raw: bytes) -> Block:
    """The block stored at ``height``, which must decode.

    Raises:
        Broken: it does not.
    """
    try:
        return Block.from_bytes(raw)
    except (MalformedFrame, UnsupportedVersion) as exc:
        raise Broken(
            ChainProblem("block", f"block does not decode: {exc}", height=height)
        ) from None


def check_signature(block: Block, trusted: dict[bytes, VerifyKey] | None) -> bool:
    """Check ``block``'s signature (by a key in ``trusted`` when given); False if it
    is unsigned and no trusted keys are required.

    Raises:
        Broken: unsigned while keys are required, an untrusted key, a bad signature.
    """
    height = block.height
    if block.public_key is None:
        if trusted is not None:
            raise Broken(ChainProblem("block", "block is not signed", height=height))
        return False
    key = None
    if trusted is not None:
        key = trusted.get(block.public_key)
        if key is None:
            raise Broken(ChainProblem("block", "signed by an untrusted key", height=height))
    try:
        block.verify_signature(key)
    except SignatureInvalid as exc:
        raise Broken(ChainProblem("block", f"signature: {exc}", height=height)) from None
    return True


def verify_chain(
    store: AuditStore,
    *,
    trusted_keys: Collection[VerifyKey] | None = None,
    progress: Callable[[int, int], None] | None = None,
    deep: bool = False,
) -> ChainReport:
    """Re-hash every entry, rebuild every node and root, check every block.

    ``deep`` also decodes every entry strictly and checks that times never go
    backwards (about 3x slower). ``progress(done, total)`` is called every
    65,536 entries.

    Raises:
        StorageError: LMDB failed while reading (corruption is reported,
            not raised, as far as LMDB lets it be).
    """
    try:
        check_data_file(store.path / DATA_FILE)
    except StoreCorrupted as exc:
        return ChainReport(0, 0, EMPTY_ROOT, ChainProblem("file", f"{exc}"))
    with store.read() as txn:
        return _ChainScan(store, txn, trusted_keys, progress, deep).run()


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
        self.pruned = 0
        raw_pruned = store.meta_value(txn, b"pruned")
        # A malformed pruning point counts as none: its pruned rows are then reported.
        self.pruned_below = read_u64(raw_pruned) if raw_pruned and len(raw_pruned) == 8 else 0

    def run(self) -> ChainReport:
        try:
            self._scan()
        except Broken as broken:
            return self._report(broken.problem)
        return self._report(None)

    def _report(self, problem: ChainProblem | None) -> ChainReport:
        root = fold_subtrees(self.stack) if self.stack else EMPTY_ROOT
        return ChainReport(
            self.size,
            self.height,
            root,
            problem,
            tuple(self.signers),
            self.unsigned,
            self.pruned,
            self.pruned_below,
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
                raise Broken(ChainProblem("entry", "entry missing or out of order", seq=seq))
            if len(value) == HASH_SIZE and seq < self.pruned_below:
                leaf = bytes(value)  # pruned: only its leaf hash is kept
                self.pruned += 1
            else:
                leaf = leaf_hash(value[HASH_SIZE:])
                if len(value) <= HASH_SIZE or leaf != value[:HASH_SIZE]:
                    raise Broken(
                        ChainProblem(
                            "entry", "entry bytes do not match the stored leaf hash", seq=seq
                        )
                    )
                if self.deep:
                    self._check_entry(seq, value[HASH_SIZE:])
            self._push(leaf, seq, nodes)
            while block is not None and block.tree_size == self.size:
                self._check_block(block)
                block = self._next_block(blocks)
            if block is not None and block.tree_size < self.size:
                raise Broken(
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
                raise Broken(ChainProblem("node", "stored node missing", seq=seq, node=node))
            if stored[1] != value:
                raise Broken(
                    ChainProblem(
                        "node", "stored node does not match the entries", seq=seq, node=node
                    )
                )
        stack.append(value)
        self.size += 1

    def _check_entry(self, seq: int, raw: bytes) -> None:
        entry = decode_entry(seq, raw)
        if entry.time_ms < self.last_time:
            raise Broken(ChainProblem("entry", "entry time goes backwards", seq=seq))
        self.last_time = entry.time_ms

    def _next_block(self, blocks: Iterator[tuple[bytes, bytes]]) -> Block | None:
        item = next(blocks, None)
        if item is None:
            return None
        height = self.height
        if item[0] != u64(height):
            raise Broken(ChainProblem("block", "block missing or out of order", height=height))
        return decode_block(height, item[1])

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
                raise Broken(ChainProblem("block", what, height=height))
        self._check_signature(block)
        self.previous = block.block_hash()
        self.expected_first = block.last_seq + 1
        self.height += 1

    def _check_signature(self, block: Block) -> None:
        if check_signature(block, self.trusted):
            assert block.public_key is not None  # noqa: S101 -- a signed block has one
            self.signers[block.public_key] = None
        else:
            self.unsigned += 1

    def _finish(
        self, nodes: Iterator[tuple[bytes, bytes]], block: Block | None, total: int
    ) -> None:
        if next(nodes, None) is not None:
            raise Broken(ChainProblem("node", "stored node beyond the last entry"))
        if block is not None:
            raise Broken(ChainProblem("block", "block beyond the last entry", height=block.height))
        store, txn = self.store, self.txn
        root = fold_subtrees(self.stack) if self.stack else EMPTY_ROOT
        raw_blocks = store.meta_value(txn, b"blocks")
        raw_hash = store.meta_value(txn, b"block_hash")
        stored_root = store.meta_value(txn, b"root") or EMPTY_ROOT
        blocks = 0 if raw_blocks is None or len(raw_blocks) != 8 else read_u64(raw_blocks)
        raw_pruned = store.meta_value(txn, b"pruned_entries")
        pruned = read_u64(raw_pruned) if raw_pruned and len(raw_pruned) == 8 else 0
        checks = [
            (pruned != self.pruned, f"metadata says {pruned} entries pruned, found {self.pruned}"),
            (self.pruned_below > total, f"pruning point {self.pruned_below} past the log's end"),
            (total != self.size, f"metadata says {total} entries, found {self.size}"),
            (stored_root != root, "stored root does not match the entries"),
            (blocks != self.height, f"metadata says {blocks} blocks, found {self.height}"),
            ((raw_hash or GENESIS_HASH) != self.previous, "last block hash does not match"),
        ]
        for bad, what in checks:
            if bad:
                raise Broken(ChainProblem("meta", what))
        if self.progress is not None:
            self.progress(self.size, total)
