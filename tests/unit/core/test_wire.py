"""Envelope encoding, decoding and signatures (talos.core.wire)."""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest

from talos.core.agent_id import agent_id_from_digest
from talos.core.crypto import SigningKey, sha256
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.mirror import MirrorKind
from talos.core.presence import PresenceKind
from talos.core.wire import (
    DOMAIN_PREFIX,
    FIELDS,
    MAX_ACK_REFS,
    MAX_FRAME_SIZE,
    MAX_REASON_LENGTH,
    MAX_TIMESTAMP_MS,
    AckStatus,
    CosignStatus,
    Envelope,
    EnvelopeType,
    ErrorCode,
    UnverifiedEnvelope,
    decode,
    new_instance_id,
    new_message_id,
    seal,
    verify,
)
from talos.errors import (
    LocalProtocolError,
    MalformedFrame,
    RemoteProtocolError,
    SignatureInvalid,
    UnsupportedVersion,
)
from talos.testing import SeededRng

ALICE = agent_id_from_digest(sha256(b"alice"))
BOB = agent_id_from_digest(sha256(b"bob"))
KEY = SigningKey(bytes(range(32)))
OTHER_KEY = SigningKey(bytes(32))
NOW_MS = 1_700_000_000_000


def sample(kind: EnvelopeType, rng: SeededRng | None = None) -> Envelope:
    """A valid envelope of every type, with a 200-byte ciphertext for content types."""
    rng = rng or SeededRng(7)
    common: dict[str, Any] = {
        "type": kind,
        "message_id": new_message_id(rng),
        "sender": ALICE,
        "sender_instance": new_instance_id(rng),
        "recipient": BOB,
        "timestamp_ms": NOW_MS,
    }
    if kind is EnvelopeType.MESSAGE:
        return Envelope(**common, ratchet_header=rng.bytes(40), ciphertext=rng.bytes(200))
    if kind is EnvelopeType.INITIAL:
        return Envelope(
            **common,
            ratchet_header=rng.bytes(40),
            ciphertext=rng.bytes(200),
            capability_ref=rng.bytes(32),
            x3dh_header=rng.bytes(100),
        )
    if kind is EnvelopeType.ACK:
        return Envelope(
            **common, ref_ids=(rng.bytes(16), rng.bytes(16)), status=AckStatus.DUPLICATE
        )
    if kind is EnvelopeType.REVOCATIONS:
        return Envelope(**common, revocation_list=rng.bytes(120))
    if kind is EnvelopeType.KEYLOG:
        return Envelope(**common, key_log=rng.bytes(300))
    if kind is EnvelopeType.CHECKPOINT:
        return Envelope(
            **common,
            checkpoint_note=rng.bytes(120),
            old_size=2,
            consistency=(rng.bytes(32), rng.bytes(32)),
        )
    if kind is EnvelopeType.COSIGNATURE:
        return Envelope(
            **common,
            tree_size=9,
            tree_root=rng.bytes(32),
            cosign_status=CosignStatus.COSIGNED,
            held_size=9,
            held_root=None,
            cosignature=rng.bytes(120),
            reason="",
        )
    if kind is EnvelopeType.MIRROR:
        return Envelope(**common, mirror_kind=MirrorKind.ACK, mirror_body=rng.bytes(30))
    if kind is EnvelopeType.PRESENCE:
        return Envelope(**common, presence_kind=PresenceKind.CHALLENGE, presence_body=rng.bytes(40))
    return Envelope(
        **common,
        ref_id=rng.bytes(16),
        error_code=ErrorCode.DECRYPT_FAILED,
        reason="cannot decrypt: unknown ratchet key",
        ratchet_key=rng.bytes(32),
    )


def frame_map(kind: EnvelopeType) -> dict[str, Any]:
    return dict(cbor2.loads(seal(sample(kind), KEY)))


def resign(body: dict[str, Any], key: SigningKey = KEY) -> bytes:
    """Encode a hand-made map with a valid signature, to test structure checks alone."""
    body = {k: v for k, v in body.items() if k != "sig"}
    return canonical_dumps({**body, "sig": key.sign(DOMAIN_PREFIX + canonical_dumps(body))})


ALL_TYPES = list(EnvelopeType)


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_round_trip_every_type(kind: EnvelopeType) -> None:
    envelope = sample(kind)
    frame = seal(envelope, KEY)
    unverified = decode(frame)
    assert isinstance(unverified, UnverifiedEnvelope)
    assert verify(unverified, KEY.public_key) == envelope


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_encoding_is_deterministic_and_canonical(kind: EnvelopeType) -> None:
    frame = seal(sample(kind), KEY)
    assert seal(verify(decode(frame), KEY.public_key), KEY) == frame
    assert canonical_dumps(strict_loads(frame, max_size=MAX_FRAME_SIZE)) == frame


def test_unverified_envelope_exposes_routing_fields_only() -> None:
    envelope = sample(EnvelopeType.MESSAGE)
    unverified = decode(seal(envelope, KEY))
    assert unverified.type is EnvelopeType.MESSAGE
    assert unverified.sender == ALICE
    assert unverified.recipient == BOB
    assert unverified.message_id == envelope.message_id
    assert unverified.sender_instance == envelope.sender_instance
    assert unverified.timestamp_ms == NOW_MS
    assert len(unverified.signature) == 64
    assert not hasattr(unverified, "ciphertext")


def test_decoded_enums_are_enum_members() -> None:
    ack = verify(decode(seal(sample(EnvelopeType.ACK), KEY)), KEY.public_key)
    assert ack.status is AckStatus.DUPLICATE
    err = verify(decode(seal(sample(EnvelopeType.ERROR), KEY)), KEY.public_key)
    assert err.error_code is ErrorCode.DECRYPT_FAILED


def test_error_without_optional_fields() -> None:
    envelope = dataclasses.replace(sample(EnvelopeType.ERROR), ref_id=None, ratchet_key=None)
    assert verify(decode(seal(envelope, KEY)), KEY.public_key) == envelope


def test_fresh_ids_come_from_the_rng() -> None:
    assert new_message_id(SeededRng(1)) == new_message_id(SeededRng(1))
    assert new_message_id(SeededRng(1)) != new_message_id(SeededRng(2))
    assert len(new_message_id(SeededRng(1))) == 16
    assert len(new_instance_id(SeededRng(1))) == 16


def test_signature_is_domain_separated() -> None:
    raw = frame_map(EnvelopeType.MESSAGE)
    signature = raw.pop("sig")
    KEY.public_key.verify(signature, DOMAIN_PREFIX + canonical_dumps(raw))
    with pytest.raises(SignatureInvalid):
        KEY.public_key.verify(signature, canonical_dumps(raw))


# -- signatures ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_wrong_key_is_rejected(kind: EnvelopeType) -> None:
    unverified = decode(seal(sample(kind), KEY))
    with pytest.raises(SignatureInvalid):
        verify(unverified, OTHER_KEY.public_key)


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_every_flipped_bit_is_detected(kind: EnvelopeType) -> None:
    frame = seal(sample(kind), KEY)
    for index in range(len(frame)):
        for bit in (0x01, 0x80):
            tampered = bytearray(frame)
            tampered[index] ^= bit
            with pytest.raises((SignatureInvalid, MalformedFrame, UnsupportedVersion)):
                verify(decode(bytes(tampered)), KEY.public_key)


def test_changed_field_with_old_signature_is_rejected() -> None:
    raw = frame_map(EnvelopeType.MESSAGE)
    raw["to"] = ALICE
    with pytest.raises(SignatureInvalid):
        verify(decode(canonical_dumps(raw)), KEY.public_key)


def test_truncated_and_extended_frames_are_malformed() -> None:
    frame = seal(sample(EnvelopeType.MESSAGE), KEY)
    for cut in range(len(frame)):
        with pytest.raises(MalformedFrame):
            decode(frame[:cut])
    with pytest.raises(MalformedFrame):
        decode(frame + b"\x00")


# -- exact field sets ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_every_missing_field_is_malformed(kind: EnvelopeType) -> None:
    raw = frame_map(kind)
    for key in raw.keys() - {"v"}:
        body = {k: v for k, v in raw.items() if k != key}
        with pytest.raises(MalformedFrame):
            decode(canonical_dumps(body))


EXTRA_FIELDS = [
    (kind, extra)
    for kind in EnvelopeType
    for extra in ("x", "x3dh", "ref", "st", "code", "why", "rk")
    if extra not in {f.key for f in FIELDS[kind]}
]


@pytest.mark.parametrize(("kind", "extra"), EXTRA_FIELDS)
def test_extra_field_is_malformed(kind: EnvelopeType, extra: str) -> None:
    raw = frame_map(kind)
    raw[extra] = b"\x00" * 16
    with pytest.raises(MalformedFrame, match="unexpected"):
        decode(resign(raw))


def test_field_table_is_exact_per_type() -> None:
    keys = {kind: {f.key for f in row} for kind, row in FIELDS.items()}
    assert keys[EnvelopeType.INITIAL] - keys[EnvelopeType.MESSAGE] == {"x3dh"}
    assert {"refs", "st"} <= keys[EnvelopeType.ACK]
    assert "ref" not in keys[EnvelopeType.ACK]
    assert {"ref", "code", "why", "rk"} <= keys[EnvelopeType.ERROR]
    for kind in ALL_TYPES:
        assert set(frame_map(kind)) == keys[kind] | {"v", "t", "sig"}


WRONG_VALUES: list[tuple[EnvelopeType, str, Any]] = [
    (EnvelopeType.MESSAGE, "id", b"\x00" * 15),
    (EnvelopeType.MESSAGE, "id", b"\x00" * 17),
    (EnvelopeType.MESSAGE, "id", "0" * 16),
    (EnvelopeType.MESSAGE, "inst", b"\x00" * 8),
    (EnvelopeType.MESSAGE, "inst", None),
    (EnvelopeType.MESSAGE, "from", "did:talos:zNOPE"),
    (EnvelopeType.MESSAGE, "from", ALICE.encode()),
    (EnvelopeType.MESSAGE, "to", "did:talos:z" + "1" * 1000),
    (EnvelopeType.MESSAGE, "ts", -1),
    (EnvelopeType.MESSAGE, "ts", MAX_TIMESTAMP_MS + 1),
    (EnvelopeType.MESSAGE, "ts", True),
    (EnvelopeType.MESSAGE, "ts", "now"),
    (EnvelopeType.MESSAGE, "rh", b""),
    (EnvelopeType.MESSAGE, "rh", b"\x00" * 1025),
    (EnvelopeType.MESSAGE, "ct", b""),
    (EnvelopeType.MESSAGE, "ct", "text"),
    (EnvelopeType.MESSAGE, "cap", b""),
    (EnvelopeType.MESSAGE, "cap", 5),
    (EnvelopeType.MESSAGE, "t", 99),
    (EnvelopeType.MESSAGE, "t", "message"),
    (EnvelopeType.MESSAGE, "t", False),
    (EnvelopeType.INITIAL, "x3dh", b""),
    (EnvelopeType.INITIAL, "x3dh", None),
    (EnvelopeType.ACK, "refs", None),
    (EnvelopeType.ACK, "refs", []),
    (EnvelopeType.ACK, "refs", b"\x00" * 16),
    (EnvelopeType.ACK, "refs", [b"\x00" * 32]),
    (EnvelopeType.ACK, "refs", [b"\x00" * 16, b"\x00" * 16]),
    (EnvelopeType.ACK, "refs", [b"\x00" * 16, "0" * 16]),
    (EnvelopeType.ACK, "refs", [bytes([i % 256, i // 256]) * 8 for i in range(257)]),
    (EnvelopeType.ACK, "st", 7),
    (EnvelopeType.ACK, "st", -1),
    (EnvelopeType.ACK, "ct", b"\x00"),
    (EnvelopeType.ACK, "rh", b"\x00"),
    (EnvelopeType.ACK, "cap", b"\x00" * 32),
    (EnvelopeType.ERROR, "code", 0),
    (EnvelopeType.ERROR, "why", "x" * (MAX_REASON_LENGTH + 1)),
    (EnvelopeType.ERROR, "why", "\x1b[2Jcleared"),
    (EnvelopeType.ERROR, "why", b"bytes"),
    (EnvelopeType.ERROR, "rk", b"\x00" * 31),
    (EnvelopeType.ERROR, "ref", b""),
]


@pytest.mark.parametrize(("kind", "key", "value"), WRONG_VALUES)
def test_wrong_type_or_size_is_malformed(kind: EnvelopeType, key: str, value: Any) -> None:
    raw = frame_map(kind)
    raw[key] = value
    with pytest.raises(MalformedFrame):
        decode(resign(raw))


@pytest.mark.parametrize("value", [b"\x00" * 63, b"\x00" * 65, None, "sig"])
def test_bad_signature_field_is_malformed(value: Any) -> None:
    raw = frame_map(EnvelopeType.MESSAGE)
    raw["sig"] = value
    with pytest.raises(MalformedFrame):
        decode(canonical_dumps(raw))


@pytest.mark.parametrize("value", [[1, 2], {"v": 3}, b"\xa0", "text", 1, None])
def test_non_map_frames_are_malformed(value: Any) -> None:
    with pytest.raises(MalformedFrame):
        decode(canonical_dumps(value))


# -- versions, sizes, canonical form ------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 2, 4, 255, 2**32])
def test_unknown_version_is_unsupported(version: int) -> None:
    raw = frame_map(EnvelopeType.MESSAGE)
    raw["v"] = version
    with pytest.raises(UnsupportedVersion):
        decode(canonical_dumps(raw))


def test_unknown_version_wins_over_unknown_fields() -> None:
    with pytest.raises(UnsupportedVersion):
        decode(canonical_dumps({"v": 4, "future": b"anything"}))


@pytest.mark.parametrize("version", [None, "1", True, b"\x01"])
def test_non_integer_version_is_malformed(version: Any) -> None:
    raw = frame_map(EnvelopeType.MESSAGE)
    raw["v"] = version
    with pytest.raises(MalformedFrame):
        decode(canonical_dumps(raw))


def test_oversized_frame_is_rejected_before_parsing() -> None:
    envelope = dataclasses.replace(sample(EnvelopeType.MESSAGE), ciphertext=b"\x00" * 2000)
    frame = seal(envelope, KEY)
    with pytest.raises(MalformedFrame, match="exceeds"):
        decode(frame, max_size=len(frame) - 1)
    assert decode(frame, max_size=len(frame)).message_id == envelope.message_id
    with pytest.raises(MalformedFrame, match="exceeds"):
        decode(b"\x00" * (MAX_FRAME_SIZE + 1))


def test_non_canonical_encodings_are_malformed() -> None:
    raw = frame_map(EnvelopeType.MESSAGE)
    # Unsorted keys.
    unsorted = cbor2.dumps(dict(sorted(raw.items(), reverse=True)))
    assert unsorted != canonical_dumps(raw)
    with pytest.raises(MalformedFrame):
        decode(unsorted)
    # Non-shortest integer: the version written as a two-byte integer.
    canonical = canonical_dumps(raw)
    long_version = canonical.replace(b"\x61v\x03", b"\x61v\x18\x03", 1)
    assert long_version != canonical
    with pytest.raises(MalformedFrame):
        decode(long_version)
    # Indefinite-length map.
    with pytest.raises(MalformedFrame):
        decode(b"\xbf" + canonical[1:] + b"\xff")


def test_duplicate_keys_are_malformed() -> None:
    canonical = canonical_dumps(frame_map(EnvelopeType.ACK))
    count = canonical[0] & 0x1F
    duplicated = bytes([0xA0 | (count + 1)]) + canonical[1:] + b"\x61v\x03"
    with pytest.raises(MalformedFrame):
        decode(duplicated)


def test_tags_are_malformed() -> None:
    raw = frame_map(EnvelopeType.MESSAGE)
    raw["ts"] = cbor2.CBORTag(1, NOW_MS)
    with pytest.raises(MalformedFrame):
        decode(cbor2.dumps(raw, canonical=True))


def test_errors_are_remote_protocol_errors() -> None:
    assert issubclass(MalformedFrame, RemoteProtocolError)
    assert issubclass(UnsupportedVersion, RemoteProtocolError)


# -- sealing validates like decoding ---------------------------------------------------


BAD_LOCAL: list[tuple[EnvelopeType, dict[str, Any]]] = [
    (EnvelopeType.MESSAGE, {"message_id": b"short"}),
    (EnvelopeType.MESSAGE, {"sender": "alice"}),
    (EnvelopeType.MESSAGE, {"timestamp_ms": -5}),
    (EnvelopeType.MESSAGE, {"x3dh_header": b"\x00" * 10}),
    (EnvelopeType.MESSAGE, {"status": AckStatus.ACCEPTED}),
    (EnvelopeType.MESSAGE, {"ciphertext": bytearray(b"\x00")}),
    (EnvelopeType.INITIAL, {"x3dh_header": None}),
    (EnvelopeType.ACK, {"status": None}),
    (EnvelopeType.ACK, {"status": 9}),
    (EnvelopeType.ACK, {"ciphertext": b"\x00"}),
    (EnvelopeType.ACK, {"reason": "not for acks"}),
    (EnvelopeType.ACK, {"ref_ids": ()}),
    (EnvelopeType.ACK, {"ref_ids": (b"r" * 16, b"r" * 16)}),
    (EnvelopeType.ACK, {"ref_ids": (b"short",)}),
    (EnvelopeType.ACK, {"ref_ids": tuple(bytes([i % 256, i // 256]) * 8 for i in range(257))}),
    (EnvelopeType.ACK, {"ref_id": b"r" * 16}),
    (EnvelopeType.ERROR, {"reason": "\ud800"}),
    (EnvelopeType.ERROR, {"error_code": None}),
]


@pytest.mark.parametrize(("kind", "changes"), BAD_LOCAL)
def test_seal_rejects_invalid_envelopes(kind: EnvelopeType, changes: dict[str, Any]) -> None:
    envelope = dataclasses.replace(sample(kind), **changes)
    with pytest.raises(LocalProtocolError):
        seal(envelope, KEY)


def test_seal_rejects_unknown_type() -> None:
    envelope = dataclasses.replace(sample(EnvelopeType.MESSAGE), type=7)
    with pytest.raises(LocalProtocolError):
        seal(envelope, KEY)


def test_seal_rejects_oversized_envelopes() -> None:
    envelope = dataclasses.replace(sample(EnvelopeType.MESSAGE), ciphertext=b"\x00" * 1000)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        seal(envelope, KEY, max_size=500)


def test_one_ack_names_up_to_max_ack_refs_ids() -> None:
    ids = tuple(bytes([i % 256, i // 256]) * 8 for i in range(MAX_ACK_REFS))
    envelope = dataclasses.replace(sample(EnvelopeType.ACK), ref_ids=ids)
    decoded = verify(decode(seal(envelope, KEY)), KEY.public_key)
    assert decoded.ref_ids == ids
    assert decoded == envelope


# -- KEYLOG (key rotation, docs/design/key-rotation-peers.md) -------------------------


def test_keylog_envelope_exposes_its_key_log_before_verification() -> None:
    envelope = sample(EnvelopeType.KEYLOG)
    unverified = decode(seal(envelope, KEY))
    assert unverified.attached_key_log == envelope.key_log
    assert decode(seal(sample(EnvelopeType.MESSAGE), KEY)).attached_key_log is None


def test_keylog_envelope_is_size_capped() -> None:
    from talos.core.wire import MAX_KEY_LOG_SIZE

    body = frame_map(EnvelopeType.KEYLOG)
    body["kl"] = b"k" * (MAX_KEY_LOG_SIZE + 1)
    with pytest.raises(MalformedFrame, match="key log"):
        decode(resign(body))
    with pytest.raises(LocalProtocolError):
        seal(dataclasses.replace(sample(EnvelopeType.KEYLOG), key_log=b""), KEY)


@pytest.mark.parametrize("mutation", ["missing", "extra", "wrong type", "content"])
def test_keylog_envelope_is_decoded_strictly(mutation: str) -> None:
    body = frame_map(EnvelopeType.KEYLOG)
    if mutation == "missing":
        del body["kl"]
    elif mutation == "extra":
        body["rl"] = b"l" * 10
    elif mutation == "wrong type":
        body["kl"] = "text"
    else:
        body["ct"] = b"c"
    with pytest.raises(MalformedFrame):
        decode(resign(body))


def test_a_key_log_is_not_allowed_in_other_envelopes() -> None:
    with pytest.raises(LocalProtocolError, match="key_log"):
        seal(dataclasses.replace(sample(EnvelopeType.REVOCATIONS), key_log=b"k"), KEY)


def test_an_older_build_refuses_a_keylog_envelope_as_an_unknown_type() -> None:
    """What a peer without KEYLOG sees: a MalformedFrame (one unit of the link's
    malformed-frame budget), not a crash or a session reset."""
    body = frame_map(EnvelopeType.KEYLOG)
    body["t"] = 99
    with pytest.raises(MalformedFrame, match="unknown EnvelopeType"):
        decode(resign(body))


# -- CHECKPOINT and COSIGNATURE (witnesses, docs/design/witnesses.md) ----------------


@pytest.mark.parametrize(
    ("kind", "key", "value", "message"),
    [
        (EnvelopeType.CHECKPOINT, "cp", b"", "checkpoint must be"),
        (EnvelopeType.CHECKPOINT, "cp", b"n" * (16 * 1024 + 1), "checkpoint must be"),
        (EnvelopeType.CHECKPOINT, "old", -1, "old tree size"),
        (EnvelopeType.CHECKPOINT, "old", 2**64, "64-bit range"),
        (EnvelopeType.CHECKPOINT, "old", "3", "old tree size"),
        (EnvelopeType.CHECKPOINT, "proof", [b"x" * 31], "32-byte strings"),
        (EnvelopeType.CHECKPOINT, "proof", [b"x" * 32] * 129, "at most 128"),
        (EnvelopeType.CHECKPOINT, "proof", {"a": 1}, "must be an array"),
        (EnvelopeType.COSIGNATURE, "size", -5, "tree size"),
        (EnvelopeType.COSIGNATURE, "root", b"r" * 33, "tree root"),
        (EnvelopeType.COSIGNATURE, "st", 9, "unknown CosignStatus"),
        (EnvelopeType.COSIGNATURE, "held", 2**64, "64-bit range"),
        (EnvelopeType.COSIGNATURE, "hroot", b"", "held tree root"),
        (EnvelopeType.COSIGNATURE, "cs", b"c" * 513, "cosignature must be"),
        (EnvelopeType.COSIGNATURE, "why", "a\nb", "printable"),
    ],
)
def test_witness_envelopes_refuse_out_of_bounds_fields(
    kind: EnvelopeType, key: str, value: Any, message: str
) -> None:
    body = frame_map(kind)
    body[key] = value
    with pytest.raises(MalformedFrame, match=message):
        decode(resign(body))


def test_a_checkpoint_envelope_may_carry_no_proof() -> None:
    envelope = dataclasses.replace(sample(EnvelopeType.CHECKPOINT), old_size=0, consistency=())
    assert verify(decode(seal(envelope, KEY)), KEY.public_key) == envelope


def test_witness_fields_are_refused_on_other_types() -> None:
    envelope = dataclasses.replace(sample(EnvelopeType.ACK), old_size=3)
    with pytest.raises(LocalProtocolError, match="old_size is not allowed"):
        seal(envelope, KEY)
