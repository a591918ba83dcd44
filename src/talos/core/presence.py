"""Presence challenges on the wire: the bodies of PRESENCE envelopes (docs/design/diagnose.md).

``talos diagnose --check-duplicates`` asks every live instance the registry
lists for an identity to prove, now, that it holds the identity's key and to
name its instance id. A PRESENCE envelope
(:data:`talos.core.wire.EnvelopeType.PRESENCE`) carries one
:class:`PresenceKind` and a body, a canonical CBOR map decoded here, strictly:

* ``CHALLENGE`` (diagnose → instance): a fresh random ``nonce`` and ``e``,
  the endpoint the challenger dialled (``ws://host:port``, at most
  :data:`MAX_ENDPOINT` characters). The envelope is sent as the identity
  itself (sender = recipient) and signed by its current key: an instance
  answers only whoever holds its own key, so a stranger learns no instance
  id; and only a challenge naming an endpoint it listens on or announces,
  so a relay from a stale listing to the real instance gets no proof for
  the listing (docs/design/diagnose.md, "The live challenge"). ``e`` was
  added after the first version and is optional on decoding: a challenge
  without it (from an older ``talos diagnose``) decodes with
  ``endpoint=None``.
* ``PROOF`` (instance → diagnose): the ``nonce`` echoed, the answering
  instance's id and its clock (``time_ms``). The envelope's signature, by the
  identity's current key, covers all three: nonce + instance id + time.

Rules: :func:`check_proof` is the whole verdict on a PROOF whose envelope
signature already verified: the nonce must be the one sent, the body's
instance and time must be the envelope's, and the time within
:data:`MAX_PROOF_SKEW_MS` of the challenger's clock. Anything malformed raises
:class:`~talos.errors.MalformedFrame` (an unknown version
:class:`~talos.errors.UnsupportedVersion`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from talos.core.encoding import canonical_dumps, check_versioned_map, strict_loads
from talos.errors import MalformedFrame

__all__ = [
    "BODY_VERSION",
    "INSTANCE_SIZE",
    "MAX_BODY_SIZE",
    "MAX_ENDPOINT",
    "MAX_PROOF_SKEW_MS",
    "NONCE_SIZE",
    "Challenge",
    "PresenceKind",
    "Proof",
    "check_proof",
    "decode_body",
    "encode_body",
    "kind_of",
]

BODY_VERSION: Final = 1
#: Bytes of a challenge's random nonce.
NONCE_SIZE: Final = 32
#: Bytes of an instance id (``wire.new_instance_id``).
INSTANCE_SIZE: Final = 16
#: Longest endpoint a challenge names, in characters.
MAX_ENDPOINT: Final = 255
#: Largest body: a nonce and an endpoint, or a nonce, an instance id and a time, with keys.
MAX_BODY_SIZE: Final = 128 + 4 * MAX_ENDPOINT
#: How far a proof's time may be from the challenger's clock.
MAX_PROOF_SKEW_MS: Final = 60_000
_MAX_U64: Final = 2**64 - 1


class PresenceKind(enum.IntEnum):
    """What a PRESENCE envelope carries (key ``"pk"``)."""

    CHALLENGE = 1
    PROOF = 2


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    #: The endpoint the challenger dialled (``None``: a challenge of an older version).
    endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class Proof:
    nonce: bytes
    instance_id: bytes
    time_ms: int


Body = Challenge | Proof

_FIELDS: Final = {
    PresenceKind.CHALLENGE: frozenset({"v", "n"}),
    PresenceKind.PROOF: frozenset({"v", "n", "i", "ts"}),
}


def kind_of(body: Body) -> PresenceKind:
    return PresenceKind.CHALLENGE if isinstance(body, Challenge) else PresenceKind.PROOF


def encode_body(body: Body) -> bytes:
    raw: dict[str, Any] = {"v": BODY_VERSION, "n": _bytes(body.nonce, "nonce", NONCE_SIZE)}
    if isinstance(body, Challenge) and body.endpoint is not None:
        raw["e"] = _endpoint(body.endpoint)
    if isinstance(body, Proof):
        raw["i"] = _bytes(body.instance_id, "instance id", INSTANCE_SIZE)
        raw["ts"] = _uint(body.time_ms, "time")
    return canonical_dumps(raw)


def decode_body(kind: PresenceKind, data: bytes) -> Body:
    """The body of a PRESENCE envelope of ``kind``.

    Raises:
        MalformedFrame: not exactly the fields of ``kind``, or a field out of range.
        UnsupportedVersion: another body version.
    """
    value = strict_loads(data, max_size=MAX_BODY_SIZE)
    fields = _FIELDS[kind]
    if kind is PresenceKind.CHALLENGE and type(value) is dict and "e" in value:
        fields = fields | {"e"}
    raw = check_versioned_map(
        value, fields=fields, version=BODY_VERSION, what=f"presence {kind.name.lower()}"
    )
    nonce = _bytes(raw["n"], "nonce", NONCE_SIZE)
    if kind is PresenceKind.CHALLENGE:
        return Challenge(nonce, None if "e" not in raw else _endpoint(raw["e"]))
    return Proof(nonce, _bytes(raw["i"], "instance id", INSTANCE_SIZE), _uint(raw["ts"], "time"))


def check_proof(
    proof: Proof, *, nonce: bytes, envelope_instance: bytes, envelope_time_ms: int, now_ms: int
) -> None:
    """Judge a PROOF whose envelope signature verified against the identity's current key.

    Raises:
        MalformedFrame: not an answer to ``nonce``, the body contradicts its
            envelope, or its time is more than :data:`MAX_PROOF_SKEW_MS` from ``now_ms``.
    """
    if proof.nonce != nonce:
        raise MalformedFrame("the proof answers another challenge")
    if proof.instance_id != envelope_instance or proof.time_ms != envelope_time_ms:
        raise MalformedFrame("the proof's instance or time is not its envelope's")
    if abs(proof.time_ms - now_ms) > MAX_PROOF_SKEW_MS:
        raise MalformedFrame(f"the proof is {abs(proof.time_ms - now_ms) / 1000:.0f}s off")


def _bytes(value: Any, name: str, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise MalformedFrame(f"presence {name} must be {size} bytes")
    return value


def _endpoint(value: Any) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_ENDPOINT:
        raise MalformedFrame(f"presence endpoint must be text of 1..{MAX_ENDPOINT} characters")
    return value


def _uint(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_U64:
        raise MalformedFrame(f"presence {name} must be an unsigned 64-bit integer")
    return value
