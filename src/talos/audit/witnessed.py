"""The witnesses' cosignatures a proof file carries (docs/design/witnesses.md).

``talos audit prove`` adds, under the JSON key ``witnessed``, the newest tree
of the log that witnesses cosigned and that covers the entry: the log's
origin, that tree's size and root, every cosignature the agent holds for it
(its ``CHECKPOINT_COSIGNED`` entries), and, when the proof's tree is larger,
the consistency proof from the cosigned tree to the proof's. A verifier
holding a witness's key log checks its cosignature over the checkpoint body
(origin, size, root) and the consistency proof to the proof's root: the entry
is then in a tree that witness saw, and every later head the witness accepted
extends it. Proof files without the key read and verify as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from talos.audit.log import AuditLog
from talos.core.audit.checkpoint import Checkpoint, ConsistencyProof
from talos.core.audit.cosignature import Cosignature
from talos.core.audit.entry import AuditKind
from talos.core.keylog import KeyLog
from talos.errors import MalformedFrame, SignatureInvalid

__all__ = ["MAX_PROOF_COSIGNATURES", "ProofWitnesses", "WitnessCheck", "witnesses_for"]

#: Most cosignatures one proof file may carry.
MAX_PROOF_COSIGNATURES: Final = 64
_MAX_U64: Final = 2**64 - 1

WitnessState = Literal["verified", "unchecked"]


def _uint(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if type(value) is not int or not 0 <= value <= _MAX_U64:
        raise MalformedFrame(f"witnessed.{name} is missing or not a uint64")
    return value


def _hex(value: Any, name: str, size: int) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size:
        raise MalformedFrame(f"witnessed.{name} must be {size} bytes of hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MalformedFrame(f"witnessed.{name} is not hex") from None


def _cosignature(obj: Any) -> Cosignature:
    if not isinstance(obj, dict) or set(obj) != {"witness", "key_sequence", "timestamp", "sig"}:
        raise MalformedFrame("a cosignature needs witness, key_sequence, timestamp and sig")
    return Cosignature.from_dict(
        {
            "v": 1,
            "w": obj["witness"],
            "ks": obj["key_sequence"],
            "ts": obj["timestamp"],
            "sig": _hex(obj["sig"], "cosignature sig", 64),
        }
    )


@dataclass(frozen=True)
class WitnessCheck:
    """One cosignature of a proof file, and whether it was checked against a key log."""

    cosignature: Cosignature
    state: WitnessState

    def to_json(self) -> dict[str, Any]:
        return {
            "witness": self.cosignature.witness,
            "key_sequence": self.cosignature.key_sequence,
            "timestamp": self.cosignature.timestamp,
            "state": self.state,
        }


@dataclass(frozen=True)
class ProofWitnesses:
    """A cosigned tree of the log (``tree_size``, ``root``) and its cosignatures;
    ``consistency`` leads from it to the proof's tree when the sizes differ."""

    origin: str
    tree_size: int
    root: bytes
    cosignatures: tuple[Cosignature, ...]
    consistency: tuple[bytes, ...] | None = None

    def body(self) -> bytes:
        """The checkpoint body the witnesses cosigned."""
        return Checkpoint(self.origin, self.tree_size, self.root).body()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "origin": self.origin,
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "cosignatures": [
                {
                    "witness": c.witness,
                    "key_sequence": c.key_sequence,
                    "timestamp": c.timestamp,
                    "sig": c.signature.hex(),
                }
                for c in self.cosignatures
            ],
        }
        if self.consistency is not None:
            out["consistency"] = [item.hex() for item in self.consistency]
        return out

    @classmethod
    def from_json(cls, obj: Any, proof_size: int) -> ProofWitnesses:
        """Read the ``witnessed`` object of a proof file whose tree has ``proof_size`` entries.

        Raises:
            MalformedFrame: a missing or ill-typed field, or sizes that do not fit.
        """
        keys = {"origin", "tree_size", "root", "cosignatures"}
        if not isinstance(obj, dict) or not keys <= set(obj) <= keys | {"consistency"}:
            raise MalformedFrame("witnessed needs origin, tree_size, root and cosignatures")
        origin = obj["origin"]
        if not isinstance(origin, str) or not origin or not origin.isprintable():
            raise MalformedFrame("witnessed.origin must be one line of printable text")
        size = _uint(obj, "tree_size")
        if size > proof_size:
            raise MalformedFrame(f"witnessed.tree_size {size} is past the proof's {proof_size}")
        cosigs = obj["cosignatures"]
        if not isinstance(cosigs, list) or not 1 <= len(cosigs) <= MAX_PROOF_COSIGNATURES:
            raise MalformedFrame(f"witnessed.cosignatures: 1 to {MAX_PROOF_COSIGNATURES} of them")
        step = obj.get("consistency")
        if (step is None) != (size == proof_size):
            raise MalformedFrame("witnessed.consistency is needed exactly when the sizes differ")
        if step is not None and (not isinstance(step, list) or len(step) > 128):
            raise MalformedFrame("witnessed.consistency must be at most 128 hex strings")
        return cls(
            origin,
            size,
            _hex(obj["root"], "root", 32),
            tuple(_cosignature(item) for item in cosigs),
            None if step is None else tuple(_hex(h, "consistency hash", 32) for h in step),
        )

    def check(
        self, proof_size: int, proof_root: bytes, logs: Mapping[str, KeyLog]
    ) -> tuple[WitnessCheck, ...]:
        """Check the consistency to the proof's tree and every cosignature whose
        witness's key log is in ``logs`` (the others are ``unchecked``).

        Raises:
            ConsistencyError: the cosigned tree is not a prefix of the proof's.
            SignatureInvalid: a cosignature does not verify under its witness's key.
        """
        if self.consistency is not None:
            ConsistencyProof(self.tree_size, proof_size, self.consistency).verify(
                self.root, proof_root
            )
        elif self.root != proof_root:
            raise SignatureInvalid("the cosigned root is not the proof's root")
        checks = []
        body = self.body()
        for cosig in self.cosignatures:
            log = logs.get(cosig.witness)
            if log is None:
                checks.append(WitnessCheck(cosig, "unchecked"))
                continue
            key = log.key_at(cosig.key_sequence)
            if key is None or log.revoked(cosig.key_sequence):
                raise SignatureInvalid(
                    f"cosignature by {cosig.witness}: key {cosig.key_sequence} is not a valid "
                    "key of its key log"
                )
            try:
                cosig.verify(body, key)
            except SignatureInvalid:
                raise SignatureInvalid(f"bad cosignature by {cosig.witness}") from None
            checks.append(WitnessCheck(cosig, "verified"))
        return tuple(checks)


def witnesses_for(log: AuditLog, seq: int, size: int, origin: str) -> ProofWitnesses | None:
    """The newest tree of ``log`` witnesses cosigned that covers entry ``seq`` and is
    not past ``size``, with its cosignatures; None when there is none.

    Raises:
        StoreCorrupted: the log is damaged.
    """
    found: dict[tuple[int, bytes], dict[str, Cosignature]] = {}
    for entry in log.query(kind=AuditKind.CHECKPOINT_COSIGNED):
        data, witness = entry.data, entry.peer
        if witness is None or not seq < data["size"] <= size:
            continue
        cosig = Cosignature(witness, data["ks"], data["ts"], bytes(data["sig"]))
        found.setdefault((data["size"], bytes(data["root"])), {})[witness] = cosig
    if not found:
        return None
    tree_size, root = max(found, key=lambda key: key[0])
    if log.root_at(tree_size) != root:
        return None  # a cosignature of a head this log no longer has: never passed on
    cosigs = tuple(found[tree_size, root].values())[:MAX_PROOF_COSIGNATURES]
    step = None if tree_size == size else log.prove_consistency(tree_size, size).hashes
    return ProofWitnesses(origin, tree_size, root, cosigs, None if step is None else tuple(step))
