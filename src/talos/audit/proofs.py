"""Proofs from the stored tree: past roots, inclusion and consistency (RFC 9162 §2.1).

Each function reads the O(log n) stored nodes the proof needs (named by
:func:`~talos.core.audit.merkle.inclusion_nodes` /
:func:`~talos.core.audit.merkle.consistency_nodes`) inside one read snapshot.

Rules this module keeps:

* A proof is checked against the root before it is handed out, so a damaged
  node gives :class:`~talos.errors.StoreCorrupted`, never a bad proof.
* The entry of an inclusion proof is re-hashed against its stored leaf hash.
* The root of the whole log is the head's (stored with every commit); a
  smaller tree's root is folded from stored nodes.

Imported by :mod:`talos.audit.log`.
"""

from __future__ import annotations

from talos.audit.store import AuditStore, Head
from talos.core.audit.checkpoint import ConsistencyProof, InclusionProof
from talos.core.audit.merkle import consistency_nodes, inclusion_nodes
from talos.errors import (
    ConsistencyError,
    InclusionProofError,
    LocalProtocolError,
    StoreCorrupted,
)

__all__ = ["prove_consistency", "prove_inclusion", "root_at"]


def root_at(store: AuditStore, head: Head, size: int) -> bytes:
    """Merkle root of the first ``size`` entries of a log whose head is ``head``.

    Raises:
        LocalProtocolError: ``size`` is larger than the log.
        StoreCorrupted: a stored node is missing.
    """
    if not 0 <= size <= head.size:
        raise LocalProtocolError(f"tree size {size} is outside 0..{head.size}")
    if size == head.size:
        return head.root
    with store.read() as txn:
        return store.fold(txn, size)


def prove_inclusion(store: AuditStore, head: Head, seq: int, size: int | None) -> InclusionProof:
    """Inclusion proof of entry ``seq`` in the tree of ``size`` (default: the head's).

    Raises:
        LocalProtocolError: ``seq`` or ``size`` out of range.
        StoreCorrupted: the stored entry or nodes are damaged.
    """
    tree = head.size if size is None else size
    if not (type(tree) is int and type(seq) is int and 0 <= seq < tree <= head.size):
        raise LocalProtocolError(f"no entry {seq} in a tree of {tree} (log holds {head.size})")
    plan = inclusion_nodes(seq, tree)
    with store.read() as txn:
        leaf = store.leaf(txn, seq)
        hashes = plan.rehash([store.node(txn, node) for node in plan.ids])
        root = head.root if tree == head.size else store.fold(txn, tree)
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


def prove_consistency(
    store: AuditStore, head: Head, old_size: int, new_size: int | None
) -> ConsistencyProof:
    """Consistency proof from the tree of ``old_size`` to ``new_size`` (default: the head's).

    Raises:
        LocalProtocolError: sizes out of range.
        StoreCorrupted: stored nodes are damaged (the proof fails its own check).
    """
    second = head.size if new_size is None else new_size
    if not (type(old_size) is int and type(second) is int and 0 <= old_size <= second <= head.size):
        raise LocalProtocolError(f"invalid sizes {old_size} -> {second} (log holds {head.size})")
    plan = consistency_nodes(old_size, second)
    with store.read() as txn:
        hashes = plan.rehash([store.node(txn, node) for node in plan.ids])
        root1 = store.fold(txn, old_size)
        root2 = head.root if second == head.size else store.fold(txn, second)
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
