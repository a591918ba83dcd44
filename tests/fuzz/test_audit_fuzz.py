"""Fuzz the audit decoders: only documented exceptions may escape.

Targets: :meth:`AuditEntry.from_bytes`, :meth:`Block.from_bytes`,
:meth:`Checkpoint.parse` (and ``verify`` after it), :func:`parse_verifier_key`
and :meth:`InclusionProof.from_json_dict`. "Input rejected" means
:class:`MalformedFrame` or :class:`UnsupportedVersion` (and
:class:`SignatureInvalid` from a verifier); anything else is a bug.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talos.core.audit.checkpoint import (
    Block,
    Checkpoint,
    InclusionProof,
    LogSigner,
    parse_verifier_key,
)
from talos.core.audit.entry import AuditEntry
from talos.core.crypto import SigningKey, sha256
from talos.errors import MalformedFrame, SignatureInvalid, UnsupportedVersion

REJECTED = (MalformedFrame, UnsupportedVersion)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = SigningKey(bytes(range(32)))
SIGNER = LogSigner(KEY, "fuzz.example")

ENTRY = AuditEntry(7, 1_700_000_000_000, "MESSAGE_SENT", "bob", {"h": b"h" * 32}).to_bytes()
BLOCK = (
    Block(2, sha256(b"p"), 10, 19, 20, sha256(b"r"), 1_700_000_000_000).signed_by(KEY).to_bytes()
)
NOTE = Checkpoint.sign(SIGNER, 20, sha256(b"r")).to_text()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    raw = bytearray(data)
    for position, value in edits:
        raw[position % len(raw)] = value
    return bytes(raw if cut is None else raw[: cut % (len(raw) + 1)])


_edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4)


@FUZZ
@given(st.binary(max_size=600))
def test_entry_decoder_random_bytes(data: bytes) -> None:
    try:
        AuditEntry.from_bytes(data)
    except REJECTED:
        pass


@FUZZ
@given(_edits, st.none() | st.integers(0, 1000))
def test_entry_decoder_mutations(edits: list[tuple[int, int]], cut: int | None) -> None:
    try:
        entry = AuditEntry.from_bytes(_mutate(ENTRY, edits, cut))
    except REJECTED:
        return
    assert AuditEntry.from_bytes(entry.to_bytes()) == entry


@FUZZ
@given(_edits, st.none() | st.integers(0, 1000))
def test_block_decoder_mutations(edits: list[tuple[int, int]], cut: int | None) -> None:
    try:
        block = Block.from_bytes(_mutate(BLOCK, edits, cut))
    except REJECTED:
        return
    try:
        block.verify_signature()
    except SignatureInvalid:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_block_decoder_random_bytes(data: bytes) -> None:
    try:
        Block.from_bytes(data)
    except REJECTED:
        pass


@FUZZ
@given(_edits, st.none() | st.integers(0, 1000))
def test_checkpoint_parser_mutations(edits: list[tuple[int, int]], cut: int | None) -> None:
    data = _mutate(NOTE.encode(), edits, cut)
    try:
        checkpoint = Checkpoint.parse(data)
    except REJECTED:
        return
    try:
        checkpoint.verify(KEY.public_key, SIGNER.name)
    except SignatureInvalid:
        pass


@FUZZ
@given(st.text(max_size=300))
def test_checkpoint_parser_random_text(text: str) -> None:
    try:
        Checkpoint.parse(text)
    except REJECTED:
        pass
    try:
        parse_verifier_key(text)
    except REJECTED:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=10,
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "leaf_index": _json,
            "tree_size": _json,
            "leaf_hash": _json | st.just("ab" * 32),
            "hashes": _json | st.just(["cd" * 32]),
            "checkpoint": _json | st.just(NOTE),
        },
    )
    | _json
)
def test_proof_file_reader(obj: Any) -> None:
    try:
        InclusionProof.from_json_dict(obj)
    except REJECTED:
        pass
