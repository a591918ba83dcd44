"""talos.core.audit.merkle against a literal transcription of RFC 9162 §2.1."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import pytest

from talos.core.audit import merkle
from talos.core.audit.merkle import (
    EMPTY_ROOT,
    NodeID,
    ProofNodes,
    completed_nodes,
    consistency_nodes,
    consistency_proof,
    fold_subtrees,
    inclusion_nodes,
    inclusion_proof,
    leaf_hash,
    node_hash,
    range_nodes,
    root_from_leaves,
    root_nodes,
    subtree_hash,
    verify_consistency,
    verify_inclusion,
)
from talos.errors import ConsistencyError, InclusionProofError, LocalProtocolError

MAX_SIZE = 64


# -- the naive reference: RFC 9162 §2.1.1, §2.1.3.1, §2.1.4.1, recursively -------


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [ref_mth(leaves)]
    k = _split(n)
    if m <= k:
        return [*ref_subproof(m, leaves[:k], complete), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


def ref_consistency(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    if m in (0, len(leaves)):
        return []
    return ref_subproof(m, leaves, True)


LEAVES = [leaf_hash(i.to_bytes(2, "big")) for i in range(MAX_SIZE)]
SIZES = range(1, MAX_SIZE + 1)


# -- hashing ----------------------------------------------------------------------


def test_leaf_and_node_hash_use_domain_separation() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert (
        node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    )


def test_root_of_empty_tree_is_sha256_of_empty_string() -> None:
    assert root_from_leaves([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert EMPTY_ROOT.hex().startswith("e3b0c442")


def test_root_matches_reference_for_every_size() -> None:
    for size in range(MAX_SIZE + 1):
        assert root_from_leaves(LEAVES[:size]) == ref_mth(LEAVES[:size]), size


def test_root_of_one_leaf_is_the_leaf() -> None:
    assert root_from_leaves(LEAVES[:1]) == LEAVES[0]


@pytest.mark.parametrize("bad", [[b"short"], ["a" * 32], [None]])
def test_root_rejects_malformed_leaf_hashes(bad: list[object]) -> None:
    with pytest.raises(LocalProtocolError):
        root_from_leaves(bad)  # type: ignore[arg-type]


# -- proof generation against the reference --------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_inclusion_proofs_match_reference(size: int) -> None:
    leaves = LEAVES[:size]
    root = ref_mth(leaves)
    for index in range(size):
        proof = inclusion_proof(index, leaves)
        assert proof == ref_path(index, leaves), (index, size)
        verify_inclusion(leaves[index], index, size, proof, root)


@pytest.mark.parametrize("size2", SIZES)
def test_consistency_proofs_match_reference(size2: int) -> None:
    leaves = LEAVES[:size2]
    root2 = ref_mth(leaves)
    for size1 in range(size2 + 1):
        proof = consistency_proof(size1, leaves)
        assert proof == ref_consistency(size1, leaves), (size1, size2)
        verify_consistency(size1, size2, proof, ref_mth(leaves[:size1]), root2)


def test_empty_tree_is_consistent_with_itself() -> None:
    verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)


# -- node coordinates -------------------------------------------------------------------


def _stored_hashes(nodes: ProofNodes, leaves: Sequence[bytes]) -> list[bytes]:
    """What a storage layer would read: only perfect subtrees, by coordinate."""
    for node in nodes.ids:
        begin, end = node.coverage()
        assert end - begin == 1 << node.level
        assert end <= len(leaves)
    return [ref_mth(leaves[slice(*node.coverage())]) for node in nodes.ids]


@pytest.mark.parametrize("size", SIZES)
def test_inclusion_nodes_rebuild_reference_proofs(size: int) -> None:
    leaves = LEAVES[:size]
    for index in range(size):
        nodes = inclusion_nodes(index, size)
        assert nodes.rehash(_stored_hashes(nodes, leaves)) == ref_path(index, leaves)
        assert len(nodes.ids) <= 2 * size.bit_length()


@pytest.mark.parametrize("size2", SIZES)
def test_consistency_nodes_rebuild_reference_proofs(size2: int) -> None:
    leaves = LEAVES[:size2]
    for size1 in range(size2 + 1):
        nodes = consistency_nodes(size1, size2)
        assert nodes.rehash(_stored_hashes(nodes, leaves)) == ref_consistency(size1, leaves)
        assert len(nodes.ids) <= 2 * size2.bit_length() + 1


def test_inclusion_nodes_example_with_ephemeral_node() -> None:
    # Leaf 0 of 7: siblings (0,1) and (1,1), then the ephemeral node over
    # leaves 4..6 = hash((1,2), (0,6)), whose pieces come smallest first.
    nodes = inclusion_nodes(0, 7)
    assert nodes.ids == (NodeID(0, 1), NodeID(1, 1), NodeID(0, 6), NodeID(1, 2))
    assert (nodes.begin, nodes.end) == (2, 4)


def test_consistency_nodes_example() -> None:
    # 6 -> 8: the seed (1,2) is sent because 6 is not a power of two.
    nodes = consistency_nodes(6, 8)
    assert nodes.ids == (NodeID(1, 2), NodeID(1, 3), NodeID(2, 0))
    assert consistency_nodes(4, 8).ids == (NodeID(2, 1),)


def test_range_and_root_nodes() -> None:
    assert root_nodes(13) == [NodeID(3, 0), NodeID(2, 2), NodeID(0, 12)]
    assert range_nodes(5, 12) == [NodeID(0, 5), NodeID(1, 3), NodeID(2, 2)]
    assert root_nodes(0) == []
    for size in SIZES:
        stored = [subtree_hash(node, LEAVES) for node in root_nodes(size)]
        assert fold_subtrees(stored) == ref_mth(LEAVES[:size])


def test_completed_nodes_cover_every_perfect_subtree_once() -> None:
    seen: set[NodeID] = set()
    for index in range(MAX_SIZE):
        for node in completed_nodes(index):
            assert node.coverage()[1] == index + 1
            assert node not in seen
            seen.add(node)
    assert len(seen) == 2 * MAX_SIZE - 1
    assert completed_nodes(7) == [NodeID(0, 7), NodeID(1, 3), NodeID(2, 1), NodeID(3, 0)]


def test_rehash_rejects_wrong_count() -> None:
    with pytest.raises(LocalProtocolError):
        inclusion_nodes(0, 7).rehash([b"\x00" * 32])


@pytest.mark.parametrize(("index", "size"), [(-1, 4), (4, 4), (0, 0)])
def test_generation_rejects_bad_index(index: int, size: int) -> None:
    with pytest.raises(LocalProtocolError):
        inclusion_nodes(index, size)
    with pytest.raises(LocalProtocolError):
        inclusion_proof(index, LEAVES[:size])


@pytest.mark.parametrize(("size1", "size2"), [(-1, 4), (5, 4)])
def test_generation_rejects_bad_sizes(size1: int, size2: int) -> None:
    with pytest.raises(LocalProtocolError):
        consistency_nodes(size1, size2)
    with pytest.raises(LocalProtocolError):
        consistency_proof(size1, LEAVES[:size2])


def test_helpers_reject_bad_ranges() -> None:
    with pytest.raises(LocalProtocolError):
        range_nodes(3, 2)
    with pytest.raises(LocalProtocolError):
        completed_nodes(-1)
    with pytest.raises(LocalProtocolError):
        fold_subtrees([])
    with pytest.raises(LocalProtocolError):
        subtree_hash(NodeID(3, 0), LEAVES[:7])


# -- verification rejects malformed arguments with the documented exception ----------------

SIZE = 13
ROOT = ref_mth(LEAVES[:SIZE])
PROOF = ref_path(5, LEAVES[:SIZE])
GOOD_INCLUSION: dict[str, object] = {
    "leaf_hash": LEAVES[5],
    "index": 5,
    "size": SIZE,
    "proof": PROOF,
    "root": ROOT,
}

BAD_INCLUSION: list[tuple[str, object]] = [
    ("index", -1),
    ("index", SIZE),
    ("index", 2**64),
    ("index", 5.0),
    ("index", True),
    ("index", "5"),
    ("index", None),
    ("size", -1),
    ("size", 0),
    ("size", 2**64),
    ("size", 2**200),
    ("size", None),
    ("leaf_hash", LEAVES[5][:31]),
    ("leaf_hash", LEAVES[5] + b"\x00"),
    ("leaf_hash", bytearray(LEAVES[5])),
    ("leaf_hash", LEAVES[5].hex()),
    ("leaf_hash", None),
    ("root", ROOT[:-1]),
    ("root", b""),
    ("root", None),
    ("proof", None),
    ("proof", 7),
    ("proof", b"".join(PROOF)),
    ("proof", "".join(p.hex() for p in PROOF)),
    ("proof", PROOF[:-1]),
    ("proof", [*PROOF, PROOF[0]]),
    ("proof", [*PROOF[:-1], PROOF[-1][:-1]]),
    ("proof", [*PROOF[:-1], None]),
    ("proof", [*PROOF[:-1], PROOF[-1].hex()]),
    ("proof", iter(PROOF)),
    ("proof", list(reversed(PROOF))),
    ("leaf_hash", LEAVES[6]),
    ("root", ref_mth(LEAVES[: SIZE - 1])),
]


def test_good_inclusion_baseline_verifies() -> None:
    verify_inclusion(**GOOD_INCLUSION)  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), BAD_INCLUSION)
def test_verify_inclusion_rejects(field: str, value: object) -> None:
    with pytest.raises(InclusionProofError):
        verify_inclusion(**{**GOOD_INCLUSION, field: value})  # type: ignore[arg-type]


CONS_PROOF = ref_consistency(6, LEAVES[:SIZE])
GOOD_CONSISTENCY: dict[str, object] = {
    "size1": 6,
    "size2": SIZE,
    "proof": CONS_PROOF,
    "root1": ref_mth(LEAVES[:6]),
    "root2": ROOT,
}

BAD_CONSISTENCY: list[tuple[str, object]] = [
    ("size1", -1),
    ("size1", SIZE + 1),
    ("size1", 2**64),
    ("size1", 6.0),
    ("size1", None),
    ("size1", 0),
    ("size1", SIZE),
    ("size1", 7),
    ("size2", -1),
    ("size2", 5),
    ("size2", 2**64),
    ("size2", False),
    ("root1", b"\x00" * 31),
    ("root1", None),
    ("root1", bytearray(32)),
    ("root1", ROOT),
    ("root2", b""),
    ("root2", "x" * 32),
    ("root2", ref_mth(LEAVES[:6])),
    ("proof", None),
    ("proof", 3),
    ("proof", b"".join(CONS_PROOF)),
    ("proof", []),
    ("proof", CONS_PROOF[:-1]),
    ("proof", [*CONS_PROOF, CONS_PROOF[0]]),
    ("proof", [CONS_PROOF[0][:-1], *CONS_PROOF[1:]]),
    ("proof", [None, *CONS_PROOF[1:]]),
    ("proof", list(reversed(CONS_PROOF))),
]


def test_good_consistency_baseline_verifies() -> None:
    verify_consistency(**GOOD_CONSISTENCY)  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), BAD_CONSISTENCY)
def test_verify_consistency_rejects(field: str, value: object) -> None:
    with pytest.raises(ConsistencyError):
        verify_consistency(**{**GOOD_CONSISTENCY, field: value})  # type: ignore[arg-type]


def test_consistency_error_carries_evidence() -> None:
    bad_root2 = b"\xff" * 32
    with pytest.raises(ConsistencyError) as info:
        verify_consistency(6, SIZE, CONS_PROOF, GOOD_CONSISTENCY["root1"], bad_root2)  # type: ignore[arg-type]
    err = info.value
    assert (err.size1, err.size2) == (6, SIZE)
    assert (err.root1, err.root2) == (GOOD_CONSISTENCY["root1"], bad_root2)
    assert err.proof == tuple(CONS_PROOF)


def test_consistency_special_cases() -> None:
    root3 = ref_mth(LEAVES[:3])
    verify_consistency(3, 3, [], root3, root3)
    verify_consistency(0, 3, [], EMPTY_ROOT, root3)
    with pytest.raises(ConsistencyError):
        verify_consistency(3, 3, [root3], root3, root3)
    with pytest.raises(ConsistencyError):
        verify_consistency(3, 3, [], root3, ROOT)
    with pytest.raises(ConsistencyError):
        verify_consistency(0, 3, [], root3, root3)
    with pytest.raises(ConsistencyError):
        verify_consistency(0, 0, [], root3, root3)


# -- what a proof binds: the leaf's path, not the tree size ------------------------------


@functools.cache
def inclusion_sides(index: int, size: int) -> tuple[bool, ...]:
    """Per proof element: is it a left sibling? This alone fixes the hashing order."""
    nodes = inclusion_nodes(index, size)
    groups: list[tuple[int, ...]] = [(i,) for i in range(nodes.begin)]
    groups += [tuple(range(nodes.begin, nodes.end))] if nodes.end > nodes.begin else []
    groups += [(i,) for i in range(nodes.end, len(nodes.ids))]
    return tuple(nodes.ids[g[0]].coverage()[0] < index for g in groups)


@functools.cache
def consistency_sides(size1: int, size2: int) -> tuple[str, ...]:
    """Per proof element: the seed (S), or left (L) / right (R) of the seed."""
    nodes = consistency_nodes(size1, size2)
    seed_begin = size1 - (size1 & -size1)
    groups: list[tuple[int, ...]] = [(i,) for i in range(nodes.begin)]
    groups += [tuple(range(nodes.begin, nodes.end))] if nodes.end > nodes.begin else []
    groups += [(i,) for i in range(nodes.end, len(nodes.ids))]
    sides = []
    for g in groups:
        begin, end = nodes.ids[g[0]].coverage()
        sides.append("S" if end == size1 and begin == seed_begin else "LR"[begin >= size1])
    return tuple(sides)


@pytest.mark.parametrize("size", SIZES)
def test_changed_index_is_always_rejected_changed_size_only_if_shape_differs(size: int) -> None:
    # A proof authenticates the leaf's path, not the size: a size whose proof
    # has the same shape performs the very same hashing, so it must verify.
    # The size is bound by the signed tree head, not by the proof.
    leaves = LEAVES[:size]
    root = ref_mth(leaves)
    for index in range(size):
        proof = ref_path(index, leaves)
        for other in range(MAX_SIZE):
            if other != index:
                with pytest.raises(InclusionProofError):
                    verify_inclusion(leaves[index], other, size, proof, root)
        for other_size in range(index + 1, MAX_SIZE + 1):
            same = inclusion_sides(index, other_size) == inclusion_sides(index, size)
            if same:
                verify_inclusion(leaves[index], index, other_size, proof, root)
            elif other_size != size:
                with pytest.raises(InclusionProofError):
                    verify_inclusion(leaves[index], index, other_size, proof, root)


@functools.cache
def shapes_by_sizes(limit: int) -> list[tuple[int, int, tuple[str, ...]]]:
    return [(s1, s2, consistency_sides(s1, s2)) for s2 in range(2, limit) for s1 in range(1, s2)]


@pytest.mark.parametrize("size2", range(2, 25))
def test_changed_consistency_sizes_rejected_unless_shape_is_identical(size2: int) -> None:
    leaves = LEAVES[:size2]
    root2 = ref_mth(leaves)
    for size1 in range(1, size2):
        proof = ref_consistency(size1, leaves)
        root1 = ref_mth(leaves[:size1])
        shape = consistency_sides(size1, size2)
        for other1, other2, other_shape in shapes_by_sizes(25):
            if other_shape == shape:
                verify_consistency(other1, other2, proof, root1, root2)
            else:
                with pytest.raises(ConsistencyError):
                    verify_consistency(other1, other2, proof, root1, root2)


def test_verifiers_handle_the_uint64_edge() -> None:
    size = merkle.MAX_TREE_SIZE
    index = size - 1
    proof = [b"\x01" * 32] * ((index ^ (size - 1)).bit_length() + (index >> 0).bit_count())
    with pytest.raises(InclusionProofError):
        verify_inclusion(LEAVES[0], index, size, proof, ROOT)
    with pytest.raises(ConsistencyError):
        verify_consistency(size - 1, size, [b"\x01" * 32] * 64, ROOT, ROOT)


@pytest.mark.parametrize("data", [5, None, "text"])
def test_leaf_hash_rejects_non_bytes(data: object) -> None:
    with pytest.raises(LocalProtocolError):
        leaf_hash(data)  # type: ignore[arg-type]
