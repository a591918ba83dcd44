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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from talos.audit import Checkpoint, InclusionProof, note_key_hash
from talos.core.crypto import VerifyKey
from talos.errors import ConfigurationError, InclusionProofError, MalformedFrame, SignatureInvalid

__all__ = [
    "MAX_PROOF_FILE",
    "NoteKey",
    "ProofFile",
    "ProofVerdict",
    "checkpoint_signer",
    "read_proof_file",
    "verify_proof_file",
]

#: Largest proof file read (a proof holds at most 128 hashes).
MAX_PROOF_FILE: Final = 1 << 20

#: A trusted checkpoint key: the signer name it must carry (None: any name) and the key.
NoteKey = tuple[str | None, VerifyKey]

CheckpointState = Literal["verified", "unchecked", "absent"]


@dataclass(frozen=True)
class ProofFile:
    """A parsed proof file: the proof, and the checkpoint for its tree size if any."""

    path: Path
    proof: InclusionProof
    checkpoint: Checkpoint | None


@dataclass(frozen=True)
class ProofVerdict:
    """A proof that verified, and how far its checkpoint was checked."""

    proof: InclusionProof
    root: bytes
    checkpoint: CheckpointState
    checkpoint_signer: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "valid": True,
            "leaf_index": self.proof.leaf_index,
            "tree_size": self.proof.tree_size,
            "leaf_hash": self.proof.leaf_hash.hex(),
            "root": self.root.hex(),
            "checkpoint": self.checkpoint,
            "checkpoint_signer": self.checkpoint_signer,
        }


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
    try:
        proof, checkpoint = InclusionProof.from_json_dict(obj)
    except MalformedFrame as exc:
        raise MalformedFrame(f"malformed proof file {path}: {exc}") from None
    if checkpoint is not None and checkpoint.size != proof.tree_size:
        raise MalformedFrame(
            f"malformed proof file {path}: checkpoint is for tree size {checkpoint.size}, "
            f"the proof for {proof.tree_size}"
        )
    return ProofFile(path, proof, checkpoint)


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
    proof_file: ProofFile, *, root: bytes | None, note_keys: Sequence[NoteKey]
) -> ProofVerdict:
    """Check the checkpoint (when there are keys) and the proof against the expected root.

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
