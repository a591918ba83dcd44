"""Fuzz the parsers of untrusted bytes: only documented exceptions may escape.

Targets: :func:`talos.core.wire.decode` (and :func:`~talos.core.wire.verify`
after it), :func:`talos.core.encoding.strict_loads` and
:meth:`talos.core.replay.ReplayWindow.from_bytes`. "Input rejected" means
:class:`MalformedFrame` or :class:`UnsupportedVersion`; anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from talos.core.agent_id import agent_id_from_digest
from talos.core.crypto import SigningKey, sha256
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.mirror import MirrorKind
from talos.core.presence import PresenceKind
from talos.core.replay import ReplayWindow
from talos.core.wire import (
    AckStatus,
    CosignStatus,
    Envelope,
    EnvelopeType,
    ErrorCode,
    decode,
    seal,
    verify,
)
from talos.errors import MalformedFrame, SignatureInvalid, UnsupportedVersion

REJECTED = (MalformedFrame, UnsupportedVersion)
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_SIZE = 1 << 16

KEY = SigningKey(bytes(range(32)))


def _sample(kind: EnvelopeType) -> Envelope:
    extra: dict[str, Any] = {
        EnvelopeType.MESSAGE: {"ratchet_header": b"h" * 40, "ciphertext": b"c" * 200},
        EnvelopeType.INITIAL: {
            "ratchet_header": b"h" * 40,
            "ciphertext": b"c" * 200,
            "capability_ref": b"p" * 32,
            "x3dh_header": b"x" * 100,
        },
        EnvelopeType.ACK: {"ref_ids": (b"r" * 16, b"s" * 16), "status": AckStatus.ACCEPTED},
        EnvelopeType.ERROR: {
            "ref_id": b"r" * 16,
            "error_code": ErrorCode.DECRYPT_FAILED,
            "reason": "unknown ratchet key",
            "ratchet_key": b"k" * 32,
        },
        EnvelopeType.REVOCATIONS: {"revocation_list": b"l" * 64},
        EnvelopeType.KEYLOG: {"key_log": b"k" * 200},
        EnvelopeType.CHECKPOINT: {
            "checkpoint_note": b"origin\n5\n" + b"r" * 44 + b"\n\n",
            "old_size": 3,
            "consistency": (b"a" * 32, b"b" * 32),
        },
        EnvelopeType.COSIGNATURE: {
            "tree_size": 5,
            "tree_root": b"r" * 32,
            "cosign_status": CosignStatus.CONFLICT,
            "held_size": 7,
            "held_root": b"h" * 32,
            "cosignature": None,
            "reason": "fork",
        },
        EnvelopeType.MIRROR: {"mirror_kind": MirrorKind.FETCH, "mirror_body": b"b" * 40},
        EnvelopeType.PRESENCE: {"presence_kind": PresenceKind.PROOF, "presence_body": b"p" * 40},
    }[kind]
    return Envelope(
        type=kind,
        message_id=b"m" * 16,
        sender=agent_id_from_digest(sha256(b"alice")),
        sender_instance=b"i" * 16,
        recipient=agent_id_from_digest(sha256(b"bob")),
        timestamp_ms=1_700_000_000_000,
        **extra,
    )


SEEDS = [seal(_sample(kind), KEY) for kind in EnvelopeType]


def _replay_seed() -> bytes:
    replay = ReplayWindow(window_ms=10_000)
    for n in range(4):
        replay.record(n.to_bytes(16, "big"), 1_000_000 + n, 1_000_010)
    return replay.to_bytes()


REPLAY_SEED = _replay_seed()


def _decode_and_verify(data: bytes) -> None:
    try:
        unverified = decode(data, max_size=MAX_SIZE)
    except REJECTED:
        return
    try:
        verify(unverified, KEY.public_key)
    except SignatureInvalid:
        return


def _strict_loads(data: bytes) -> None:
    try:
        value = strict_loads(data, max_size=MAX_SIZE)
    except REJECTED:
        return
    # Whatever is accepted is canonical: it re-encodes to exactly the input.
    assert canonical_dumps(value) == data


def _replay_from_bytes(data: bytes) -> None:
    try:
        ReplayWindow.from_bytes(data, max_size=MAX_SIZE)
    except REJECTED:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire": _decode_and_verify,
    "encoding": _strict_loads,
    "replay": _replay_from_bytes,
}


# -- mutations of valid inputs --------------------------------------------------------


#: CBOR initial bytes that start long lengths, indefinite items, tags, floats, breaks.
CBOR_HEADS = [0x00, 0x18, 0x1B, 0x1F, 0x5F, 0x9F, 0xBF, 0xC0, 0xF7, 0xF9, 0xFB, 0xFF]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid input with a few bit flips, byte changes, cuts, insertions or deletions."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from(CBOR_HEADS) | st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


ALL_SEEDS = [*SEEDS, REPLAY_SEED]


@FUZZ
@given(data=st.binary(max_size=512))
@example(data=b"")
@example(data=b"\xa0")
@example(data=b"\x9f\xff")
@example(data=b"\xc1\x00")
@example(data=b"\xbb" + b"\xff" * 8)
def test_arbitrary_bytes(data: bytes) -> None:
    for target in TARGETS.values():
        target(data)


@FUZZ
@given(data=mutated(SEEDS))
def test_mutated_envelopes(data: bytes) -> None:
    _decode_and_verify(data)
    _strict_loads(data)


@FUZZ
@given(data=mutated(ALL_SEEDS))
def test_mutated_inputs_into_every_parser(data: bytes) -> None:
    for target in TARGETS.values():
        target(data)


# -- structured CBOR-ish values --------------------------------------------------------

SCALARS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=True)
)
KEYS = st.sampled_from(["v", "t", "id", "from", "to", "ts", "sig", "floor", "ids"]) | st.text(
    max_size=4
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(KEYS | st.integers(0, 3) | st.binary(max_size=2), children, max_size=5)
    ),
    max_leaves=30,
)


def _raw_cbor(value: Any, tag: int | None) -> bytes:
    """Encode with cbor2 (any form, possibly non-canonical), optionally wrapped in a tag."""
    if tag is not None:
        value = cbor2.CBORTag(tag, value)
    try:
        return cbor2.dumps(value)
    except (ValueError, TypeError, cbor2.CBOREncodeError):
        return b""


@FUZZ
@given(
    value=VALUES,
    tag=st.none() | st.sampled_from([0, 1, 2, 3, 24, 25, 28, 29, 55799, 2**40]),
    canonical=st.booleans(),
)
def test_structured_values(value: Any, tag: int | None, canonical: bool) -> None:
    data = _raw_cbor(value, tag)
    if canonical and tag is None:
        try:
            data = cbor2.dumps(value, canonical=True)
        except (ValueError, TypeError, cbor2.CBOREncodeError):
            data = b""
    for target in TARGETS.values():
        target(data)


@settings(FUZZ, max_examples=300)
@given(
    fields=st.dictionaries(KEYS, VALUES, max_size=8),
    version=st.sampled_from([1, 1, 1, 2, 0, -1, "1", None]),
    kind=st.sampled_from([1, 2, 3, 4, 0, 5, "1", None]),
)
def test_envelope_shaped_maps(fields: dict[str, Any], version: Any, kind: Any) -> None:
    """Maps with the right header and arbitrary fields exercise the field table."""
    try:
        data = canonical_dumps({**fields, "v": version, "t": kind})
    except MalformedFrame:
        return
    _decode_and_verify(data)


@FUZZ
@given(seed=st.sampled_from(SEEDS), key=KEYS, value=VALUES)
def test_one_field_replaced(seed: bytes, key: str, value: Any) -> None:
    """Valid envelopes with one field replaced by an arbitrary value."""
    raw = dict(cbor2.loads(seed))
    raw[key] = value
    try:
        data = canonical_dumps(raw)
    except MalformedFrame:
        return
    _decode_and_verify(data)


@FUZZ
@given(
    depth=st.integers(0, 40),
    opener=st.sampled_from([b"\x81", b"\xa1\x61a", b"\x82\x00", b"\xc1"]),
    leaf=st.sampled_from([b"\x00", b"\x80", b"\xa0", b"\x1b" + b"\xff" * 8, b"\x3b" + b"\xff" * 8]),
)
def test_deep_nesting_and_huge_integers(depth: int, opener: bytes, leaf: bytes) -> None:
    data = opener * depth + leaf
    for target in TARGETS.values():
        target(data)


@FUZZ
@given(header=st.integers(0, 255), length=st.binary(min_size=0, max_size=8))
def test_huge_claimed_lengths(header: int, length: bytes) -> None:
    for target in TARGETS.values():
        target(bytes([header]) + length + b"\x00\x00")


# -- encoder and decoder agree on the limits -----------------------------------


def test_canonical_dumps_and_strict_loads_agree_on_depth() -> None:
    value: list[Any] = []
    for _ in range(15):
        value = [value]  # 16 nested containers: the limit
    assert strict_loads(canonical_dumps(value), max_size=MAX_SIZE) == value
    with pytest.raises(MalformedFrame, match="nesting"):
        canonical_dumps([value])


def test_canonical_dumps_rejects_lone_surrogates_as_documented() -> None:
    with pytest.raises(MalformedFrame):
        canonical_dumps({"why": "\ud800"})
