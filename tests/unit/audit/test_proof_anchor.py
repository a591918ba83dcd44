"""Anchors in proof files: reading them, and what an anchored root vouches for."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from talos.audit import AuditLog, Checkpoint, InclusionProof, LogSigner, leaf_hash, root_from_leaves
from talos.audit.proof_file import (
    ProofAnchor,
    ProofFile,
    anchor_for,
    read_proof_file,
    verify_proof_file,
)
from talos.core.audit.merkle import consistency_proof, inclusion_proof
from talos.core.crypto import SigningKey
from talos.errors import (
    AnchorMismatch,
    ConfigurationError,
    ConsistencyError,
    InclusionProofError,
    MalformedFrame,
)
from talos.testing import FakeClock, SeededRng

LEAVES = [leaf_hash(bytes([i])) for i in range(5)]
ROOT = root_from_leaves(LEAVES)
ROOT3 = root_from_leaves(LEAVES[:3])
PROOF = InclusionProof(2, 5, LEAVES[2], tuple(inclusion_proof(2, LEAVES)))
SIGNER = LogSigner(SigningKey.generate(SeededRng(1)), name="alice", origin="alice/audit")
KEYS = [(None, SIGNER.public_key)]
ANCHOR = ProofAnchor(
    chain_id=31337,
    contract="0x" + "ab" * 20,
    tx_hash=b"\x01" * 32,
    block_number=7,
    block_hash=b"\x02" * 32,
    log_id=ProofAnchor.log_id_of("alice/audit"),
    tree_size=3,
    root=ROOT3,
    proof_root=ROOT,
    consistency=tuple(consistency_proof(3, LEAVES)),
)


def _file(tmp_path: Path, anchor: ProofAnchor | dict[str, Any], checkpoint: bool = True) -> Path:
    document = PROOF.to_json_dict(Checkpoint.sign(SIGNER, 5, ROOT) if checkpoint else None)
    document["anchor"] = anchor if isinstance(anchor, dict) else anchor.to_json()
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(document))
    return path


def test_an_anchor_reads_back_and_vouches_for_the_proofs_root(tmp_path: Path) -> None:
    read = read_proof_file(_file(tmp_path, ANCHOR))
    assert read.anchor == ANCHOR
    verdict = verify_proof_file(read, root=None, note_keys=KEYS)
    assert (verdict.root, verdict.checkpoint) == (ROOT, "verified")
    assert verdict.anchor_state == "unchecked"
    # The anchored root is a root to check against, without any key.
    given = verify_proof_file(read, root=ROOT3, note_keys=[])
    assert (given.checkpoint, given.anchor_state) == ("unchecked", "root")
    assert verify_proof_file(read, root=ROOT, note_keys=[]).anchor_state == "unchecked"
    on_chain = verify_proof_file(read, root=None, note_keys=[], chain_submitter="0xabc")
    assert on_chain.anchor_state == "chain"
    assert on_chain.to_json()["anchored"]["submitter"] == "0xabc"


def test_an_anchor_of_the_proofs_own_tree_needs_no_consistency(tmp_path: Path) -> None:
    same = replace(ANCHOR, tree_size=5, root=ROOT, proof_root=None, consistency=())
    assert "consistency" not in same.to_json()
    read = read_proof_file(_file(tmp_path, same, checkpoint=False))
    assert verify_proof_file(read, root=ROOT, note_keys=[]).anchor_state == "root"


def test_a_wrong_root_names_both_roots(tmp_path: Path) -> None:
    read = read_proof_file(_file(tmp_path, ANCHOR))
    with pytest.raises(InclusionProofError, match="wrong root") as caught:
        verify_proof_file(read, root=b"\x09" * 32, note_keys=KEYS)
    assert ROOT3.hex() in str(caught.value)
    assert ROOT.hex() in str(caught.value)


def test_an_anchor_that_is_not_a_prefix_of_the_proofs_tree_is_refused(tmp_path: Path) -> None:
    forged = replace(ANCHOR, root=root_from_leaves([leaf_hash(b"x")] * 3))
    read = read_proof_file(_file(tmp_path, forged))
    with pytest.raises(ConsistencyError):
        verify_proof_file(read, root=None, note_keys=KEYS)


def test_a_checkpoint_of_another_log_contradicts_the_anchor(tmp_path: Path) -> None:
    other = replace(ANCHOR, log_id=ProofAnchor.log_id_of("mallory/audit"))
    read = read_proof_file(_file(tmp_path, other))
    with pytest.raises(AnchorMismatch, match="another log"):
        verify_proof_file(read, root=None, note_keys=KEYS)


def test_a_checkpoint_of_another_root_than_the_anchors_is_corrupted(tmp_path: Path) -> None:
    read = read_proof_file(_file(tmp_path, ANCHOR))
    moved = ProofFile(read.path, read.proof, Checkpoint.sign(SIGNER, 5, b"\x03" * 32), ANCHOR)
    with pytest.raises(InclusionProofError, match="checkpoint's root"):
        verify_proof_file(moved, root=None, note_keys=KEYS)


def test_nothing_trusted_is_a_configuration_error(tmp_path: Path) -> None:
    read = read_proof_file(_file(tmp_path, ANCHOR, checkpoint=False))
    with pytest.raises(ConfigurationError, match="nothing trusted"):
        verify_proof_file(read, root=None, note_keys=[])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tx": "0x12"}, "anchor.tx must be 32 bytes"),
        ({"chain_id": "1"}, "anchor.chain_id"),
        ({"chain_id": -1}, "not a uint64"),
        ({"contract": "0xzz"}, "anchor.contract"),
        ({"tree_size": 6}, "past the proof's tree size"),
        ({"tree_size": 2}, "does not cover entry 2"),
        ({"consistency": None}, "needed exactly when"),
        ({"consistency": {"hashes": []}}, "needs proof_root and hashes"),
        ({"root": None}, "anchor.root"),
    ],
)
def test_malformed_anchors_say_why(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    anchor = {**ANCHOR.to_json(), **change}
    anchor = {key: value for key, value in anchor.items() if value is not None}
    with pytest.raises(MalformedFrame, match=reason):
        read_proof_file(_file(tmp_path, anchor))


def test_an_anchor_that_is_not_an_object_is_malformed(tmp_path: Path) -> None:
    path = _file(tmp_path, ANCHOR)
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "anchor": [1]}))
    with pytest.raises(MalformedFrame, match="anchor must be a JSON object"):
        read_proof_file(path)


def test_anchor_for_picks_the_newest_final_anchor_covering_the_entry(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "audit", signer=SIGNER, clock=FakeClock()) as log:
        for i in range(3):
            log.append("MESSAGE_SENT", {"n": i})

        def anchored(size: int) -> None:
            log.append(
                "AUDIT_ANCHORED",
                {"chain": 31337, "contract": b"\xab" * 20, "tx": bytes([size]) * 32,
                 "block": size, "block_hash": b"\x02" * 32, "size": size,
                 "root": log.root_at(size)},
            )  # fmt: skip

        assert anchor_for(log, 0, log.size, "alice/audit") is None
        anchored(2)  # entry 3
        anchored(4)  # entry 4, covering entries 0..3
        first = anchor_for(log, 0, log.size, "alice/audit")
        assert first is not None
        assert (first.tree_size, first.tx_hash, first.proof_root) == (4, b"\x04" * 32, log.root())
        assert first.tree_root(log.size) == log.root()
        assert first.log_id == ProofAnchor.log_id_of("alice/audit")
        assert anchor_for(log, 4, log.size, None) is None  # entry 4 is newer than every anchor
        exact = anchor_for(log, 0, 4, None)
        assert exact is not None
        assert (exact.proof_root, exact.consistency, exact.log_id) == (None, (), None)
