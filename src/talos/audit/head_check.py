"""The start-up check: what can be rechecked of a log's head in O(log n).

:func:`check_head` is what an agent runs before it appends to its log; the
full scan (:func:`~talos.audit.integrity.verify_chain`) stays with
``talos audit verify-chain`` and ``talos diagnose --storage``. Inside one read
snapshot it checks:

* the last entry: present, its bytes re-hash to the stored leaf hash, it
  decodes and names its own seq, and no entry is stored beyond it;
* the path from the last leaf up to the right border: every node created
  when that leaf was appended is rebuilt from its stored left sibling;
* the right border folds to the stored root;
* the last block: present (and none beyond it), its hash is the stored
  ``block_hash``, its root is the fold of the border at its size, it links
  to the block before it, and its signature verifies (against
  ``trusted_keys`` when given).

Problems are reported as the :class:`~talos.audit.integrity.ChainProblem` the
full scan gives for the same damage, so the refusal at start-up reads like
diagnose's FAIL line. Imported by :mod:`talos.audit.log`.
"""

from __future__ import annotations

from collections.abc import Collection

import lmdb

from talos.audit.integrity import (
    Broken,
    ChainProblem,
    check_signature,
    decode_block,
    decode_entry,
)
from talos.audit.store import AuditStore
from talos.core.audit.checkpoint import GENESIS_HASH, Block
from talos.core.audit.merkle import EMPTY_ROOT, HASH_SIZE, NodeID, leaf_hash, node_hash
from talos.core.crypto import VerifyKey
from talos.errors import StoreCorrupted
from talos.storage.environment import Environment
from talos.storage.lmdb import DATA_FILE, u64

__all__ = ["RESTORE_HINT", "check_head", "refuse_damaged_head"]

#: What the operator does about a damaged audit log (the hint diagnose gives too).
RESTORE_HINT = (
    "keep the damaged log; `talos audit restore --backup DIR` or `talos audit rebuild` "
    "(agent stopped; see `talos audit verify-chain`)"
)


def check_head(
    store: AuditStore, trusted_keys: Collection[VerifyKey] | None = None
) -> ChainProblem | None:
    """The first problem found in the log's head, last entry and last block, or None.

    Raises:
        StorageError: LMDB failed while reading.
    """
    trusted = None if trusted_keys is None else {key.raw: key for key in trusted_keys}
    with store.read() as txn:
        try:
            _check(store, txn, trusted)
        except Broken as bad:
            return bad.problem
    return None


def refuse_damaged_head(
    environment: Environment, trusted_keys: Collection[VerifyKey] | None = None
) -> None:
    """Raise if :func:`check_head` finds a problem in the audit log of ``environment``.

    Raises:
        StoreCorrupted: naming the data file and the problem (as diagnose's
            FAIL line does), with :data:`RESTORE_HINT` as its hint.
        StorageError: LMDB failed while reading.
    """
    problem = check_head(AuditStore(environment), trusted_keys)
    if problem is None:
        return
    error = StoreCorrupted(
        f"audit log {environment.path / DATA_FILE} damaged: {problem}",
        where=problem.location,
        what=problem.what,
    )
    error.hint = RESTORE_HINT
    raise error


def _check(
    store: AuditStore, txn: lmdb.Transaction[bytes], trusted: dict[bytes, VerifyKey] | None
) -> None:
    size = store.meta_count(txn, b"size")
    if store.entry_row(txn, size) is not None:
        raise Broken(ChainProblem("meta", f"metadata says {size} entries, found more"))
    if size:
        _check_last_entry(store, txn, size - 1)
    try:
        root = store.fold(txn, size)
    except StoreCorrupted:
        raise Broken(ChainProblem("node", "stored node missing")) from None
    if (store.meta_value(txn, b"root") or EMPTY_ROOT) != root:
        raise Broken(ChainProblem("meta", "stored root does not match the entries"))
    _check_last_block(store, txn, size, trusted)


def _check_last_entry(store: AuditStore, txn: lmdb.Transaction[bytes], seq: int) -> None:
    value = store.entry_row(txn, seq)
    if value is None:
        raise Broken(ChainProblem("entry", "entry missing or out of order", seq=seq))
    value = bytes(value)
    leaf = leaf_hash(value[HASH_SIZE:])
    if len(value) <= HASH_SIZE or leaf != value[:HASH_SIZE]:
        raise Broken(
            ChainProblem("entry", "entry bytes do not match the stored leaf hash", seq=seq)
        )
    decode_entry(seq, value[HASH_SIZE:])
    # The nodes appended with this leaf: each is its stored left sibling + the one below.
    hashed, index, level = leaf, seq, 0
    while index & 1:
        sibling = store.node_row(txn, NodeID(level, index - 1))
        index >>= 1
        level += 1
        node = NodeID(level, index)
        stored = store.node_row(txn, node)
        if sibling is None or stored is None:
            raise Broken(ChainProblem("node", "stored node missing", seq=seq, node=node))
        hashed = node_hash(bytes(sibling), hashed)
        if bytes(stored) != hashed:
            raise Broken(
                ChainProblem("node", "stored node does not match the entries", seq=seq, node=node)
            )


def _check_last_block(
    store: AuditStore,
    txn: lmdb.Transaction[bytes],
    size: int,
    trusted: dict[bytes, VerifyKey] | None,
) -> None:
    count = store.meta_count(txn, b"blocks")
    if txn.get(u64(count), db=store.blocks) is not None:
        raise Broken(ChainProblem("block", "block beyond the last entry", height=count))
    last_hash = store.meta_value(txn, b"block_hash") or GENESIS_HASH
    if count == 0:
        if last_hash != GENESIS_HASH:
            raise Broken(ChainProblem("meta", "last block hash does not match"))
        return
    height = count - 1
    block = _block(store, txn, height)
    if block.tree_size > size:
        raise Broken(ChainProblem("block", "block beyond the last entry", height=height))
    previous = _block(store, txn, height - 1).block_hash() if height else GENESIS_HASH
    if block.previous != previous:
        raise Broken(ChainProblem("block", "previous-block hash does not match", height=height))
    try:
        root = store.fold(txn, block.tree_size)
    except StoreCorrupted:
        raise Broken(ChainProblem("node", "stored node missing", height=height)) from None
    if block.root != root:
        raise Broken(ChainProblem("block", "block root does not match the entries", height=height))
    check_signature(block, trusted)
    if block.block_hash() != last_hash:
        raise Broken(ChainProblem("meta", "last block hash does not match"))


def _block(store: AuditStore, txn: lmdb.Transaction[bytes], height: int) -> Block:
    raw = txn.get(u64(height), db=store.blocks)
    if raw is None:
        raise Broken(ChainProblem("block", "block missing or out of order", height=height))
    block = decode_block(height, bytes(raw))
    if block.height != height:
        raise Broken(ChainProblem("block", "block names another height", height=height))
    return block
