"""Fuzz what a witness and an origin decode from a peer: CHECKPOINT and COSIGNATURE
frames, the checkpoint note a CHECKPOINT carries, a cosignature, a stored head.

Mutations of valid inputs (bit flips, byte changes, cuts, insertions) and
arbitrary bytes; "input rejected" means :class:`MalformedFrame` or
:class:`UnsupportedVersion`, anything else escaping is a bug. The judge then
runs on whatever decodes: it must answer Accepted or Refused, never raise.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire_fuzz import mutated

from talos.core import wire
from talos.core.agent_id import agent_id_from_digest
from talos.core.audit.checkpoint import Checkpoint, LogSigner
from talos.core.audit.cosignature import (
    Accepted,
    Cosignature,
    Refused,
    WitnessedHead,
    judge,
    origin_of,
)
from talos.core.audit.merkle import consistency_proof, leaf_hash, root_from_leaves
from talos.core.crypto import SigningKey, sha256
from talos.errors import MalformedFrame, SignatureInvalid, UnsupportedVersion

REJECTED = (MalformedFrame, UnsupportedVersion)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY = SigningKey(bytes(range(32)))
ORIGIN = agent_id_from_digest(sha256(b"origin"))
WITNESS = agent_id_from_digest(sha256(b"witness"))
LEAVES = [leaf_hash(bytes([n])) for n in range(9)]
SIGNER = LogSigner(KEY, ORIGIN, origin_of(ORIGIN))
HELD = Checkpoint.sign(SIGNER, 5, root_from_leaves(LEAVES[:5]))
NEW = Checkpoint.sign(SIGNER, 9, root_from_leaves(LEAVES))
PROOF = tuple(consistency_proof(5, LEAVES))


def _frame(kind: wire.EnvelopeType, **fields: object) -> bytes:
    return wire.seal(
        wire.Envelope(
            type=kind,
            message_id=b"m" * 16,
            sender=ORIGIN,
            sender_instance=b"i" * 16,
            recipient=WITNESS,
            timestamp_ms=1_700_000_000_000,
            **fields,  # type: ignore[arg-type]
        ),
        KEY,
    )


FRAMES = [
    _frame(
        wire.EnvelopeType.CHECKPOINT,
        checkpoint_note=NEW.to_text().encode(),
        old_size=5,
        consistency=PROOF,
    ),
    _frame(
        wire.EnvelopeType.COSIGNATURE,
        tree_size=9,
        tree_root=NEW.root,
        cosign_status=wire.CosignStatus.CONFLICT,
        held_size=5,
        held_root=HELD.root,
        cosignature=None,
        reason="fork",
    ),
]
COSIG = Cosignature.sign(NEW.body(), witness=WITNESS, key_sequence=0, key=KEY, timestamp=9)
HEAD = WitnessedHead(5, HELD.root, HELD.to_text().encode(), 1, 1)


def _witness(data: bytes) -> None:
    """What a witness does with a frame, up to its decision (signatures aside)."""
    try:
        envelope = wire.verify(wire.decode(data), KEY.public_key)
    except (*REJECTED, SignatureInvalid):
        return
    if envelope.type is not wire.EnvelopeType.CHECKPOINT:
        return
    try:
        checkpoint = Checkpoint.parse(envelope.checkpoint_note or b"")
    except REJECTED:
        return
    outcome = judge(
        HEAD,
        checkpoint,
        envelope.old_size or 0,
        envelope.consistency or (),
        now_ms=2,
        sent_ms=envelope.timestamp_ms,
    )
    assert isinstance(outcome, Accepted | Refused)


@FUZZ
@given(mutated(FRAMES) | st.binary(max_size=2048))
def test_witness_frames_are_rejected_or_judged(data: bytes) -> None:
    _witness(data)


@FUZZ
@given(mutated([COSIG.to_bytes(), HEAD.to_bytes()]) | st.binary(max_size=600))
def test_cosignatures_and_stored_heads_raise_only_rejections(data: bytes) -> None:
    for decode in (Cosignature.from_bytes, WitnessedHead.from_bytes):
        try:
            decode(data)
        except REJECTED:
            pass


@FUZZ
@given(mutated([NEW.to_text().encode()]))
def test_checkpoint_notes_are_rejected_or_judged(data: bytes) -> None:
    try:
        checkpoint = Checkpoint.parse(data)
    except REJECTED:
        return
    outcome = judge(HEAD, checkpoint, 5, PROOF, now_ms=2, sent_ms=2)
    assert isinstance(outcome, Accepted | Refused)
