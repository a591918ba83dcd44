"""Property tests for Merkle proofs: generated proofs verify, any damage is rejected.

A changed tree size is rejected only when it changes the proof's *shape*
(which side each proof hash is on): a proof binds the leaf's path, and two
sizes with the same path shape hash identically. The tree size itself is
bound by the signed tree head.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.audit.merkle import (
    consistency_nodes,
    consistency_proof,
    inclusion_nodes,
    inclusion_proof,
    leaf_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from talos.errors import ConsistencyError, InclusionProofError

MAX_SIZE = 300
LEAVES = [leaf_hash(i.to_bytes(4, "big")) for i in range(MAX_SIZE)]
ROOTS = [root_from_leaves(LEAVES[:n]) for n in range(MAX_SIZE + 1)]

PROFILE = settings(max_examples=300, deadline=None)


def _flip(data: bytes, bit: int) -> bytes:
    bit %= len(data) * 8
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _rejects(error: type[Exception], call: Callable[[], None]) -> bool:
    try:
        call()
    except error:
        return True
    return False


def _inclusion_shape(index: int, size: int) -> tuple[bool, ...]:
    nodes = inclusion_nodes(index, size)
    firsts = [*range(nodes.begin), *([nodes.begin] if nodes.end > nodes.begin else [])]
    firsts += range(nodes.end, len(nodes.ids))
    return tuple(nodes.ids[i].coverage()[0] < index for i in firsts)


def _consistency_shape(size1: int, size2: int) -> tuple[str, ...]:
    nodes = consistency_nodes(size1, size2)
    firsts = [*range(nodes.begin), *([nodes.begin] if nodes.end > nodes.begin else [])]
    firsts += range(nodes.end, len(nodes.ids))
    seed = size1 - (size1 & -size1)
    shape = []
    for i in firsts:
        begin, end = nodes.ids[i].coverage()
        shape.append("S" if (begin, end) == (seed, size1) else "LR"[begin >= size1])
    return tuple(shape)


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, MAX_SIZE))
    return size, draw(st.integers(0, size - 1))


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    size2 = draw(st.integers(1, MAX_SIZE))
    return draw(st.integers(0, size2)), size2


@PROFILE
@given(tree_and_index())
def test_inclusion_proofs_verify(tree: tuple[int, int]) -> None:
    size, index = tree
    verify_inclusion(LEAVES[index], index, size, inclusion_proof(index, LEAVES[:size]), ROOTS[size])


@PROFILE
@given(two_sizes())
def test_consistency_proofs_verify(sizes: tuple[int, int]) -> None:
    size1, size2 = sizes
    proof = consistency_proof(size1, LEAVES[:size2])
    verify_consistency(size1, size2, proof, ROOTS[size1], ROOTS[size2])


@PROFILE
@given(tree_and_index(), st.integers(0, 2**16), st.sampled_from(["leaf", "root", "proof"]))
def test_inclusion_rejects_any_bit_flip(tree: tuple[int, int], bit: int, target: str) -> None:
    size, index = tree
    leaf, root = LEAVES[index], ROOTS[size]
    proof = inclusion_proof(index, LEAVES[:size])
    if target == "leaf":
        leaf = _flip(leaf, bit)
    elif target == "root":
        root = _flip(root, bit)
    elif proof:
        where = bit % len(proof)
        proof[where] = _flip(proof[where], bit // len(proof))
    else:
        leaf = _flip(leaf, bit)
    assert _rejects(InclusionProofError, lambda: verify_inclusion(leaf, index, size, proof, root))


@PROFILE
@given(tree_and_index(), st.integers(0, MAX_SIZE), st.integers(-2, 2 * MAX_SIZE))
def test_inclusion_binds_index_and_path_shape(
    tree: tuple[int, int], other_index: int, other_size: int
) -> None:
    size, index = tree
    proof = inclusion_proof(index, LEAVES[:size])
    if other_index != index:
        assert _rejects(
            InclusionProofError,
            lambda: verify_inclusion(LEAVES[index], other_index, size, proof, ROOTS[size]),
        )
    if other_size != size:

        def call() -> None:
            verify_inclusion(LEAVES[index], index, other_size, proof, ROOTS[size])

        same = other_size > index and _inclusion_shape(index, other_size) == _inclusion_shape(
            index, size
        )
        assert _rejects(InclusionProofError, call) != same


@PROFILE
@given(two_sizes(), st.integers(0, 2**16), st.sampled_from(["root1", "root2", "proof"]))
def test_consistency_rejects_any_bit_flip(sizes: tuple[int, int], bit: int, target: str) -> None:
    size1, size2 = sizes
    root1, root2 = ROOTS[size1], ROOTS[size2]
    proof = consistency_proof(size1, LEAVES[:size2])
    if target == "root1" or size1 == 0:
        # Every tree extends the empty one: with size1 == 0 only root1 is checked.
        root1 = _flip(root1, bit)
    elif target == "root2" or not proof:
        root2 = _flip(root2, bit)
    else:
        where = bit % len(proof)
        proof[where] = _flip(proof[where], bit // len(proof))
    assert _rejects(ConsistencyError, lambda: verify_consistency(size1, size2, proof, root1, root2))


@PROFILE
@given(two_sizes(), st.integers(-2, MAX_SIZE), st.integers(-2, 2 * MAX_SIZE))
def test_consistency_binds_path_shape(sizes: tuple[int, int], other1: int, other2: int) -> None:
    size1, size2 = sizes
    if (other1, other2) == (size1, size2):
        return
    root1, root2 = ROOTS[size1], ROOTS[size2]
    proof = consistency_proof(size1, LEAVES[:size2])
    rejected = _rejects(
        ConsistencyError, lambda: verify_consistency(other1, other2, proof, root1, root2)
    )
    if 0 < size1 < size2 and 0 < other1 < other2:
        same = _consistency_shape(other1, other2) == _consistency_shape(size1, size2)
        assert rejected != same
    elif 0 < size1 < size2 or 0 < other1 < other2:
        assert rejected
