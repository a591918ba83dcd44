"""Proof files: reading one, and checking it against a root and trusted keys.

A proof file is the JSON that ``talos audit prove`` writes: an
:class:`InclusionProof` and, optionally, the :class:`Checkpoint` that vouches
for its root. :func:`read_proof_file` parses one (bounded in size);
:func:`verify_proof_file` checks the checkpoint's signature against trusted
note keys and the proof against the expected root, and returns a
:class:`ProofVerdict`. Every failure is an exception that says why, in words
an operator can act on: a wrong root is told apart from a proof that does
not even lead to its own checkpoint's root. The messages and hints name the
options of ``talos audit verify-proof`` (``--root``, ``--verifier-key``),
the one place a root or a key comes from today.

A proof file may also carry an **anchor** (:class:`ProofAnchor`, the JSON key
``anchor``): the newest final on-chain anchor of the log that covers the
entry (chain id, contract, transaction, block, tree size, root) and, when the
proof's tree is larger than the anchored one, the consistency proof from the
anchored tree to the proof's. An anchored root then vouches for the proof's
root: ``--root`` may be the anchored root, and ``verify-proof --rpc`` checks
the anchor itself on the chain (:mod:`talos.audit.anchoring.proof`). Proof
files without the key are read and checked exactly as before.

A proof file may also carry the witnesses' **cosignatures** (the JSON key
``witnessed``, :mod:`talos.audit.witnessed`); given the witnesses' key logs,
:func:`verify_proof_file` checks them and reports each in the verdict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from talos.audit import AuditLog, Checkpoint, InclusionProof, note_key_hash
from talos.audit.witnessed import ProofWitnesses, WitnessCheck
from talos.core.audit.checkpoint import ConsistencyProof
from talos.core.audit.entry import AuditKind
from talos.core.crypto import VerifyKey, sha256
from talos.core.keylog import KeyLog
from talos.errors import (
    AnchorMismatch,
    ConfigurationError,
    InclusionProofError,
    MalformedFrame,
    SignatureInvalid,
)

__all__ = [
    "MAX_PROOF_FILE",
    "NoteKey",
    "anchor_for",
    "ProofAnchor",
    "ProofFile",
    "ProofVerdict",
    "checkpoint_signer",
    "read_proof_file",
    "verify_anchored_proof",
    "verify_proof_file",
]

#: Largest proof file read (a proof holds at most 128 hashes).
MAX_PROOF_FILE: Final = 1 << 20

#: A trusted checkpoint key: the signer name it must carry (None: any name) and the key.
NoteKey = tuple[str | None, VerifyKey]

CheckpointState = Literal["verified", "unchecked", "absent"]
#: How far a proof file's anchor was checked: on chain, as the given --root, or not.
AnchorState = Literal["chain", "root", "unchecked", "absent"]

_MAX_U64: Final = 2**64 - 1


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if type(value) is not kind:
        raise MalformedFrame(f"anchor.{name} is missing or not a {kind.__name__}")
    return value


def _uint64(obj: dict[str, Any], name: str) -> int:
    value = _field(obj, name, int)
    if not 0 <= value <= _MAX_U64:
        raise MalformedFrame(f"anchor.{name} is not a uint64")
    return int(value)


def _hex_bytes(value: Any, name: str, size: int) -> bytes:
    if not isinstance(value, str):
        raise MalformedFrame(f"anchor.{name} is missing or not a hex string")
    digits = value.removeprefix("0x")
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        raise MalformedFrame(f"anchor.{name} is not hex") from None
    if len(raw) != size or len(digits) != 2 * size:
        raise MalformedFrame(f"anchor.{name} must be {size} bytes of hex")
    return raw


@dataclass(frozen=True)
class ProofAnchor:
    """A final on-chain anchor of the log, as a proof file carries it.

    ``consistency`` proves the anchored tree (``tree_size``, ``root``) a
    prefix of the proof's tree, whose root is ``proof_root``; both are
    absent when the proof's tree is the anchored tree.
    """

    chain_id: int
    contract: str
    tx_hash: bytes
    block_number: int
    block_hash: bytes
    log_id: bytes | None
    tree_size: int
    root: bytes
    proof_root: bytes | None = None
    consistency: tuple[bytes, ...] = ()

    @staticmethod
    def log_id_of(origin: str) -> bytes:
        """The on-chain name of the log whose checkpoints carry ``origin`` (SHA-256 of it)."""
        return sha256(origin.encode("utf-8"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "chain_id": self.chain_id,
            "contract": self.contract,
            "tx": "0x" + self.tx_hash.hex(),
            "block_number": self.block_number,
            "block_hash": "0x" + self.block_hash.hex(),
            "tree_size": self.tree_size,
            "root": self.root.hex(),
        }
        if self.log_id is not None:
            out["log_id"] = "0x" + self.log_id.hex()
        if self.proof_root is not None:
            out["consistency"] = {
                "proof_root": self.proof_root.hex(),
                "hashes": [item.hex() for item in self.consistency],
            }
        return out

    @classmethod
    def from_json(cls, obj: Any, proof_size: int) -> ProofAnchor:
        """Read the ``anchor`` object of a proof file whose tree has ``proof_size`` entries.

        Raises:
            MalformedFrame: a missing or ill-typed field, or sizes that do not fit.
        """
        if not isinstance(obj, dict):
            raise MalformedFrame("anchor must be a JSON object")
        contract = _field(obj, "contract", str)
        _hex_bytes(contract, "contract", 20)
        log_id = obj.get("log_id")
        anchor = cls(
            chain_id=_uint64(obj, "chain_id"),
            contract=contract,
            tx_hash=_hex_bytes(obj.get("tx"), "tx", 32),
            block_number=_uint64(obj, "block_number"),
            block_hash=_hex_bytes(obj.get("block_hash"), "block_hash", 32),
            log_id=None if log_id is None else _hex_bytes(log_id, "log_id", 32),
            tree_size=_uint64(obj, "tree_size"),
            root=_hex_bytes(obj.get("root"), "root", 32),
        )
        if anchor.tree_size > proof_size:
            raise MalformedFrame(
                f"anchor.tree_size {anchor.tree_size} is past the proof's tree size {proof_size}"
            )
        step = obj.get("consistency")
        if (step is None) != (anchor.tree_size == proof_size):
            raise MalformedFrame("anchor.consistency is needed exactly when the tree sizes differ")
        if step is None:
            return anchor
        if not isinstance(step, dict) or set(step) != {"proof_root", "hashes"}:
            raise MalformedFrame("anchor.consistency needs proof_root and hashes")
        hashes = step["hashes"]
        if not isinstance(hashes, list) or len(hashes) > 128:
            raise MalformedFrame("anchor.consistency.hashes must be at most 128 hex strings")
        return replace(
            anchor,
            proof_root=_hex_bytes(step["proof_root"], "proof_root", 32),
            consistency=tuple(_hex_bytes(item, "consistency hash", 32) for item in hashes),
        )

    def tree_root(self, proof_size: int) -> bytes:
        """The root of the proof's tree, as the anchored root vouches for it.

        Raises:
            ConsistencyError: the consistency proof does not lead from the
                anchored root to ``proof_root`` (the anchored tree is not a
                prefix of the proof's).
        """
        if self.proof_root is None:
            return self.root
        ConsistencyProof(self.tree_size, proof_size, self.consistency).verify(
            self.root, self.proof_root
        )
        return self.proof_root


@dataclass(frozen=True)
class ProofFile:
    """A parsed proof file: the proof, and the checkpoint for its tree size if any."""

    path: Path
    proof: InclusionProof
    checkpoint: Checkpoint | None
    anchor: ProofAnchor | None = None
    witnesses: ProofWitnesses | None = None


@dataclass(frozen=True)
class ProofVerdict:
    """A proof that verified, and how far its checkpoint and anchor were checked."""

    proof: InclusionProof
    root: bytes
    checkpoint: CheckpointState
    checkpoint_signer: str | None
    anchor: ProofAnchor | None = None
    anchor_state: AnchorState = "absent"
    #: The wallet that sent the anchor, when it was looked up on chain.
    anchor_submitter: str | None = None
    #: The witnesses' cosignatures the file carries, checked or not.
    witnesses: tuple[WitnessCheck, ...] = ()
    #: The size of the cosigned tree (None: the file carries no cosignature).
    witnessed_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "valid": True,
            "leaf_index": self.proof.leaf_index,
            "tree_size": self.proof.tree_size,
            "leaf_hash": self.proof.leaf_hash.hex(),
            "root": self.root.hex(),
            "checkpoint": self.checkpoint,
            "checkpoint_signer": self.checkpoint_signer,
        }
        if self.anchor is not None:
            out["anchor"] = self.anchor_state
            out["anchored"] = {
                **self.anchor.to_json(),
                "submitter": self.anchor_submitter,
            }
            out["anchored"].pop("consistency", None)
        if self.witnessed_size is not None:
            out["witnessed_size"] = self.witnessed_size
            out["witnesses"] = [check.to_json() for check in self.witnesses]
        return out


def read_proof_file(path: Path) -> ProofFile:
    """Read and parse a proof file.

    Raises:
        ConfigurationError: the file cannot be read.
        MalformedFrame: it is not a proof file, or its checkpoint is for
            another tree size than its proof.
    """
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PROOF_FILE + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_PROOF_FILE:
        raise MalformedFrame(f"malformed proof file {path}: larger than {MAX_PROOF_FILE} bytes")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedFrame(f"malformed proof file {path}: not JSON") from None
    anchor_obj = obj.pop("anchor", None) if isinstance(obj, dict) else None
    witnessed_obj = obj.pop("witnessed", None) if isinstance(obj, dict) else None
    try:
        proof, checkpoint = InclusionProof.from_json_dict(obj)
        anchor = None if anchor_obj is None else ProofAnchor.from_json(anchor_obj, proof.tree_size)
        witnesses = (
            None
            if witnessed_obj is None
            else ProofWitnesses.from_json(witnessed_obj, proof.tree_size)
        )
    except MalformedFrame as exc:
        raise MalformedFrame(f"malformed proof file {path}: {exc}") from None
    if anchor is not None and anchor.tree_size <= proof.leaf_index:
        raise MalformedFrame(
            f"malformed proof file {path}: its anchor (tree size {anchor.tree_size}) "
            f"does not cover entry {proof.leaf_index}"
        )
    if checkpoint is not None and checkpoint.size != proof.tree_size:
        raise MalformedFrame(
            f"malformed proof file {path}: checkpoint is for tree size {checkpoint.size}, "
            f"the proof for {proof.tree_size}"
        )
    if witnesses is not None and checkpoint is not None and witnesses.origin != checkpoint.origin:
        raise MalformedFrame(
            f"malformed proof file {path}: its cosignatures are of another log "
            f"({witnesses.origin!r}) than its checkpoint ({checkpoint.origin!r})"
        )
    return ProofFile(path, proof, checkpoint, anchor, witnesses)


def checkpoint_signer(checkpoint: Checkpoint, keys: Sequence[NoteKey]) -> str:
    """The name of a trusted key that signed ``checkpoint``.

    Raises:
        SignatureInvalid: a trusted key's signature does not verify, or no
            trusted key signed it.
    """
    for sig in checkpoint.signatures:
        for name, key in keys:
            if name not in (None, sig.name) or note_key_hash(sig.name, key) != sig.key_hash:
                continue
            try:
                checkpoint.verify(key, sig.name)
            except SignatureInvalid as exc:
                raise SignatureInvalid(f"bad checkpoint signature by {sig.name}: {exc}") from None
            return sig.name
    raise SignatureInvalid("the checkpoint is not signed by any trusted key")


def verify_proof_file(
    proof_file: ProofFile,
    *,
    root: bytes | None,
    note_keys: Sequence[NoteKey],
    chain_submitter: str | None = None,
    witness_logs: Mapping[str, KeyLog] | None = None,
) -> ProofVerdict:
    """Check the proof file (:func:`_verify_proof`), then its witnesses' cosignatures
    against ``witness_logs`` (witness agent id -> its key log; the cosignatures of
    witnesses not given are reported ``unchecked``).

    Raises:
        SignatureInvalid: a checkpoint or a cosignature does not verify.
        ConsistencyError: the cosigned tree is not a prefix of the proof's.
        InclusionProofError, AnchorMismatch, ConfigurationError: see :func:`_verify_proof`.
    """
    verdict = _verify_proof(
        proof_file, root=root, note_keys=note_keys, chain_submitter=chain_submitter
    )
    witnessed = proof_file.witnesses
    if witnessed is None:
        return verdict
    size = verdict.proof.tree_size
    checks = witnessed.check(size, verdict.root, witness_logs or {})
    return replace(verdict, witnesses=checks, witnessed_size=witnessed.tree_size)


def _verify_proof(
    proof_file: ProofFile,
    *,
    root: bytes | None,
    note_keys: Sequence[NoteKey],
    chain_submitter: str | None = None,
) -> ProofVerdict:
    """Check the checkpoint (when there are keys) and the proof against the expected root.

    A file with an anchor is checked by :func:`verify_anchored_proof`
    (``chain_submitter`` set: the caller found the anchor on chain).

    The expected root is ``root`` if given, else the checkpoint's. Without
    ``note_keys`` a checkpoint is left ``unchecked``; it can then only stand
    beside a given ``root``.

    Raises:
        SignatureInvalid: the checkpoint is not validly signed by a trusted key.
        InclusionProofError: the proof does not lead to the expected root
            (the message says whether the root or the proof is wrong).
        ConfigurationError: there is no root to check against, or an
            unchecked checkpoint and no ``root``.
    """
    if proof_file.anchor is not None:
        return verify_anchored_proof(
            proof_file, root=root, note_keys=note_keys, chain_submitter=chain_submitter
        )
    proof, checkpoint = proof_file.proof, proof_file.checkpoint
    signer: str | None = None
    state: CheckpointState = "absent"
    if checkpoint is not None:
        if note_keys:
            signer, state = checkpoint_signer(checkpoint, note_keys), "verified"
        elif root is None:
            error = ConfigurationError("no trusted key to check the proof's checkpoint with")
            error.hint = (
                "pass --root HEX, or --verifier-key NAME+HASH+KEY, or run in the agent's home"
            )
            raise error
        else:
            state = "unchecked"
    if root is not None:
        expected = root
    elif checkpoint is not None:
        expected = checkpoint.root
    else:
        raise ConfigurationError("the proof file has no checkpoint: pass --root HEX")
    try:
        proof.verify(expected)
    except InclusionProofError as exc:
        reason = _mismatch_reason(proof, expected, checkpoint, root is not None)
        raise InclusionProofError(f"{reason} ({exc})") from None
    return ProofVerdict(proof, expected, state, signer)


def _leads_to(proof: InclusionProof, expected: bytes) -> bool:
    try:
        proof.verify(expected)
    except InclusionProofError:
        return False
    return True


def _mismatch_reason(
    proof: InclusionProof, expected: bytes, checkpoint: Checkpoint | None, given: bool
) -> str:
    """Why a proof fails: wrong root, or a proof that does not match its own checkpoint."""
    if given and checkpoint is not None and checkpoint.root != expected:
        if _leads_to(proof, checkpoint.root):
            return (
                f"wrong root: the proof leads to its checkpoint's root {checkpoint.root.hex()}, "
                f"not to {expected.hex()}"
            )
        return "corrupted proof: it leads neither to --root nor to its own checkpoint's root"
    if checkpoint is not None:
        return "corrupted proof: it does not lead to the root of its own signed checkpoint"
    return f"the proof does not lead to root {expected.hex()}: wrong root or corrupted proof"


def verify_anchored_proof(
    proof_file: ProofFile,
    *,
    root: bytes | None,
    note_keys: Sequence[NoteKey],
    chain_submitter: str | None = None,
) -> ProofVerdict:
    """Check a proof file that carries an anchor.

    The anchored root vouches for the proof's root through the consistency
    proof; the checkpoint, when there is one, must be of that root and of
    the anchored log. What is trusted: the anchor found on chain
    (``chain_submitter`` given), else ``root`` (the anchored root or the
    proof's), else a checkpoint signed by a trusted key.

    Raises:
        ConsistencyError: the anchored tree is not a prefix of the proof's.
        InclusionProofError: the proof does not lead to the root the anchor
            vouches for, its checkpoint is of another root, or ``root`` is
            neither the anchored root nor the proof's.
        AnchorMismatch: the checkpoint is of another log than the anchor.
        SignatureInvalid: the checkpoint is not validly signed by a trusted key.
        ConfigurationError: nothing trusted to check against.
    """
    proof, checkpoint, anchor = proof_file.proof, proof_file.checkpoint, proof_file.anchor
    assert anchor is not None  # noqa: S101 -- verify_proof_file dispatches on it
    tree_root = anchor.tree_root(proof.tree_size)
    try:
        proof.verify(tree_root)
    except InclusionProofError as exc:
        raise InclusionProofError(
            f"corrupted proof: it does not lead to the root its anchor vouches for ({exc})"
        ) from None
    signer: str | None = None
    state: CheckpointState = "absent"
    if checkpoint is not None:
        if checkpoint.root != tree_root:
            raise InclusionProofError(
                "corrupted proof: its checkpoint's root is not the one its anchor vouches for"
            )
        if anchor.log_id is not None and ProofAnchor.log_id_of(checkpoint.origin) != anchor.log_id:
            raise AnchorMismatch(
                f"the anchor is of another log than the checkpoint's ({checkpoint.origin!r})"
            )
        state = "unchecked"
        if note_keys:
            signer, state = checkpoint_signer(checkpoint, note_keys), "verified"
    anchored: AnchorState = "unchecked"
    if root is not None:
        if root not in (anchor.root, tree_root):
            raise InclusionProofError(
                f"wrong root: the proof leads to {tree_root.hex()}, anchored as "
                f"{anchor.root.hex()} at tree size {anchor.tree_size}, not to {root.hex()}"
            )
        anchored = "root" if root == anchor.root else "unchecked"
    if chain_submitter is not None:
        anchored = "chain"
    if root is None and chain_submitter is None and state != "verified":
        error = ConfigurationError("nothing trusted to check the proof against")
        error.hint = "pass --rpc URL (the anchor's chain), --root HEX or --verifier-key"
        raise error
    return ProofVerdict(proof, tree_root, state, signer, anchor, anchored, chain_submitter)


def anchor_for(log: AuditLog, seq: int, size: int, origin: str | None) -> ProofAnchor | None:
    """The newest final anchor of ``log`` covering entry ``seq`` (proof in the tree of ``size``).

    Read from the log's own ``AUDIT_ANCHORED`` entries (an anchor is final
    when its entry is written); with the consistency proof from the anchored
    tree to ``size`` when they differ. ``origin`` (the checkpoint's) names
    the log on chain. None when no final anchor covers the entry yet.

    Raises:
        StoreCorrupted: the log is damaged.
    """
    covering = [
        entry.data
        for entry in log.query(kind=AuditKind.AUDIT_ANCHORED)
        if seq < entry.data["size"] <= size
    ]
    if not covering:
        return None
    data = covering[-1]
    anchor = ProofAnchor(
        chain_id=data["chain"],
        contract="0x" + bytes(data["contract"]).hex(),
        tx_hash=bytes(data["tx"]),
        block_number=data["block"],
        block_hash=bytes(data["block_hash"]),
        log_id=None if origin is None else ProofAnchor.log_id_of(origin),
        tree_size=data["size"],
        root=bytes(data["root"]),
    )
    if anchor.tree_size == size:
        return anchor
    step = log.prove_consistency(anchor.tree_size, size)
    return replace(anchor, proof_root=log.root_at(size), consistency=step.hashes)
