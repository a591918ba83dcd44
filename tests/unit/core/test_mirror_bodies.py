"""MIRROR bodies (talos.core.mirror): round trips, bounds, strict decoding, the tree border."""

from __future__ import annotations

import cbor2
import pytest

from talos.core.audit.checkpoint import Checkpoint, LogSigner
from talos.core.audit.entry import AuditEntry
from talos.core.audit.merkle import EMPTY_ROOT, leaf_hash, root_from_leaves
from talos.core.crypto import SigningKey
from talos.core.encoding import canonical_dumps
from talos.core.mirror import (
    MAX_BATCH_ENTRIES,
    Ack,
    Batch,
    Entries,
    Fetch,
    MirrorKind,
    RefusalCode,
    Refused,
    TreeBorder,
    decode_body,
    encode_body,
    kind_of,
    leaves_root,
    with_request,
)
from talos.errors import MalformedFrame, UnsupportedVersion

SIGNER = LogSigner(SigningKey(bytes(range(32))), "alice", "alice/audit")


def raw_entries(n: int, start: int = 0) -> tuple[bytes, ...]:
    return tuple(
        AuditEntry(seq, 1000 + seq, "MESSAGE_SENT", "bob", {"n": seq}).to_bytes()
        for seq in range(start, start + n)
    )


def batch(n: int = 3) -> Batch:
    entries = raw_entries(n)
    root = root_from_leaves([leaf_hash(raw) for raw in entries])
    return Batch(0, entries, Checkpoint.sign(SIGNER, n, root))


BODIES = [
    batch(),
    Ack(17),
    Fetch(4, MAX_BATCH_ENTRIES),
    Entries(0, batch().entries, batch().checkpoint, 9),
    Entries(9, (), None, 9),
    Refused(RefusalCode.QUOTA, "quota of 10 bytes exceeded"),
    Ack(17, b"r" * 16),
    Refused(RefusalCode.STALE, "stale", b"q" * 8),
    Fetch(0, 1, b"f" * 32),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_round_trip(body: object) -> None:
    data = encode_body(body)  # type: ignore[arg-type]
    assert decode_body(kind_of(body), data) == body  # type: ignore[arg-type]


def test_body_of_another_kind_is_refused() -> None:
    with pytest.raises(MalformedFrame, match="exactly the fields"):
        decode_body(MirrorKind.FETCH, encode_body(Ack(3)))


def test_newer_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_body(MirrorKind.ACK, canonical_dumps({"v": 2, "size": 1}))


@pytest.mark.parametrize(
    ("kind", "raw", "match"),
    [
        (MirrorKind.ACK, {"v": 1, "size": -1}, "uint64"),
        (MirrorKind.ACK, {"v": 1, "size": True}, "uint64"),
        (MirrorKind.FETCH, {"v": 1, "start": 0, "limit": 0}, "limit"),
        (MirrorKind.FETCH, {"v": 1, "start": 0, "limit": MAX_BATCH_ENTRIES + 1}, "limit"),
        (MirrorKind.REFUSED, {"v": 1, "code": "nope", "why": ""}, "refusal code"),
        (MirrorKind.REFUSED, {"v": 1, "code": "quota", "why": "a\nb"}, "printable"),
        (MirrorKind.REFUSED, {"v": 1, "code": "quota", "why": "x" * 201}, "printable"),
        (MirrorKind.BATCH, {"v": 1, "start": 0, "e": [], "cp": b"x"}, "entries"),
        (MirrorKind.BATCH, {"v": 1, "start": 0, "e": [b""], "cp": b"x"}, "entry"),
        (MirrorKind.BATCH, {"v": 1, "start": 0, "e": [b"x" * 4097], "cp": b"x"}, "entry"),
        (MirrorKind.BATCH, {"v": 1, "start": 0, "e": [b"x"] * 129, "cp": b"x"}, "entries"),
        (MirrorKind.BATCH, {"v": 1, "start": 0, "e": [b"x"], "cp": "text"}, "checkpoint"),
    ],
)
def test_bad_fields_are_refused(kind: MirrorKind, raw: dict[str, object], match: str) -> None:
    with pytest.raises(MalformedFrame, match=match):
        decode_body(kind, canonical_dumps(raw))


def test_batch_checkpoint_must_cover_its_last_entry() -> None:
    good = batch(3)
    raw = cbor2.loads(encode_body(good))
    raw["e"] = raw["e"][:2]  # truncated: the checkpoint says 3
    with pytest.raises(MalformedFrame, match="cover exactly"):
        decode_body(MirrorKind.BATCH, canonical_dumps(raw))


def test_entries_past_what_is_held_are_refused() -> None:
    good = batch(3)
    raw = cbor2.loads(encode_body(Entries(0, good.entries, good.checkpoint, 3)))
    raw["held"] = 2
    with pytest.raises(MalformedFrame, match="past what the mirror"):
        decode_body(MirrorKind.ENTRIES, canonical_dumps(raw))


def test_tree_border_matches_the_root_of_every_size() -> None:
    entries = raw_entries(37)
    border = TreeBorder.empty()
    assert border.root() == EMPTY_ROOT
    for n in range(1, 38):
        grown, root = leaves_root(border, entries[n - 1 : n])
        assert root == root_from_leaves([leaf_hash(raw) for raw in entries[:n]])
        assert border.size == n - 1  # leaves_root extends a copy
        border = grown


def test_a_request_id_is_signed_in_the_body_and_bounded() -> None:
    sent = with_request(batch(), b"\x01" * 16)
    decoded = decode_body(MirrorKind.BATCH, encode_body(sent))
    assert decoded.request == b"\x01" * 16
    assert decode_body(MirrorKind.ACK, encode_body(Ack(3))).request is None
    for bad in (b"", b"short", b"x" * 33, "text"):
        raw = canonical_dumps({"v": 1, "size": 3, "rq": bad})
        with pytest.raises(MalformedFrame, match="request id"):
            decode_body(MirrorKind.ACK, raw)
