"""Merkle tree hashing and proofs, as defined by RFC 9162 §2.1 (ex RFC 6962).

Rules this module keeps:

* A leaf hash is ``SHA-256(0x00 || data)``, an interior node ``SHA-256(0x01 ||
  left || right)``; the empty tree's root is ``SHA-256("")`` (RFC 9162 §2.1.1).
* Proof *math* is pure and separate from storage. A node is addressed by its
  coordinates :class:`NodeID` ``(level, index)``: the perfect subtree of
  ``2**level`` leaves starting at leaf ``index * 2**level``. Perfect subtrees
  never change once complete, so a log can store them; :func:`inclusion_nodes`
  and :func:`consistency_nodes` name exactly the O(log n) stored nodes a proof
  needs, and :meth:`ProofNodes.rehash` folds them into the proof, because the
  right border of a tree that is not a power of two is an *ephemeral* node no
  store holds.
* Verification (:func:`verify_inclusion`, :func:`verify_consistency`) follows
  RFC 9162 §2.1.3.2 and §2.1.4.2, raises and never returns a bool, and turns
  every malformed argument into the documented exception: no ``ValueError``,
  ``TypeError`` or ``IndexError`` escapes.
* Sizes and indices are unsigned 64-bit integers, as in the RFC structures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from talos.errors import ConsistencyError, InclusionProofError, LocalProtocolError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "NodeID",
    "ProofNodes",
    "completed_nodes",
    "consistency_nodes",
    "consistency_proof",
    "fold_subtrees",
    "inclusion_nodes",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "range_nodes",
    "root_from_leaves",
    "root_nodes",
    "subtree_hash",
    "verify_consistency",
    "verify_inclusion",
]

#: Length of every hash in the tree (SHA-256).
HASH_SIZE = 32

#: Largest tree size (and leaf index + 1) accepted: sizes are uint64 on the wire.
MAX_TREE_SIZE = 2**64 - 1

#: Root hash of the empty tree, ``SHA-256("")`` (RFC 9162 §2.1.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_sha256 = hashlib.sha256


# -- hashing ------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    """Hash one log entry into a leaf: ``SHA-256(0x00 || data)``.

    The 0x00 prefix separates leaves from interior nodes, so no interior node
    can be passed off as a leaf (second-preimage resistance, RFC 9162 §2.1.1).

    Raises:
        LocalProtocolError: ``data`` is not bytes-like.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LocalProtocolError("leaf data must be bytes")
    return _sha256(_LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two child hashes into their parent: ``SHA-256(0x01 || left || right)``.

    On the hot path of every proof, so it does not re-check its inputs: the
    verifiers validate hash lengths once, up front.
    """
    return _sha256(_NODE_PREFIX + left + right).digest()


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """Compute the Merkle Tree Hash (MTH, RFC 9162 §2.1.1) of a list of leaf hashes.

    Iterative and O(n): each level pairs neighbours and lifts an odd last node
    unchanged, which yields the same tree as the RFC's split at the largest
    power of two.

    Raises:
        LocalProtocolError: an element is not a 32-byte ``bytes`` hash.
    """
    level = list(leaf_hashes)
    for item in level:
        if not isinstance(item, bytes) or len(item) != HASH_SIZE:
            raise LocalProtocolError(f"leaf hashes must be {HASH_SIZE}-byte bytes")
    if not level:
        return EMPTY_ROOT
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def fold_subtrees(hashes: Sequence[bytes]) -> bytes:
    """Combine the hashes of consecutive perfect subtrees into one node hash.

    ``hashes`` are given left to right, as :func:`range_nodes` lists them (each
    strictly smaller than the one before). The fold runs right to left, which
    is how RFC 9162 shapes a tree whose size is not a power of two.

    Raises:
        LocalProtocolError: ``hashes`` is empty.
    """
    if not hashes:
        raise LocalProtocolError("nothing to fold")
    acc = hashes[-1]
    for item in reversed(hashes[:-1]):
        acc = node_hash(item, acc)
    return acc


# -- node coordinates -----------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class NodeID:
    """Coordinates of a perfect subtree: ``2**level`` leaves from ``index * 2**level``.

    Level 0 nodes are leaves. A storage layer keys stored hashes by this pair.
    """

    level: int
    index: int

    def coverage(self) -> tuple[int, int]:
        """The half-open range ``[begin, end)`` of leaf indices under this node."""
        return self.index << self.level, (self.index + 1) << self.level


@dataclass(frozen=True, slots=True)
class ProofNodes:
    """The stored nodes a proof is built from, and how to assemble them.

    ``ids`` lists perfect-subtree coordinates in proof order (from the leaf
    towards the root). The slice ``ids[begin:end]`` covers the ephemeral node
    on the right border of a tree whose size is not a power of two; those
    hashes are folded into one proof element by :meth:`rehash`. When
    ``begin == end`` there is no ephemeral node and the hashes are the proof.
    """

    ids: tuple[NodeID, ...]
    begin: int
    end: int

    def rehash(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Turn the hashes of ``ids`` (same order) into the proof itself.

        Raises:
            LocalProtocolError: ``hashes`` does not match ``ids`` one to one.
        """
        if len(hashes) != len(self.ids):
            raise LocalProtocolError(f"got {len(hashes)} hashes for {len(self.ids)} proof nodes")
        if self.end - self.begin <= 1:
            return list(hashes)
        # ids[begin:end] are stored smallest (rightmost) first, so each next
        # hash is the left sibling of what has been folded so far.
        acc = hashes[self.begin]
        for item in hashes[self.begin + 1 : self.end]:
            acc = node_hash(item, acc)
        return [*hashes[: self.begin], acc, *hashes[self.end :]]


def range_nodes(begin: int, end: int) -> list[NodeID]:
    """Decompose the leaf range ``[begin, end)`` into maximal perfect subtrees.

    The result is left to right; for ``begin == 0`` it is the set bits of
    ``end`` from the highest down, which is also what :func:`root_nodes` uses.

    Raises:
        LocalProtocolError: ``not 0 <= begin <= end``.
    """
    if not 0 <= begin <= end:
        raise LocalProtocolError(f"invalid leaf range [{begin}, {end})")
    nodes: list[NodeID] = []
    while begin < end:
        # The largest power of two that both aligns with begin and fits.
        level = (end - begin).bit_length() - 1
        if begin:
            level = min(level, (begin & -begin).bit_length() - 1)
        nodes.append(NodeID(level, begin >> level))
        begin += 1 << level
    return nodes


def root_nodes(size: int) -> list[NodeID]:
    """The perfect subtrees whose :func:`fold_subtrees` is the root of a tree of ``size``.

    Raises:
        LocalProtocolError: ``size`` is negative.
    """
    return range_nodes(0, size)


def completed_nodes(leaf_index: int) -> list[NodeID]:
    """The perfect subtrees completed by appending leaf ``leaf_index``, lowest first.

    These are the nodes an append-only store writes: the leaf itself, then
    each ancestor whose last leaf it is: fewer than two nodes per append on
    average, about ``2n`` stored hashes for ``n`` leaves.

    Raises:
        LocalProtocolError: ``leaf_index`` is negative.
    """
    if leaf_index < 0:
        raise LocalProtocolError("leaf index must not be negative")
    nodes = [NodeID(0, leaf_index)]
    level, index = 0, leaf_index
    while index & 1:
        level, index = level + 1, index >> 1
        nodes.append(NodeID(level, index))
    return nodes


def _path_nodes(index: int, level: int, size: int) -> ProofNodes:
    """Nodes proving node ``(level, index)`` into a tree of ``size`` leaves.

    The first id is the node itself. The *fork* is the node's ancestor at the
    level where the path from the root to it parts from the path to the
    tree's right edge. Below the fork the proof is plain siblings; then comes
    the fork's right sibling, which reaches the right edge and, when it is
    incomplete, is the ephemeral node made of the perfect subtrees covering
    ``[fork_end, size)``; then the perfect subtrees left of the fork, which
    are the left siblings of the fork's ancestors.
    """
    inner = (index ^ (size >> level)).bit_length() - 1
    fork = NodeID(level + inner, index >> inner)
    fork_begin, fork_end = fork.coverage()
    ids = [NodeID(level, index)]
    ids.extend(NodeID(level + i, (index >> i) ^ 1) for i in range(inner))
    right = range_nodes(fork_end, size)
    ids.extend(reversed(right))
    ids.extend(reversed(range_nodes(0, fork_begin)))
    return ProofNodes(tuple(ids), 1 + inner, 1 + inner + len(right))


def _skip_first(nodes: ProofNodes) -> ProofNodes:
    return ProofNodes(nodes.ids[1:], nodes.begin - 1, nodes.end - 1)


def inclusion_nodes(index: int, size: int) -> ProofNodes:
    """The stored nodes of the inclusion proof of leaf ``index`` in a tree of ``size``.

    Raises:
        LocalProtocolError: ``not 0 <= index < size``.
    """
    if not 0 <= index < size:
        raise LocalProtocolError(f"leaf index {index} out of range for tree size {size}")
    return _skip_first(_path_nodes(index, 0, size))


def consistency_nodes(size1: int, size2: int) -> ProofNodes:
    """The stored nodes of the consistency proof between tree sizes ``size1`` and ``size2``.

    The proof is the root of the largest perfect subtree ending at ``size1``
    (left out when ``size1`` is a power of two: the verifier holds it as the
    old root) followed by that node's inclusion path in the tree of ``size2``
    (RFC 9162 §2.1.4.1). ``size1 == 0`` and ``size1 == size2`` need no nodes.

    Raises:
        LocalProtocolError: ``not 0 <= size1 <= size2``.
    """
    if not 0 <= size1 <= size2:
        raise LocalProtocolError(f"invalid tree sizes {size1} -> {size2}")
    if size1 in (0, size2):
        return ProofNodes((), 0, 0)
    level = (size1 & -size1).bit_length() - 1
    index = (size1 - 1) >> level
    nodes = _path_nodes(index, level, size2)
    return _skip_first(nodes) if index == 0 else nodes


# -- proof generation from a list of leaves ------------------------------------------


def subtree_hash(node: NodeID, leaf_hashes: Sequence[bytes]) -> bytes:
    """Hash of the perfect subtree ``node`` computed from all leaf hashes (O(2**level)).

    Raises:
        LocalProtocolError: the subtree is not complete within ``leaf_hashes``.
    """
    begin, end = node.coverage()
    if begin < 0 or end > len(leaf_hashes):
        raise LocalProtocolError(f"node {node} lies outside a tree of {len(leaf_hashes)}")
    return root_from_leaves(leaf_hashes[begin:end])


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Inclusion proof of leaf ``index`` in the tree of all ``leaf_hashes`` (RFC 9162 §2.1.3.1).

    Raises:
        LocalProtocolError: ``index`` is out of range or a leaf hash is malformed.
    """
    plan = inclusion_nodes(index, len(leaf_hashes))
    return plan.rehash([subtree_hash(node, leaf_hashes) for node in plan.ids])


def consistency_proof(size1: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Consistency proof from the tree of the first ``size1`` leaves to all of them.

    Follows RFC 9162 §2.1.4.1, with ``size2 = len(leaf_hashes)``.

    Raises:
        LocalProtocolError: ``size1`` is out of range or a leaf hash is malformed.
    """
    plan = consistency_nodes(size1, len(leaf_hashes))
    return plan.rehash([subtree_hash(node, leaf_hashes) for node in plan.ids])


# -- verification -----------------------------------------------------------------


class _Malformed(Exception):
    """An argument is malformed; the public verifier re-raises its own type."""


def _check_uint(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Malformed(f"{name} must be an int")
    if not 0 <= value <= MAX_TREE_SIZE:
        raise _Malformed(f"{name} {value} is outside 0..2**64-1")
    return value


def _check_hash(value: object, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise _Malformed(f"{name} must be {HASH_SIZE} bytes")
    return value


def _check_proof(proof: object, expected: int) -> tuple[bytes, ...]:
    if not isinstance(proof, Sequence) or isinstance(proof, str | bytes):
        raise _Malformed("proof must be a sequence of hashes")
    if len(proof) != expected:
        raise _Malformed(f"proof has {len(proof)} hashes, expected {expected}")
    return tuple(_check_hash(item, "proof hash") for item in proof)


def _inclusion_length(index: int, size: int) -> int:
    """Hashes in an inclusion proof: siblings below the fork plus left border nodes."""
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def _consistency_length(size1: int, size2: int) -> int:
    """Hashes in a consistency proof for ``0 < size1 < size2``."""
    shift = (size1 & -size1).bit_length() - 1
    seed = 0 if size1 == 1 << shift else 1
    return seed + _inclusion_length(size1 - 1, size2) - shift


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` with ``root``.

    Implements RFC 9162 §2.1.3.2. The proof length is checked against the one
    ``index`` and ``size`` imply before any hashing, so a hostile proof costs
    at most 64 hashes.

    Raises:
        InclusionProofError: the proof does not lead to ``root``, or any
            argument is malformed (index not below size, size or index not a
            uint64, a hash that is not 32 ``bytes``, a proof of the wrong length).
    """
    try:
        size = _check_uint(size, "tree size")
        index = _check_uint(index, "leaf index")
        if index >= size:  # step 1
            raise _Malformed(f"leaf index {index} is not below tree size {size}")
        leaf = _check_hash(leaf_hash, "leaf hash")
        expected = _check_hash(root, "root")
        path = _check_proof(proof, _inclusion_length(index, size))
    except _Malformed as exc:
        raise InclusionProofError(str(exc)) from None
    fn, sn, r = index, size - 1, leaf  # steps 2-3
    for p in path:  # step 4
        if sn == 0:
            raise InclusionProofError("proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or r != expected:  # step 5
        raise InclusionProofError("inclusion proof does not lead to the expected root")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree of ``size2`` with ``root2`` extends the tree of ``size1`` with ``root1``.

    Implements RFC 9162 §2.1.4.2 for ``0 < size1 < size2``. Equal sizes need an
    empty proof and equal roots. ``size1 == 0`` needs an empty proof and
    ``root1`` equal to :data:`EMPTY_ROOT` (every tree extends the empty one).

    Raises:
        ConsistencyError: the heads are inconsistent or any argument is
            malformed (``size1 > size2``, a size that is not a uint64, a hash
            that is not 32 ``bytes``, a proof of the wrong length). It carries
            both sizes, both roots and the proof as evidence.
    """

    def fail(message: str) -> ConsistencyError:
        evidence = proof if isinstance(proof, list | tuple) else ()
        return ConsistencyError(
            message, size1=size1, size2=size2, root1=root1, root2=root2, proof=evidence
        )

    try:
        first, second = _check_uint(size1, "size1"), _check_uint(size2, "size2")
        if first > second:
            raise _Malformed(f"size1 {first} is larger than size2 {second}")
        first_hash = _check_hash(root1, "root1")
        second_hash = _check_hash(root2, "root2")
        expected = 0 if first in (0, second) else _consistency_length(first, second)
        path = _check_proof(proof, expected)
    except _Malformed as exc:
        raise fail(str(exc)) from None
    if first == 0 and first_hash != EMPTY_ROOT:
        raise fail("root1 of an empty tree must be SHA-256 of the empty string")
    if first == second and first_hash != second_hash:
        raise fail("same tree size but different roots")
    if first in (0, second):
        return
    _chain_consistency(first, second, path, first_hash, second_hash, fail)


def _chain_consistency(
    first: int,
    second: int,
    path: tuple[bytes, ...],
    first_hash: bytes,
    second_hash: bytes,
    fail: Callable[[str], ConsistencyError],
) -> None:
    """Steps 2-7 of RFC 9162 §2.1.4.2, for ``0 < first < second``."""
    if first & (first - 1) == 0:  # step 2: first is a power of two
        path = (first_hash, *path)
    fn, sn = first - 1, second - 1  # step 3
    while fn & 1:  # step 4
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:
            raise fail("proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # step 7
        raise fail("proof is shorter than the tree is deep")
    if fr != first_hash:
        raise fail("proof does not lead to root1")
    if sr != second_hash:
        raise fail("proof does not lead to root2")
