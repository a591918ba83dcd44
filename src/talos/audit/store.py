"""The audit log's rows in the agent's LMDB environment: their keys and checked reads.

The environment (:mod:`talos.storage.environment`) opens five databases for
the log; this module says what is in them::

    entries   u64be(seq)                     -> leaf hash (32) || entry CBOR
    nodes     u64be(last leaf) || u8(level)  -> 32-byte hash of a perfect subtree, level >= 1
    blocks    u64be(height)                  -> block CBOR
    index     b"k" kind 0x00 u64be(seq)      -> b""  (and b"p" peer 0x00 u64be(seq))
    meta      b"size", b"root", b"time", b"blocks", b"block_hash", b"format",
              b"pruned" (the pruning point), b"pruned_entries" (payloads dropped),
              b"indexed" (entries below it have their index rows)

Perfect-subtree nodes are keyed by the index of their *last* leaf, then their
level: appending leaf ``i`` completes exactly the nodes whose last leaf is
``i`` (lowest level first), so every append writes keys in increasing order
and LMDB can take them with ``append=True``. Level-0 nodes (leaf hashes) live
beside the entry they hash, which saves a put per append.

Rules this module keeps:

* LMDB has no checksums, so every checked read re-hashes or decodes strictly
  and raises :class:`~talos.errors.StoreCorrupted` naming where the damage is:
  :meth:`AuditStore.entry` checks the stored leaf hash, the decoding and the
  seq; :meth:`AuditStore.node` the hash length; :meth:`AuditStore.block` the
  decoding and the height.
* Nothing here is cached: each read works inside the caller's transaction.
* The index trails the log (format 2): entries below ``meta["indexed"]``
  have their index rows, the newest few (fewer than
  :data:`~talos.audit.writer.INDEX_BATCH`) may not yet, and queries read
  those directly (:mod:`talos.audit.reading`). Without the row (format 1,
  or a rebuilt log) every entry is indexed. The pruning point never passes
  it: pruning indexes the tail in its own transaction.
* Below the pruning point (``meta["pruned"]``, see
  :mod:`talos.core.audit.pruning`) an entry row may be its leaf hash alone:
  :meth:`AuditStore.entry` raises :class:`EntryPruned` for it, and
  :meth:`AuditStore.leaf` returns the kept hash (it can no longer be
  re-hashed; the nodes above it and the anchored root still pin it). From
  the pruning point on, a row without its bytes is damage.

Imported by the modules of :mod:`talos.audit` only.
"""

from __future__ import annotations

import struct
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import lmdb

from talos.core.audit.checkpoint import Block
from talos.core.audit.entry import AuditEntry
from talos.core.audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    NodeID,
    fold_subtrees,
    leaf_hash,
    root_nodes,
)
from talos.errors import (
    LocalProtocolError,
    MalformedFrame,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.storage.environment import Environment
from talos.storage.lmdb import read_u64, u64

__all__ = [
    "FORMAT_VERSION",
    "AuditStore",
    "EntryPruned",
    "Head",
    "PrunedEntry",
    "decode_stored",
    "index_key",
    "node_key",
]

#: Version of the audit log's layout (``meta["format"]``). Format 2 added
#: ``meta["indexed"]``: a log of format 1 reads as fully indexed, and becomes
#: format 2 at its first write; a Talos that knows only format 1 refuses it.
FORMAT_VERSION: Final = 2
#: Layouts this version reads.
READABLE_FORMATS: Final = frozenset({1, 2})

_NODE = struct.Struct(">QB")


def node_key(node: NodeID) -> bytes:
    """Key of a stored perfect subtree: its last leaf, then its level."""
    return _NODE.pack(((node.index + 1) << node.level) - 1, node.level)


def index_key(prefix: bytes, value: str, seq: int) -> bytes:
    """Key of a query index row (``b"k"`` for kinds, ``b"p"`` for peers)."""
    return prefix + value.encode("utf-8") + b"\x00" + u64(seq)


class EntryPruned(LocalProtocolError):
    """The entry's payload was pruned after a final anchor covered it; its leaf hash is kept."""

    hint = "its leaf hash is kept: `talos audit prove SEQ` still proves its inclusion"

    def __init__(self, seq: int, leaf: bytes) -> None:
        super().__init__(
            f"audit entry {seq} was pruned after anchoring (prune_after_anchor): only its "
            f"leaf hash {leaf.hex()} is kept"
        )
        self.seq = seq
        self.leaf = leaf


@dataclass(frozen=True, slots=True)
class PrunedEntry:
    """An entry whose payload was pruned: its seq and its leaf hash, nothing else."""

    seq: int
    leaf: bytes


@dataclass(slots=True)
class Head:
    """Size and root of the committed tree, as an open log last saw them."""

    size: int
    root: bytes


class AuditStore:
    """The audit log's five databases in an open environment, and reads of their rows."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        databases = environment.audit
        self.entries = databases.entries
        self.nodes = databases.nodes
        self.blocks = databases.blocks
        self.index = databases.index
        self.meta = databases.meta

    @property
    def path(self) -> Path:
        return self.environment.path

    @property
    def readonly(self) -> bool:
        return self.environment.readonly

    def read(self) -> AbstractContextManager[lmdb.Transaction[bytes]]:
        """A read transaction of the environment (see :meth:`Environment.read`)."""
        return self.environment.read()

    def write(self) -> AbstractContextManager[lmdb.Transaction[bytes]]:
        """A durable write transaction of the environment (see :meth:`Environment.write`)."""
        return self.environment.write()

    # -- raw rows ------------------------------------------------------------------

    def entry_row(self, txn: lmdb.Transaction[bytes], seq: int) -> bytes | None:
        """The stored value of entry ``seq``: leaf hash (32) || entry bytes."""
        return txn.get(u64(seq), db=self.entries)

    def node_row(self, txn: lmdb.Transaction[bytes], node: NodeID) -> bytes | None:
        """The stored hash of a perfect subtree (level 0 is the stored leaf hash)."""
        if node.level == 0:
            value = txn.get(u64(node.index), db=self.entries)
            return None if value is None else value[:32]
        return txn.get(node_key(node), db=self.nodes)

    def meta_value(self, txn: lmdb.Transaction[bytes], key: bytes) -> bytes | None:
        return txn.get(key, db=self.meta)

    def meta_count(self, txn: lmdb.Transaction[bytes], key: bytes) -> int:
        """A u64 metadata value (``size``, ``time``, ``blocks``); 0 when absent."""
        raw = txn.get(key, db=self.meta)
        return 0 if raw is None else read_u64(raw)

    def head(self, txn: lmdb.Transaction[bytes]) -> Head:
        """The stored size and root (an empty tree when nothing was written)."""
        root = self.meta_value(txn, b"root")
        return Head(self.meta_count(txn, b"size"), EMPTY_ROOT if root is None else bytes(root))

    def indexed_below(self, txn: lmdb.Transaction[bytes], size: int) -> int:
        """Entries below this (at most ``size``) have their index rows; ``size`` when no
        row says otherwise. ``size`` may be older than ``txn`` (a head read before it,
        while a writer in another thread or process went on): an index point past it
        then only covers entries the caller does not look at.

        Raises:
            StoreCorrupted: the row is not a u64.
        """
        raw = self.meta_value(txn, b"indexed")
        if raw is None:
            return size
        if len(raw) != 8:
            raise StoreCorrupted(
                f"audit log index point {bytes(raw).hex()} is malformed",
                where="meta indexed",
                what="index point",
            )
        return min(read_u64(raw), size)

    def pruned_below(self, txn: lmdb.Transaction[bytes]) -> int:
        """The pruning point: entries below it may hold their leaf hash alone (0: none)."""
        return self.meta_count(txn, b"pruned")

    def check_format(self, txn: lmdb.Transaction[bytes]) -> None:
        """Refuse a log written in a layout this version does not know.

        Raises:
            UnsupportedVersion: written by a newer Talos.
        """
        raw = self.meta_value(txn, b"format")
        if raw is not None and read_u64(raw) not in READABLE_FORMATS:
            raise UnsupportedVersion(f"audit log format {read_u64(raw)} is not supported")

    # -- checked reads -------------------------------------------------------------

    def node(self, txn: lmdb.Transaction[bytes], node: NodeID) -> bytes:
        """The hash of a stored perfect subtree.

        Raises:
            StoreCorrupted: it is missing or not a hash.
        """
        value = self.node_row(txn, node)
        if value is None or len(value) != HASH_SIZE:
            raise StoreCorrupted(
                f"audit log node {node} is missing or malformed",
                where=f"node level {node.level} index {node.index}",
                what="missing node",
            )
        return bytes(value)

    def fold(self, txn: lmdb.Transaction[bytes], size: int) -> bytes:
        """Merkle root of the first ``size`` entries, from O(log n) stored nodes.

        Raises:
            StoreCorrupted: a stored node is missing.
        """
        if size == 0:
            return EMPTY_ROOT
        return fold_subtrees(self.border(txn, size))

    def border(self, txn: lmdb.Transaction[bytes], size: int) -> list[bytes]:
        """The right border of the tree of ``size``: its perfect subtrees, largest first.

        Raises:
            StoreCorrupted: a stored node is missing.
        """
        return [self.node(txn, node) for node in root_nodes(size)]

    def leaf(self, txn: lmdb.Transaction[bytes], seq: int) -> bytes:
        """The stored leaf hash of entry ``seq``, checked against the entry's bytes.

        Raises:
            StoreCorrupted: the entry is missing or does not match.
        """
        value = self.entry_row(txn, seq)
        if value is not None and len(value) == HASH_SIZE and seq < self.pruned_below(txn):
            return bytes(value)
        if value is None or leaf_hash(value[HASH_SIZE:]) != value[:HASH_SIZE]:
            raise StoreCorrupted(
                f"audit entry {seq} is missing or does not match its leaf hash",
                where=f"seq {seq}",
                what="leaf hash mismatch",
            )
        return bytes(value[:HASH_SIZE])

    def entry(self, txn: lmdb.Transaction[bytes], seq: int, size: int) -> AuditEntry:
        """Entry ``seq`` of a log holding ``size``, re-hashed and decoded strictly.

        Raises:
            LocalProtocolError: ``seq`` is not a sequence number, or ``seq >= size``.
            EntryPruned: its payload was pruned (a LocalProtocolError).
            StoreCorrupted: missing below ``size``, or the bytes do not match
                their leaf hash, do not decode, or name another seq.
        """
        if type(seq) is not int or seq < 0:
            raise LocalProtocolError("sequence numbers are non-negative integers")
        value = self.entry_row(txn, seq)
        if value is None:
            if seq < size:
                raise StoreCorrupted(
                    f"audit entry {seq} is missing", where=f"seq {seq}", what="missing entry"
                )
            raise LocalProtocolError(f"no audit entry {seq}; the log holds {size}")
        if len(value) == HASH_SIZE and seq < self.pruned_below(txn):
            raise EntryPruned(seq, bytes(value))
        stored, raw = value[:HASH_SIZE], value[HASH_SIZE:]
        if leaf_hash(raw) != stored:
            raise StoreCorrupted(
                f"audit entry {seq} does not match its leaf hash",
                where=f"seq {seq}",
                what="leaf hash mismatch",
            )
        return decode_stored(seq, raw)

    def entry_or_pruned(
        self, txn: lmdb.Transaction[bytes], seq: int, size: int
    ) -> AuditEntry | PrunedEntry:
        """:meth:`entry`, or a :class:`PrunedEntry` for an entry whose payload was pruned.

        Raises:
            LocalProtocolError, StoreCorrupted: as :meth:`entry`.
        """
        try:
            return self.entry(txn, seq, size)
        except EntryPruned as pruned:
            return PrunedEntry(seq, pruned.leaf)

    def block(self, txn: lmdb.Transaction[bytes], height: int) -> Block:
        """The block at ``height``, decoded (signatures are the chain scan's concern).

        Raises:
            LocalProtocolError: no such block.
            StoreCorrupted: it does not decode or names another height.
        """
        raw = txn.get(u64(height), db=self.blocks)
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


def decode_stored(seq: int, raw: bytes) -> AuditEntry:
    """The entry ``raw`` stored at position ``seq``: it decodes strictly and names ``seq``.

    Raises:
        StoreCorrupted: it does not.
    """
    try:
        entry = AuditEntry.from_bytes(raw)
    except (MalformedFrame, UnsupportedVersion) as exc:
        raise StoreCorrupted(
            f"audit entry {seq} does not decode: {exc}", where=f"seq {seq}", what="undecodable"
        ) from None
    if entry.seq != seq:
        raise StoreCorrupted(
            f"audit entry at position {seq} says seq {entry.seq}", where=f"seq {seq}", what="seq"
        )
    return entry
