"""The envelope: the one frame two agents exchange (ARCHITECTURE §3).

Rules (the invariants encoder and decoder both enforce):

1. A frame is one canonical CBOR map (:mod:`talos.core.encoding`) with short
   text keys, at most ``max_size`` bytes (:data:`MAX_FRAME_SIZE` by default).
2. Key ``"v"`` is the format version. Only :data:`WIRE_VERSION` is accepted;
   any other integer raises :class:`~talos.errors.UnsupportedVersion`.
3. Key ``"t"`` is the :class:`EnvelopeType`. Each type has an EXACT field
   set, given as data in :data:`FIELDS`; a missing or extra key, a wrong
   CBOR type or a wrong size raises :class:`~talos.errors.MalformedFrame`.
4. ``"sig"`` is an Ed25519 signature over :data:`DOMAIN_PREFIX` followed by
   the canonical CBOR of every other field of the frame.
5. :func:`decode` checks structure only and returns an
   :class:`UnverifiedEnvelope`, which exposes just the routing fields needed
   to find the sender's key. Only :func:`verify` turns it into an
   :class:`Envelope`, so code holding an ``Envelope`` that came off the wire
   holds one whose signature verified.

Sending is :func:`seal` (validate, encode, sign); receiving is :func:`decode`
then :func:`verify`. To add a type: add an :class:`EnvelopeType` member, its
row in :data:`FIELDS`, and (if it carries something new) an optional
attribute on :class:`Envelope`.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, TypeVar

from talos.core.agent_id import check_agent_id
from talos.core.crypto import KEY_SIZE, SIGNATURE_SIZE, SigningKey, VerifyKey
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.mirror import MAX_BODY_SIZE as MAX_MIRROR_BODY_SIZE
from talos.core.mirror import MirrorKind
from talos.core.presence import MAX_BODY_SIZE as MAX_PRESENCE_BODY_SIZE
from talos.core.presence import PresenceKind
from talos.core.rng import Rng
from talos.errors import LocalProtocolError, MalformedFrame, UnsupportedVersion

__all__ = [
    "DOMAIN_PREFIX",
    "FIELDS",
    "MAX_ACK_REFS",
    "MAX_CHECKPOINT_NOTE_SIZE",
    "MAX_CONSISTENCY_HASHES",
    "MAX_COSIGNATURE_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_KEY_LOG_SIZE",
    "MAX_REASON_LENGTH",
    "MAX_TIMESTAMP_MS",
    "MESSAGE_ID_SIZE",
    "WIRE_VERSION",
    "AckStatus",
    "CosignStatus",
    "Envelope",
    "EnvelopeType",
    "ErrorCode",
    "Field",
    "UnverifiedEnvelope",
    "decode",
    "new_instance_id",
    "new_message_id",
    "seal",
    "verify",
]

#: 2: an ACK names a list of ids (``refs``) instead of one (``ref``). Version 1
#: peers and version 2 peers refuse each other's frames as unsupported.
#: 3: the encrypted payload of a MESSAGE or INITIAL may be a request or a reply
#: (payload version 2, :mod:`talos.core.message`; docs/design/request-reply.md).
#: The fields are unchanged; the bump keeps a version 2 peer, which would answer
#: such a payload DECRYPT_FAILED and reset the session, from ever getting one.
WIRE_VERSION: Final = 3
#: Domain separation: an envelope signature can never be mistaken for a
#: signature over any other Talos object (key events, capabilities, ...).
DOMAIN_PREFIX: Final = b"talos/envelope/v1\x00"
#: Default bound on a whole frame, checked before any parsing.
MAX_FRAME_SIZE: Final = 1 << 20
MESSAGE_ID_SIZE: Final = 16
INSTANCE_ID_SIZE: Final = 16
#: Timestamps are milliseconds since the Unix epoch and must fit a signed 64-bit integer.
MAX_TIMESTAMP_MS: Final = 2**63 - 1
#: Bounds on the opaque byte fields (the ciphertext is bounded by the frame size).
MAX_RATCHET_HEADER_SIZE: Final = 1024
MAX_X3DH_HEADER_SIZE: Final = 4096
MAX_CAPABILITY_REF_SIZE: Final = 16 * 1024
MAX_REVOCATION_LIST_SIZE: Final = 512 * 1024
#: Bound on a key event log offered in a KEYLOG envelope (a few hundred rotations).
MAX_KEY_LOG_SIZE: Final = 256 * 1024
#: Longest error reason, in characters (printable text only).
MAX_REASON_LENGTH: Final = 200
#: Bounds of the witness envelopes: a checkpoint note, a consistency proof, a cosignature.
MAX_CHECKPOINT_NOTE_SIZE: Final = 16 * 1024
MAX_CONSISTENCY_HASHES: Final = 128
MAX_COSIGNATURE_SIZE: Final = 512
_HASH_SIZE: Final = 32
#: Most message ids one ACK may acknowledge (a receiver acknowledges a whole
#: committed batch with one signature).
MAX_ACK_REFS: Final = 256


class EnvelopeType(enum.IntEnum):
    """What an envelope carries; encoded as a small integer under key ``"t"``."""

    MESSAGE = 1  #: a Double Ratchet message
    INITIAL = 2  #: the first message of a session: also carries the X3DH initial header
    ACK = 3  #: acknowledges one or more message ids with one :class:`AckStatus`
    ERROR = 4  #: a signed error report (e.g. DECRYPT_FAILED) about one message
    REVOCATIONS = 5  #: the sender's own signed revocation list, sent on every connection
    #: the sender's own key event log, pushed after a rotation and offered on every
    #: connection (docs/design/key-rotation-peers.md); signed by the log's current key
    KEYLOG = 6
    #: the sender's newest signed audit checkpoint and a consistency proof, for a
    #: witness to cosign (docs/design/witnesses.md)
    CHECKPOINT = 7
    #: a witness's answer to a CHECKPOINT: a cosignature, a conflict or a refusal
    COSIGNATURE = 8
    #: audit mirroring (docs/design/mirrors.md): one type, its sub-kind in ``"mk"``
    #: (:class:`~talos.core.mirror.MirrorKind`), its body in ``"mb"``
    MIRROR = 9
    #: split-brain checks (``talos diagnose --check-duplicates``): a challenge to an
    #: instance of the identity and its signed proof; sub-kind in ``"pk"``
    #: (:class:`~talos.core.presence.PresenceKind`), body in ``"pb"``
    PRESENCE = 11


class AckStatus(enum.IntEnum):
    """How the recipient disposed of an acknowledged message."""

    ACCEPTED = 0  #: decrypted, authorized and stored durably
    DUPLICATE = 1  #: already received earlier; this copy was dropped


class CosignStatus(enum.IntEnum):
    """How a witness answered a CHECKPOINT (carried by COSIGNATURE envelopes)."""

    COSIGNED = 0  #: accepted and cosigned: ``cosignature`` is set
    CONFLICT = 1  #: not consistent with the head the witness holds (``held_size``, ``held_root``)
    REFUSED = 2  #: not judged: malformed, badly signed, rate-limited (``reason`` says)


class ErrorCode(enum.IntEnum):
    """Why a recipient could not accept a message (carried by ERROR envelopes)."""

    DECRYPT_FAILED = 1  #: ratchet state diverged; may name the failing ratchet key
    REJECTED = 2  #: refused by the recipient's policy; not to be retried
    CAPABILITY_DENIED = 3  #: the capability reference did not authorize the message
    STALE = 4  #: timestamp outside the replay window or clock-skew tolerance
    UNSUPPORTED = 5  #: a type or feature the recipient does not implement
    UNAVAILABLE = 6  #: the recipient cannot decide now (e.g. a stale revocation list); retry


@dataclass(frozen=True, slots=True)
class Envelope:
    """The fields of one envelope, without the signature.

    Built by a sender and passed to :func:`seal`, or returned by :func:`verify`
    after a received frame's signature checked out. The type-specific
    attributes are ``None`` unless :data:`FIELDS` lists them for ``type``.
    Values are validated by :func:`seal` (and by :func:`decode` on receipt),
    not at construction.
    """

    type: EnvelopeType
    message_id: bytes
    sender: str
    sender_instance: bytes
    recipient: str
    timestamp_ms: int
    ratchet_header: bytes = b""
    ciphertext: bytes = b""
    capability_ref: bytes | None = None
    #: INITIAL: the X3DH initial header, opaque to this module.
    x3dh_header: bytes | None = None
    #: ERROR only: the id of the failing message, if any.
    ref_id: bytes | None = None
    #: ACK only: the ids acknowledged (1 to :data:`MAX_ACK_REFS`, distinct).
    ref_ids: tuple[bytes, ...] | None = None
    #: ACK only.
    status: AckStatus | None = None
    #: ERROR only.
    error_code: ErrorCode | None = None
    #: ERROR only: short printable text for operators; never secrets.
    reason: str | None = None
    #: ERROR only, optional: the ratchet public key the recipient failed on.
    ratchet_key: bytes | None = None
    #: REVOCATIONS only: the sender's signed revocation list (opaque here).
    revocation_list: bytes | None = None
    #: KEYLOG only: the sender's serialized key event log (opaque here).
    key_log: bytes | None = None
    #: CHECKPOINT only: the signed-note checkpoint text (parsed by the witness).
    checkpoint_note: bytes | None = None
    #: CHECKPOINT only: the tree size the consistency proof starts from.
    old_size: int | None = None
    #: CHECKPOINT only: the RFC 9162 consistency proof from ``old_size``.
    consistency: tuple[bytes, ...] | None = None
    #: COSIGNATURE only: the tree size and root of the checkpoint answered.
    tree_size: int | None = None
    tree_root: bytes | None = None
    #: COSIGNATURE only.
    cosign_status: CosignStatus | None = None
    #: COSIGNATURE only: the size and root of the newest head the witness holds.
    held_size: int | None = None
    held_root: bytes | None = None
    #: COSIGNATURE only: the encoded cosignature (COSIGNED answers).
    cosignature: bytes | None = None
    #: MIRROR only: the sub-kind and its body (decoded by :mod:`talos.core.mirror`).
    mirror_kind: MirrorKind | None = None
    mirror_body: bytes | None = None
    #: PRESENCE only: the sub-kind and its body (decoded by :mod:`talos.core.presence`).
    presence_kind: PresenceKind | None = None
    presence_body: bytes | None = None


@dataclass(frozen=True, slots=True)
class UnverifiedEnvelope:
    """A well-formed envelope whose signature has NOT been checked yet.

    Exposes only what a receiver needs to find the sender's key and route the
    frame; the content is reachable only through :func:`verify`.
    """

    _envelope: Envelope
    signature: bytes

    @property
    def type(self) -> EnvelopeType:
        return self._envelope.type

    @property
    def message_id(self) -> bytes:
        return self._envelope.message_id

    @property
    def sender(self) -> str:
        """The *claimed* sender: look its key up, then call :func:`verify`."""
        return self._envelope.sender

    @property
    def sender_instance(self) -> bytes:
        return self._envelope.sender_instance

    @property
    def recipient(self) -> str:
        return self._envelope.recipient

    @property
    def timestamp_ms(self) -> int:
        return self._envelope.timestamp_ms

    @property
    def attached_key_log(self) -> bytes | None:
        """KEYLOG only: the key log the frame carries, before its signature is checked.

        A key log is self-certifying (it verifies from its inception, and a
        receiver only accepts it as an extension of the log it holds), so it
        may be read first: it tells which key the frame must verify under.
        """
        return self._envelope.key_log


# -- field table ----------------------------------------------------------------


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Field:
    """One map entry of a frame: its key, its :class:`Envelope` attribute, its checks.

    ``parse`` turns a decoded CBOR value into the attribute value or raises
    :class:`~talos.errors.MalformedFrame`; ``dump`` does the reverse.
    """

    key: str
    attr: str
    parse: Callable[[Any], Any]
    dump: Callable[[Any], Any] = _identity


def _byte_string(name: str, *, min_size: int, max_size: int) -> Callable[[Any], bytes]:
    def parse(value: Any) -> bytes:
        if type(value) is not bytes:
            raise MalformedFrame(f"{name} must be a byte string")
        if not min_size <= len(value) <= max_size:
            size = str(min_size) if min_size == max_size else f"{min_size}..{max_size}"
            raise MalformedFrame(f"{name} must be {size} bytes, got {len(value)}")
        return value

    return parse


def _exactly(name: str, size: int) -> Callable[[Any], bytes]:
    return _byte_string(name, min_size=size, max_size=size)


_T = TypeVar("_T")


def _nullable(parse: Callable[[Any], _T]) -> Callable[[Any], _T | None]:
    def parse_nullable(value: Any) -> _T | None:
        return None if value is None else parse(value)

    return parse_nullable


def _id_list(value: Any) -> tuple[bytes, ...]:
    if type(value) is not list and type(value) is not tuple:
        raise MalformedFrame("acknowledged ids must be an array")
    if not 1 <= len(value) <= MAX_ACK_REFS:
        raise MalformedFrame(f"an ACK names 1..{MAX_ACK_REFS} ids, got {len(value)}")
    for item in value:
        if type(item) is not bytes or len(item) != MESSAGE_ID_SIZE:
            raise MalformedFrame(f"acknowledged ids must be {MESSAGE_ID_SIZE}-byte strings")
    if len(set(value)) != len(value):
        raise MalformedFrame("acknowledged ids must be distinct")
    return tuple(value)


def _dump_id_list(value: Any) -> Any:
    return list(value) if type(value) is tuple else value


def _uint64(name: str) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if type(value) is not int or not 0 <= value <= 2**64 - 1:
            raise MalformedFrame(f"{name} must be an integer in 0..2**64-1")
        return value

    return parse


def _hash_list(value: Any) -> tuple[bytes, ...]:
    if type(value) is not list and type(value) is not tuple:
        raise MalformedFrame("consistency proof must be an array")
    if len(value) > MAX_CONSISTENCY_HASHES:
        raise MalformedFrame(f"consistency proof holds at most {MAX_CONSISTENCY_HASHES} hashes")
    for item in value:
        if type(item) is not bytes or len(item) != _HASH_SIZE:
            raise MalformedFrame(f"consistency proof hashes must be {_HASH_SIZE}-byte strings")
    return tuple(value)


def _null(value: Any) -> None:
    if value is not None:
        raise MalformedFrame("field must be null for this envelope type")


_E = TypeVar("_E", bound=enum.IntEnum)


def _enum_member(cls: type[_E]) -> Callable[[Any], _E]:
    def parse(value: Any) -> _E:
        if type(value) is not int:
            raise MalformedFrame(f"{cls.__name__} must be an integer")
        try:
            return cls(value)
        except ValueError:
            raise MalformedFrame(f"unknown {cls.__name__} {value}") from None

    return parse


def _dump_enum(value: Any) -> Any:
    return int(value) if isinstance(value, enum.IntEnum) else value


def _agent_id(value: Any) -> str:
    if type(value) is not str:
        raise MalformedFrame("agent id must be a text string")
    return _checked_agent_id(value)


# A receiver sees few distinct peers; caching valid ids saves ~8 us each (base58
# decode + re-encode) per envelope. Invalid ids raise and are never cached.
_checked_agent_id: Final = functools.lru_cache(maxsize=1024)(check_agent_id)


def _timestamp(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_TIMESTAMP_MS:
        raise MalformedFrame("timestamp must be an integer of milliseconds in 0..2**63-1")
    return value


def _reason(value: Any) -> str:
    if type(value) is not str or len(value) > MAX_REASON_LENGTH:
        raise MalformedFrame(f"reason must be text of at most {MAX_REASON_LENGTH} characters")
    if not value.isprintable():
        raise MalformedFrame("reason must be printable text")
    return value


_COMMON: Final = (
    Field("id", "message_id", _exactly("message id", MESSAGE_ID_SIZE)),
    Field("from", "sender", _agent_id),
    Field("inst", "sender_instance", _exactly("sender instance id", INSTANCE_ID_SIZE)),
    Field("to", "recipient", _agent_id),
    Field("ts", "timestamp_ms", _timestamp),
)
_CIPHERTEXT: Final = Field(
    "ct", "ciphertext", _byte_string("ciphertext", min_size=1, max_size=MAX_FRAME_SIZE)
)
_RATCHET_HEADER: Final = Field(
    "rh",
    "ratchet_header",
    _byte_string("ratchet header", min_size=1, max_size=MAX_RATCHET_HEADER_SIZE),
)
_CAPABILITY: Final = Field(
    "cap",
    "capability_ref",
    _nullable(_byte_string("capability ref", min_size=1, max_size=MAX_CAPABILITY_REF_SIZE)),
)
# ACK and ERROR are signed but not encrypted: no ratchet header, ciphertext or capability.
_NO_CONTENT: Final = (
    Field("rh", "ratchet_header", _exactly("ratchet header", 0)),
    Field("ct", "ciphertext", _exactly("ciphertext", 0)),
    Field("cap", "capability_ref", _null),
)

#: The exact fields of each envelope type, besides ``"v"``, ``"t"`` and ``"sig"``.
FIELDS: Final[Mapping[EnvelopeType, tuple[Field, ...]]] = {
    EnvelopeType.MESSAGE: (*_COMMON, _RATCHET_HEADER, _CIPHERTEXT, _CAPABILITY),
    EnvelopeType.INITIAL: (
        *_COMMON,
        _RATCHET_HEADER,
        _CIPHERTEXT,
        _CAPABILITY,
        Field(
            "x3dh",
            "x3dh_header",
            _byte_string("X3DH header", min_size=1, max_size=MAX_X3DH_HEADER_SIZE),
        ),
    ),
    EnvelopeType.ACK: (
        *_COMMON,
        *_NO_CONTENT,
        Field("refs", "ref_ids", _id_list, _dump_id_list),
        Field("st", "status", _enum_member(AckStatus), _dump_enum),
    ),
    EnvelopeType.ERROR: (
        *_COMMON,
        *_NO_CONTENT,
        Field("ref", "ref_id", _nullable(_exactly("failing message id", MESSAGE_ID_SIZE))),
        Field("code", "error_code", _enum_member(ErrorCode), _dump_enum),
        Field("why", "reason", _reason),
        Field("rk", "ratchet_key", _nullable(_exactly("ratchet key", KEY_SIZE))),
    ),
    EnvelopeType.REVOCATIONS: (
        *_COMMON,
        *_NO_CONTENT,
        Field(
            "rl",
            "revocation_list",
            _byte_string("revocation list", min_size=1, max_size=MAX_REVOCATION_LIST_SIZE),
        ),
    ),
    EnvelopeType.KEYLOG: (
        *_COMMON,
        *_NO_CONTENT,
        Field("kl", "key_log", _byte_string("key log", min_size=1, max_size=MAX_KEY_LOG_SIZE)),
    ),
    EnvelopeType.CHECKPOINT: (
        *_COMMON,
        *_NO_CONTENT,
        Field(
            "cp",
            "checkpoint_note",
            _byte_string("checkpoint", min_size=1, max_size=MAX_CHECKPOINT_NOTE_SIZE),
        ),
        Field("old", "old_size", _uint64("old tree size")),
        Field("proof", "consistency", _hash_list, _dump_id_list),
    ),
    EnvelopeType.COSIGNATURE: (
        *_COMMON,
        *_NO_CONTENT,
        Field("size", "tree_size", _uint64("tree size")),
        Field("root", "tree_root", _exactly("tree root", _HASH_SIZE)),
        Field("st", "cosign_status", _enum_member(CosignStatus), _dump_enum),
        Field("held", "held_size", _uint64("held tree size")),
        Field("hroot", "held_root", _nullable(_exactly("held tree root", _HASH_SIZE))),
        Field(
            "cs",
            "cosignature",
            _nullable(_byte_string("cosignature", min_size=1, max_size=MAX_COSIGNATURE_SIZE)),
        ),
        Field("why", "reason", _reason),
    ),
    EnvelopeType.MIRROR: (
        *_COMMON,
        *_NO_CONTENT,
        Field("mk", "mirror_kind", _enum_member(MirrorKind), _dump_enum),
        Field(
            "mb",
            "mirror_body",
            _byte_string("mirror body", min_size=1, max_size=MAX_MIRROR_BODY_SIZE),
        ),
    ),
    EnvelopeType.PRESENCE: (
        *_COMMON,
        *_NO_CONTENT,
        Field("pk", "presence_kind", _enum_member(PresenceKind), _dump_enum),
        Field(
            "pb",
            "presence_body",
            _byte_string("presence body", min_size=1, max_size=MAX_PRESENCE_BODY_SIZE),
        ),
    ),
}
_HEADER_KEYS: Final = frozenset({"v", "t", "sig"})
_KEYS: Final = {t: _HEADER_KEYS | {f.key for f in row} for t, row in FIELDS.items()}
_IN_EVERY_TYPE: Final = frozenset.intersection(
    *(frozenset(f.attr for f in row) for row in FIELDS.values())
)
#: Attributes some types carry and the others must leave as ``None``.
_OPTIONAL_ATTRS: Final = tuple(
    f.name for f in fields(Envelope) if f.name != "type" and f.name not in _IN_EVERY_TYPE
)
_parse_type: Final = _enum_member(EnvelopeType)
_parse_signature: Final = _exactly("signature", SIGNATURE_SIZE)


# -- sending ----------------------------------------------------------------------


def new_message_id(rng: Rng) -> bytes:
    """A fresh 128-bit random message id."""
    return rng.bytes(MESSAGE_ID_SIZE)


def new_instance_id(rng: Rng) -> bytes:
    """A fresh 128-bit random instance id (one per running agent process)."""
    return rng.bytes(INSTANCE_ID_SIZE)


def seal(envelope: Envelope, signing_key: SigningKey, *, max_size: int = MAX_FRAME_SIZE) -> bytes:
    """Validate, encode and sign ``envelope``; return the frame to transmit.

    Raises:
        LocalProtocolError: a field is missing, not allowed for the type, of
            the wrong type or size, or the frame would exceed ``max_size``.
    """
    body = _body(envelope)
    frame = canonical_dumps({**body, "sig": signing_key.sign(_signed_bytes(body))})
    if len(frame) > max_size:
        raise LocalProtocolError(f"envelope of {len(frame)} bytes exceeds {max_size}")
    return frame


def _body(envelope: Envelope) -> dict[str, Any]:
    """The signed map of a locally built envelope, validated like a received one."""
    row = FIELDS.get(envelope.type) if isinstance(envelope.type, EnvelopeType) else None
    if row is None:
        raise LocalProtocolError(f"unknown envelope type {envelope.type!r}")
    allowed = {f.attr for f in row}
    for attr in _OPTIONAL_ATTRS:
        if attr not in allowed and getattr(envelope, attr) is not None:
            raise LocalProtocolError(f"{attr} is not allowed in a {envelope.type.name} envelope")
    try:
        body = _to_map(envelope)
        for f in row:
            f.parse(body[f.key])
    except (MalformedFrame, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"invalid {envelope.type.name} envelope: {exc}") from exc
    return body


def _to_map(envelope: Envelope) -> dict[str, Any]:
    """The signed map of ``envelope`` (no validation: see :func:`_body`)."""
    body: dict[str, Any] = {"v": WIRE_VERSION, "t": int(envelope.type)}
    for f in FIELDS[envelope.type]:
        body[f.key] = f.dump(getattr(envelope, f.attr))
    return body


def _signed_bytes(body: Mapping[str, Any]) -> bytes:
    return DOMAIN_PREFIX + canonical_dumps(body)


# -- receiving --------------------------------------------------------------------


def decode(frame: bytes, *, max_size: int = MAX_FRAME_SIZE) -> UnverifiedEnvelope:
    """Parse an untrusted frame; check structure only, not the signature.

    Raises:
        MalformedFrame: too large, not canonical CBOR, not a map, unknown
            type, missing or extra fields, or a field of the wrong type or size.
        UnsupportedVersion: a well-formed map with another format version.
    """
    raw = strict_loads(frame, max_size=max_size)
    if type(raw) is not dict:
        raise MalformedFrame("envelope must be a CBOR map")
    envelope_type = _check_header(raw)
    _check_keys(raw, envelope_type)
    values = {f.attr: f.parse(raw[f.key]) for f in FIELDS[envelope_type]}
    signature = _parse_signature(raw["sig"])
    return UnverifiedEnvelope(Envelope(type=envelope_type, **values), signature)


def _check_header(raw: dict[str, Any]) -> EnvelopeType:
    version = raw.get("v")
    if type(version) is not int:
        raise MalformedFrame("envelope version must be an integer")
    if version != WIRE_VERSION:
        raise UnsupportedVersion(f"envelope version {version} is not supported")
    if "t" not in raw:
        raise MalformedFrame("envelope type is missing")
    return _parse_type(raw["t"])


def _check_keys(raw: dict[str, Any], envelope_type: EnvelopeType) -> None:
    expected = _KEYS[envelope_type]
    if raw.keys() == expected:
        return
    missing = sorted(expected - raw.keys())
    if missing:
        raise MalformedFrame(f"{envelope_type.name} envelope lacks fields {missing}")
    extra = len(raw.keys() - expected)
    raise MalformedFrame(f"{envelope_type.name} envelope has {extra} unexpected field(s)")


def verify(unverified: UnverifiedEnvelope, verify_key: VerifyKey) -> Envelope:
    """Check the signature with the sender's key and release the envelope.

    The caller chooses ``verify_key`` from :attr:`UnverifiedEnvelope.sender`
    (and must still check :attr:`Envelope.recipient` is itself).

    Raises:
        SignatureInvalid: the signature does not verify under ``verify_key``.
    """
    envelope = unverified._envelope
    # Decoding is exact, so re-encoding the parsed fields gives the received bytes.
    verify_key.verify(unverified.signature, _signed_bytes(_to_map(envelope)))
    return envelope
