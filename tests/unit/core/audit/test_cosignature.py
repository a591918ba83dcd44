"""Witness cosignatures and the witness's rules (talos.core.audit.cosignature)."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.agent_id import agent_id_from_digest
from talos.core.audit.checkpoint import Checkpoint, LogSigner
from talos.core.audit.cosignature import (
    Accepted,
    Cosignature,
    Refused,
    WitnessedHead,
    evictable,
    judge,
    origin_conflict,
    origin_of,
)
from talos.core.audit.merkle import consistency_proof, leaf_hash, root_from_leaves
from talos.core.crypto import SigningKey, sha256
from talos.errors import MalformedFrame, SignatureInvalid

ORIGIN = agent_id_from_digest(sha256(b"origin"))
WITNESS = agent_id_from_digest(sha256(b"witness"))
ORIGIN_KEY = SigningKey(bytes(range(32)))
WITNESS_KEY = SigningKey(bytes(range(1, 33)))
SIGNER = LogSigner(ORIGIN_KEY, ORIGIN, origin_of(ORIGIN))
LEAVES = [leaf_hash(b"entry %d" % n) for n in range(20)]
OTHER = [leaf_hash(b"other %d" % n) for n in range(20)]


def head(size: int, leaves: list[bytes] = LEAVES) -> Checkpoint:
    return Checkpoint.sign(SIGNER, size, root_from_leaves(leaves[:size]))


def held(size: int, leaves: list[bytes] = LEAVES) -> WitnessedHead:
    outcome = judge(None, head(size, leaves), 0, (), now_ms=1, sent_ms=1)
    assert isinstance(outcome, Accepted)
    return outcome.head


def test_a_cosignature_verifies_round_trips_and_binds_everything() -> None:
    body = head(5).body()
    cosig = Cosignature.sign(body, witness=WITNESS, key_sequence=2, key=WITNESS_KEY, timestamp=77)
    cosig.verify(body, WITNESS_KEY.public_key)
    assert Cosignature.from_bytes(cosig.to_bytes()) == cosig
    with pytest.raises(SignatureInvalid):
        cosig.verify(head(6).body(), WITNESS_KEY.public_key)
    for changed in (
        dataclasses.replace(cosig, timestamp=78),
        dataclasses.replace(cosig, key_sequence=1),
        dataclasses.replace(cosig, witness=ORIGIN),
    ):
        with pytest.raises(SignatureInvalid):
            changed.verify(body, WITNESS_KEY.public_key)
    with pytest.raises(SignatureInvalid):
        cosig.verify(body, ORIGIN_KEY.public_key)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("ts"),
        lambda m: m.update(extra=1),
        lambda m: m.update(v=2),
        lambda m: m.update(w="not an id"),
        lambda m: m.update(sig=b"s" * 63),
        lambda m: m.update(ks=-1),
        lambda m: m.update(ts="1"),
    ],
)
def test_malformed_cosignatures_are_refused(mutate: object) -> None:
    cosig = Cosignature.sign(b"b", witness=WITNESS, key_sequence=0, key=WITNESS_KEY, timestamp=1)
    raw = cosig.to_dict()
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(MalformedFrame):
        Cosignature.from_bytes(cbor2.dumps(raw, canonical=True))


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_cosignature_decoding_raises_only_malformed_frame(data: bytes) -> None:
    try:
        Cosignature.from_bytes(data)
    except MalformedFrame:
        pass


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_witnessed_head_decoding_raises_only_malformed_frame(data: bytes) -> None:
    try:
        WitnessedHead.from_bytes(data)
    except MalformedFrame:
        pass


def test_the_first_checkpoint_of_an_origin_is_accepted() -> None:
    outcome = judge(None, head(4), 0, (), now_ms=9)
    assert isinstance(outcome, Accepted)
    assert outcome.grew
    assert WitnessedHead.from_bytes(outcome.head.to_bytes()) == outcome.head
    assert Checkpoint.parse(outcome.head.note) == head(4)


def test_an_extension_with_its_consistency_proof_is_accepted() -> None:
    proof = consistency_proof(5, LEAVES[:12])
    outcome = judge(held(5), head(12), 5, proof, now_ms=9, sent_ms=2)
    assert isinstance(outcome, Accepted)
    assert outcome.grew
    assert outcome.head.size == 12


def test_the_same_head_again_is_accepted_without_growing() -> None:
    outcome = judge(held(5), head(5), 3, (), now_ms=9)
    assert isinstance(outcome, Accepted)
    assert not outcome.grew


@pytest.mark.parametrize(
    ("checkpoint", "old", "proof", "reason"),
    [
        (head(3), 0, (), "rollback"),
        (head(5, OTHER), 5, (), "fork"),
        (head(12), 4, tuple(consistency_proof(4, LEAVES[:12])), "stale"),
        (head(12, OTHER), 5, tuple(consistency_proof(5, OTHER[:12])), "inconsistent"),
        (head(12), 5, (), "inconsistent"),
    ],
)
def test_refusals(checkpoint: Checkpoint, old: int, proof: tuple[bytes, ...], reason: str) -> None:
    outcome = judge(held(5), checkpoint, old, proof, now_ms=9, sent_ms=2)
    assert isinstance(outcome, Refused)
    assert outcome.reason == reason
    assert outcome.held == held(5)
    assert outcome.equivocation == (reason != "stale")


@pytest.mark.parametrize("checkpoint", [head(3), head(5, OTHER), head(12, OTHER)])
def test_a_frame_sent_before_the_held_head_is_stale_not_an_equivocation(
    checkpoint: Checkpoint,
) -> None:
    """A replayed (or reordered) older frame of the origin's is no contradiction."""
    outcome = judge(held(5), checkpoint, 5, (), now_ms=9, sent_ms=1)
    assert isinstance(outcome, Refused)
    assert outcome.reason == "stale"
    assert not outcome.equivocation


def test_how_the_origin_reads_a_conflict() -> None:
    root5 = root_from_leaves(LEAVES[:5])
    assert origin_conflict(4, None, 5, root5) == "rollback"
    assert origin_conflict(9, root_from_leaves(OTHER[:5]), 5, root5) == "fork"
    assert origin_conflict(9, root5, 5, root5) == "stale"


def test_the_oldest_unprotected_origin_is_evicted() -> None:
    heads = [("a", 30), ("b", 10), ("c", 10), ("d", 5)]
    assert evictable(heads, frozenset({"d"})) == "b"  # oldest unprotected; ties by id
    assert evictable(heads, frozenset()) == "d"
    assert evictable(heads, frozenset({"a", "b", "c", "d"})) is None
    assert evictable([], frozenset()) is None
