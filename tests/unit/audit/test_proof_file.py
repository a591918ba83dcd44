"""talos.audit.proof_file: reading proof files and checking them against roots and keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from talos.audit import Checkpoint, InclusionProof, LogSigner, leaf_hash, root_from_leaves
from talos.audit.proof_file import (
    MAX_PROOF_FILE,
    NoteKey,
    ProofFile,
    checkpoint_signer,
    read_proof_file,
    verify_proof_file,
)
from talos.core.audit.merkle import inclusion_proof
from talos.core.crypto import SigningKey
from talos.errors import ConfigurationError, InclusionProofError, MalformedFrame, SignatureInvalid
from talos.testing import SeededRng

LEAVES = [leaf_hash(bytes([i])) for i in range(5)]
ROOT = root_from_leaves(LEAVES)
OTHER_ROOT = root_from_leaves(LEAVES[:4] + [leaf_hash(b"other")])
PROOF = InclusionProof(2, 5, LEAVES[2], tuple(inclusion_proof(2, LEAVES)))
KEY = SigningKey.generate(SeededRng(1))
STRANGER = SigningKey.generate(SeededRng(2))
SIGNER = LogSigner(KEY, name="alice", origin="alice/audit")


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _signed(root: bytes = ROOT, size: int = 5) -> Checkpoint:
    return Checkpoint.sign(SIGNER, size, root)


# -- reading -------------------------------------------------------------------------------


def test_a_written_proof_reads_back_with_its_checkpoint(tmp_path: Path) -> None:
    checkpoint = _signed()
    read = read_proof_file(_write(tmp_path / "p.json", PROOF.to_json_dict(checkpoint)))
    assert read.proof == PROOF
    assert read.checkpoint == checkpoint
    bare = read_proof_file(_write(tmp_path / "q.json", PROOF.to_json_dict()))
    assert bare.checkpoint is None


def test_unreadable_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        read_proof_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "proof must be a JSON object"),
        (b" " * (MAX_PROOF_FILE + 1), "larger than"),
    ],
)
def test_malformed_files_say_why(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.raises(MalformedFrame, match=reason) as caught:
        read_proof_file(path)
    assert str(path) in str(caught.value)


def test_a_checkpoint_for_another_tree_size_is_malformed(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.json", PROOF.to_json_dict(_signed(size=6)))
    with pytest.raises(MalformedFrame, match="checkpoint is for tree size 6, the proof for 5"):
        read_proof_file(path)


# -- checkpoint signatures -------------------------------------------------------------------


def test_checkpoint_signer_names_the_trusted_key() -> None:
    assert checkpoint_signer(_signed(), [(None, KEY.public_key)]) == "alice"
    assert checkpoint_signer(_signed(), [("alice", KEY.public_key)]) == "alice"


@pytest.mark.parametrize(
    "keys",
    [[], [(None, STRANGER.public_key)], [("bob", KEY.public_key)]],
)
def test_an_untrusted_checkpoint_is_refused(keys: list[NoteKey]) -> None:
    with pytest.raises(SignatureInvalid, match="not signed by any trusted key"):
        checkpoint_signer(_signed(), keys)


def test_a_forged_signature_by_a_trusted_key_is_refused() -> None:
    genuine = _signed()
    forged = Checkpoint(genuine.origin, genuine.size, OTHER_ROOT, (), genuine.signatures)
    with pytest.raises(SignatureInvalid, match="bad checkpoint signature by alice"):
        checkpoint_signer(forged, [(None, KEY.public_key)])


# -- verification ----------------------------------------------------------------------------


def test_verified_against_the_signed_checkpoint() -> None:
    verdict = verify_proof_file(
        ProofFile(Path("p"), PROOF, _signed()), root=None, note_keys=[(None, KEY.public_key)]
    )
    assert (verdict.root, verdict.checkpoint, verdict.checkpoint_signer) == (
        ROOT,
        "verified",
        "alice",
    )
    assert verdict.to_json() == {
        "valid": True,
        "leaf_index": 2,
        "tree_size": 5,
        "leaf_hash": LEAVES[2].hex(),
        "root": ROOT.hex(),
        "checkpoint": "verified",
        "checkpoint_signer": "alice",
    }


def test_without_keys_a_checkpoint_is_unchecked_beside_a_given_root() -> None:
    verdict = verify_proof_file(ProofFile(Path("p"), PROOF, _signed()), root=ROOT, note_keys=[])
    assert (verdict.checkpoint, verdict.checkpoint_signer) == ("unchecked", None)
    bare = verify_proof_file(ProofFile(Path("p"), PROOF, None), root=ROOT, note_keys=[])
    assert bare.checkpoint == "absent"


def test_no_root_to_check_against_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no trusted key") as caught:
        verify_proof_file(ProofFile(Path("p"), PROOF, _signed()), root=None, note_keys=[])
    assert "--verifier-key" in caught.value.hint
    with pytest.raises(ConfigurationError, match="has no checkpoint: pass --root HEX"):
        verify_proof_file(ProofFile(Path("p"), PROOF, None), root=None, note_keys=[])


def test_a_wrong_root_is_told_from_a_corrupted_proof() -> None:
    keys = [(None, KEY.public_key)]
    with pytest.raises(InclusionProofError, match="wrong root: the proof leads to its checkpoint"):
        verify_proof_file(ProofFile(Path("p"), PROOF, _signed()), root=OTHER_ROOT, note_keys=keys)
    broken = InclusionProof(2, 5, LEAVES[3], PROOF.hashes)
    with pytest.raises(InclusionProofError, match="leads neither to --root nor"):
        verify_proof_file(ProofFile(Path("p"), broken, _signed()), root=OTHER_ROOT, note_keys=keys)
    with pytest.raises(InclusionProofError, match="root of its own signed checkpoint"):
        verify_proof_file(ProofFile(Path("p"), broken, _signed()), root=None, note_keys=keys)
    with pytest.raises(InclusionProofError, match="wrong root or corrupted proof"):
        verify_proof_file(ProofFile(Path("p"), PROOF, None), root=OTHER_ROOT, note_keys=[])


def test_the_signature_is_checked_before_the_proof() -> None:
    with pytest.raises(SignatureInvalid):
        verify_proof_file(
            ProofFile(Path("p"), PROOF, _signed()),
            root=OTHER_ROOT,
            note_keys=[(None, STRANGER.public_key)],
        )
