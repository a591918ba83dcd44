"""Witness cosignatures of audit checkpoints, and the witness's rules (pure).

Modelled on C2SP *tlog-cosignature* and *tlog-witness* (docs/design/witnesses.md),
in Talos's own canonical-CBOR format rather than signed-note text:

* A :class:`Cosignature` is an Ed25519 signature by a witness's identity key
  (sequence ``key_sequence`` of its key log) over :data:`DOMAIN`, then the
  canonical CBOR of ``{"cp": checkpoint body, "ts": seconds, "w": witness id,
  "ks": key sequence}``. The checkpoint body is the signed-note text the
  origin signed (origin, size, root, extensions): a cosignature vouches that
  the witness saw that tree head at ``timestamp`` and that it was consistent
  with every earlier head of the same origin the witness had accepted.
* :func:`judge` is the witness's decision on a checkpoint whose origin
  signature already verified: accept it (the first one of an origin, the same
  head again, or an extension proved by an RFC 9162 consistency proof from the
  head the witness holds), or refuse it. A refusal is an *equivocation*
  (``rollback``: smaller than the held head; ``fork``: same size, another
  root; ``inconsistent``: the proof does not lead from the held head) or
  ``stale`` (the origin proved from another size than the one the witness
  holds: it retries from the held size, tlog-witness's 409 answer).
* :func:`origin_conflict` is the origin's reading of a witness's conflict
  answer, against its own log.
* Decoders refuse malformed input with :class:`~talos.errors.MalformedFrame`;
  :meth:`Cosignature.verify` raises :class:`~talos.errors.SignatureInvalid`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from talos.core.agent_id import check_agent_id
from talos.core.audit.checkpoint import Checkpoint
from talos.core.audit.merkle import HASH_SIZE, verify_consistency
from talos.core.crypto import SIGNATURE_SIZE, SigningKey, VerifyKey
from talos.core.encoding import canonical_dumps, strict_loads
from talos.errors import ConsistencyError, MalformedFrame, TalosError

__all__ = [
    "COSIGNATURE_VERSION",
    "DOMAIN",
    "EQUIVOCATIONS",
    "MAX_CONSISTENCY_HASHES",
    "MAX_COSIGNATURE_SIZE",
    "REFUSALS",
    "Accepted",
    "Cosignature",
    "Refused",
    "WitnessedHead",
    "judge",
    "origin_conflict",
    "origin_of",
    "MAX_WITNESSED_RECORD",
    "evictable",
]

COSIGNATURE_VERSION: Final = 1
#: Domain separation: a cosignature can never pass for any other Talos signature.
DOMAIN: Final = b"talos/cosignature/v1\x00"
#: Longest consistency proof accepted (a uint64 tree needs at most 2 * 64 hashes;
#: real logs need far fewer).
MAX_CONSISTENCY_HASHES: Final = 128
#: Bound on an encoded cosignature.
MAX_COSIGNATURE_SIZE: Final = 512
#: Bound on a stored witnessed head (the note is at most MAX_NOTE_SIZE): what a
#: witness keeps per origin, one record, never more.
MAX_WITNESSED_RECORD: Final = 32 * 1024
_MAX_RECORD: Final = MAX_WITNESSED_RECORD
_MAX_U64: Final = 2**64 - 1

#: Refusals that prove the origin signed two views of its log.
EQUIVOCATIONS: Final = ("rollback", "fork", "inconsistent")
#: Every reason a witness refuses a checkpoint (the metric's ``reason`` label).
REFUSALS: Final = (
    "invalid",
    "bad_signature",
    "rate_limited",
    "stale",
    "storage",
    "bad_cosignature",
    *EQUIVOCATIONS,
    "witness_full",
)

Reason = Literal["stale", "rollback", "fork", "inconsistent"]


def origin_of(agent_id: str) -> str:
    """The checkpoint origin line of ``agent_id``'s audit log."""
    return f"{agent_id}/audit"


def _uint(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_U64:
        raise MalformedFrame(f"{name} must be a uint64")
    return int(value)


def _signed_bytes(body: bytes, witness: str, key_sequence: int, timestamp: int) -> bytes:
    return DOMAIN + canonical_dumps({"cp": body, "ks": key_sequence, "ts": timestamp, "w": witness})


@dataclass(frozen=True, slots=True)
class Cosignature:
    """``witness`` (key ``key_sequence``) saw a checkpoint body at ``timestamp`` (Unix s)."""

    witness: str
    key_sequence: int
    timestamp: int
    signature: bytes

    @classmethod
    def sign(
        cls, body: bytes, *, witness: str, key_sequence: int, key: SigningKey, timestamp: int
    ) -> Cosignature:
        """Cosign the checkpoint ``body`` (:meth:`Checkpoint.body`)."""
        signature = key.sign(_signed_bytes(body, witness, key_sequence, timestamp))
        return cls(witness, key_sequence, timestamp, signature)

    def verify(self, body: bytes, key: VerifyKey) -> None:
        """Check this cosignature of ``body`` under the witness's ``key``.

        Raises:
            SignatureInvalid: it does not verify.
        """
        key.verify(
            self.signature, _signed_bytes(body, self.witness, self.key_sequence, self.timestamp)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": COSIGNATURE_VERSION,
            "w": self.witness,
            "ks": self.key_sequence,
            "ts": self.timestamp,
            "sig": self.signature,
        }

    def to_bytes(self) -> bytes:
        return canonical_dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any) -> Cosignature:
        """Read :meth:`to_dict`'s map.

        Raises:
            MalformedFrame: not exactly that map, with valid fields.
        """
        if type(raw) is not dict or set(raw) != {"v", "w", "ks", "ts", "sig"}:
            raise MalformedFrame("a cosignature is a map of v, w, ks, ts and sig")
        if raw["v"] != COSIGNATURE_VERSION or type(raw["v"]) is not int:
            raise MalformedFrame(f"cosignature version must be {COSIGNATURE_VERSION}")
        witness = raw["w"]
        try:
            if type(witness) is not str:
                raise MalformedFrame("cosignature witness must be an agent id")
            check_agent_id(witness)
        except TalosError:
            raise MalformedFrame("cosignature witness must be an agent id") from None
        signature = raw["sig"]
        if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
            raise MalformedFrame(f"cosignature signature must be {SIGNATURE_SIZE} bytes")
        return cls(
            witness,
            _uint(raw["ks"], "cosignature key sequence"),
            _uint(raw["ts"], "cosignature timestamp"),
            signature,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Cosignature:
        """Decode an untrusted cosignature (bounded, canonical CBOR).

        Raises:
            MalformedFrame: anything but a well-formed cosignature.
        """
        return cls.from_dict(strict_loads(data, max_size=MAX_COSIGNATURE_SIZE))


@dataclass(frozen=True, slots=True)
class WitnessedHead:
    """The newest checkpoint of one origin a witness accepted: what it stores."""

    size: int
    root: bytes
    #: The origin-signed note text (evidence, should the origin equivocate later).
    note: bytes
    accepted_ms: int
    #: The signed timestamp of the envelope that brought it (orders the origin's sends).
    sent_ms: int = 0

    def to_bytes(self) -> bytes:
        record = {
            "size": self.size,
            "root": self.root,
            "note": self.note,
            "at": self.accepted_ms,
            "sent": self.sent_ms,
        }
        return canonical_dumps(record)

    @classmethod
    def from_bytes(cls, data: bytes) -> WitnessedHead:
        """Read a stored record.

        Raises:
            MalformedFrame: not a witnessed-head record.
        """
        raw = strict_loads(data, max_size=_MAX_RECORD)
        if type(raw) is not dict or set(raw) != {"size", "root", "note", "at", "sent"}:
            raise MalformedFrame("a witnessed head is a map of size, root, note, at and sent")
        root, note = raw["root"], raw["note"]
        if type(root) is not bytes or len(root) != HASH_SIZE or type(note) is not bytes:
            raise MalformedFrame("witnessed head root or note is malformed")
        return cls(
            _uint(raw["size"], "size"),
            root,
            note,
            _uint(raw["at"], "at"),
            _uint(raw["sent"], "sent"),
        )


@dataclass(frozen=True, slots=True)
class Accepted:
    """Cosign: the checkpoint extends (or repeats) what the witness held."""

    head: WitnessedHead
    #: False when it repeats the held head (nothing new to store).
    grew: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """Refuse: ``reason`` (see :data:`EQUIVOCATIONS`), with the head the witness holds."""

    reason: Reason
    held: WitnessedHead

    @property
    def equivocation(self) -> bool:
        return self.reason in EQUIVOCATIONS


def judge(
    held: WitnessedHead | None,
    checkpoint: Checkpoint,
    old_size: int,
    proof: Sequence[bytes],
    *,
    now_ms: int,
    sent_ms: int = 0,
) -> Accepted | Refused:
    """The witness's decision on ``checkpoint`` (its origin signature already checked).

    ``old_size`` is the size the origin proves consistency from, ``proof``
    the RFC 9162 consistency proof from it to ``checkpoint.size``; ``sent_ms``
    is the signed timestamp of the envelope that carried it. A checkpoint sent
    no later than the held head (a replayed or reordered frame: an older head
    of a log is a prefix, not a contradiction) is ``stale``, never an
    equivocation: only a fresh statement can contradict the held head.
    """
    note = checkpoint.to_text().encode("utf-8")
    head = WitnessedHead(checkpoint.size, checkpoint.root, note, now_ms, sent_ms)
    if held is None:
        return Accepted(head, grew=True)  # trust on first use, as tlog-witness does
    if (checkpoint.size, checkpoint.root) == (held.size, held.root):
        return Accepted(held, grew=False)
    if sent_ms <= held.sent_ms:
        return Refused("stale", held)
    if checkpoint.size < held.size:
        return Refused("rollback", held)
    if checkpoint.size == held.size:
        return Refused("fork", held)
    if old_size != held.size:
        return Refused("stale", held)
    try:
        verify_consistency(held.size, checkpoint.size, proof, held.root, checkpoint.root)
    except ConsistencyError:
        return Refused("inconsistent", held)
    return Accepted(head, grew=True)


def origin_conflict(
    own_size: int, own_root_at: bytes | None, held_size: int, held_root: bytes | None
) -> Reason:
    """How an origin reads a witness's conflict answer about its own log.

    The witness holds ``held_size``/``held_root``; this log has ``own_size``
    entries, and ``own_root_at`` is its root at ``held_size`` (None when
    ``held_size > own_size``). ``stale`` means only that the origin proved
    from the wrong size (retry from ``held_size``); anything else means a
    head of this log the witness accepted is not a head of the log we hold.
    """
    if held_size > own_size:
        return "rollback"
    if held_root is not None and own_root_at is not None and own_root_at != held_root:
        return "fork"
    return "stale"


def evictable(heads: Sequence[tuple[str, int]], protected: frozenset[str]) -> str | None:
    """The origin whose head a witness at its cap drops for a new one, if any.

    ``heads`` are the stored ``(origin, accepted_ms)``; ``protected`` the origins
    that must never be evicted (peers with a session, configured witnesses).
    The unprotected origin whose head was accepted longest ago goes (ties: the
    smallest id, so the choice is deterministic); None when every stored head
    is protected.
    """
    candidates = [(at, origin) for origin, at in heads if origin not in protected]
    return min(candidates)[1] if candidates else None
