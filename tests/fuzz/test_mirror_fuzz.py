"""Fuzz the MIRROR body decoder: only documented exceptions may escape.

Seeds are valid bodies of every sub-kind; mutations flip bits, cut, insert
and splice. "Rejected" means MalformedFrame or UnsupportedVersion; whatever
is accepted must re-encode to exactly the input (strict, canonical).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talos.core.audit.checkpoint import Checkpoint, LogSigner
from talos.core.audit.entry import AuditEntry
from talos.core.audit.merkle import leaf_hash, root_from_leaves
from talos.core.crypto import SigningKey
from talos.core.mirror import (
    Ack,
    Batch,
    Entries,
    Fetch,
    MirrorKind,
    RefusalCode,
    Refused,
    decode_body,
    encode_body,
    kind_of,
)
from talos.errors import MalformedFrame, UnsupportedVersion

REJECTED = (MalformedFrame, UnsupportedVersion)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIGNER = LogSigner(SigningKey(bytes(range(32))), "alice", "alice/audit")
ENTRIES = tuple(AuditEntry(n, 5 + n, "MESSAGE_SENT", "bob", {"n": n}).to_bytes() for n in range(3))
CHECKPOINT = Checkpoint.sign(SIGNER, 3, root_from_leaves([leaf_hash(e) for e in ENTRIES]))
BODIES = [
    Batch(0, ENTRIES, CHECKPOINT),
    Ack(3),
    Fetch(0, 128),
    Entries(0, ENTRIES, CHECKPOINT, 3),
    Refused(RefusalCode.GAP, "batch starts at 9; 3 are held"),
]
SEEDS = [(kind_of(body), encode_body(body)) for body in BODIES]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[MirrorKind, bytes]:
    kind, seed = draw(st.sampled_from(SEEDS))
    kind = draw(st.sampled_from([kind, *MirrorKind]))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at]
    return kind, bytes(data)


def _decode(kind: MirrorKind, data: bytes) -> None:
    try:
        body = decode_body(kind, data)
    except REJECTED:
        return
    assert encode_body(body) == data


@FUZZ
@given(mutated())
def test_mutated_bodies_are_decoded_or_rejected(case: tuple[MirrorKind, bytes]) -> None:
    _decode(*case)


@FUZZ
@given(st.sampled_from(list(MirrorKind)), st.binary(max_size=512))
def test_random_bytes_are_decoded_or_rejected(kind: MirrorKind, data: bytes) -> None:
    _decode(kind, data)
