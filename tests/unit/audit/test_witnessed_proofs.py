"""talos.audit.witnessed: the witnesses' cosignatures in proof files, on a real log."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talos.audit import AuditKind, AuditLog
from talos.audit.proof_file import read_proof_file, verify_proof_file
from talos.audit.witnessed import ProofWitnesses, witnesses_for
from talos.client.own_keys import audit_signer
from talos.core.audit.checkpoint import Checkpoint
from talos.core.audit.cosignature import Cosignature
from talos.core.identity import Identity
from talos.errors import ConsistencyError, MalformedFrame, SignatureInvalid
from talos.testing import FakeClock, SeededRng

ORIGIN = Identity.create("origin", rng=SeededRng(1), clock=FakeClock())
WITNESS = Identity.create("witness", rng=SeededRng(2), clock=FakeClock())
OTHER = Identity.create("other", rng=SeededRng(3), clock=FakeClock())
SIGNER = audit_signer(ORIGIN)


def _cosign(log: AuditLog, witness: Identity, size: int) -> None:
    """What the origin stores when ``witness`` cosigned its tree of ``size``."""
    root = log.root_at(size)
    body = Checkpoint(SIGNER.origin, size, root).body()
    cosig = Cosignature.sign(
        body, witness=witness.agent_id, key_sequence=0, key=witness.signing_key, timestamp=1700
    )
    data = {"size": size, "root": root, "ks": 0, "ts": 1700, "sig": cosig.signature}
    log.append(AuditKind.CHECKPOINT_COSIGNED, data, peer=witness.agent_id)


def _proof_file(tmp_path: Path, seq: int = 1) -> tuple[Path, ProofWitnesses | None]:
    with AuditLog.open(tmp_path / "audit", signer=SIGNER, clock=FakeClock()) as log:
        for n in range(4):
            log.append("NOTE", {"n": n})
        _cosign(log, WITNESS, 4)
        _cosign(log, OTHER, 4)
        log.append("NOTE", {"n": 9})
        size = log.size
        checkpoint = Checkpoint.sign(SIGNER, size, log.root_at(size))
        document = log.prove_inclusion(seq, size=size).to_json_dict(checkpoint)
        witnessed = witnesses_for(log, seq, size, SIGNER.origin)
    if witnessed is not None:
        document["witnessed"] = witnessed.to_json()
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(document))
    return path, witnessed


def _edit(path: Path, change: Any) -> Path:
    document = json.loads(path.read_text())
    change(document["witnessed"])
    path.write_text(json.dumps(document))
    return path


def test_a_proof_carries_the_cosignatures_of_the_newest_cosigned_tree(tmp_path: Path) -> None:
    path, witnessed = _proof_file(tmp_path)
    assert witnessed is not None
    assert (witnessed.tree_size, len(witnessed.cosignatures)) == (4, 2)
    read = read_proof_file(path)
    assert read.witnesses == witnessed
    verdict = verify_proof_file(
        read, root=None, note_keys=[(None, ORIGIN.signing_key.public_key)],
        witness_logs={WITNESS.agent_id: WITNESS.keylog},
    )  # fmt: skip
    states = {c.cosignature.witness: c.state for c in verdict.witnesses}
    assert states == {WITNESS.agent_id: "verified", OTHER.agent_id: "unchecked"}
    assert verdict.to_json()["witnessed_size"] == 4


def test_an_entry_no_cosigned_tree_covers_gets_none(tmp_path: Path) -> None:
    _, witnessed = _proof_file(tmp_path, seq=5)
    assert witnessed is None


def test_a_proof_file_without_cosignatures_reads_and_verifies_as_before(tmp_path: Path) -> None:
    path, _ = _proof_file(tmp_path)
    document = json.loads(path.read_text())
    del document["witnessed"]
    path.write_text(json.dumps(document))
    verdict = verify_proof_file(
        read_proof_file(path), root=None, note_keys=[(None, ORIGIN.signing_key.public_key)]
    )
    assert verdict.witnesses == ()
    assert "witnesses" not in verdict.to_json()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda w: w["cosignatures"][0].update(timestamp=1701), SignatureInvalid, "bad cosig"),
        (lambda w: w.update(root="00" * 32), ConsistencyError, "consisten|root"),
        (lambda w: w["consistency"].pop(), ConsistencyError, "proof|consisten"),
    ],
)
def test_a_tampered_witness_record_fails(
    tmp_path: Path, change: Any, error: type[Exception], match: str
) -> None:
    path, _ = _proof_file(tmp_path)
    read = read_proof_file(_edit(path, change))
    with pytest.raises(error, match=match):
        verify_proof_file(
            read, root=None, note_keys=[(None, ORIGIN.signing_key.public_key)],
            witness_logs={WITNESS.agent_id: WITNESS.keylog, OTHER.agent_id: OTHER.keylog},
        )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda w: w.update(origin="someone/audit"), "another log"),
        (lambda w: w.update(tree_size=99), "past the proof"),
        (lambda w: w.pop("consistency"), "exactly when the sizes differ"),
        (lambda w: w.update(cosignatures=[]), "1 to 64"),
        (lambda w: w["cosignatures"][0].update(sig="zz"), "sig"),
        (lambda w: w["cosignatures"][0].update(witness="nobody"), "agent id"),
        (lambda w: w.update(extra=1), "needs origin"),
    ],
)
def test_malformed_witness_records_say_why(tmp_path: Path, change: Any, match: str) -> None:
    path, _ = _proof_file(tmp_path)
    with pytest.raises(MalformedFrame, match=match):
        read_proof_file(_edit(path, change))


def test_a_witness_key_the_witness_log_lacks_is_refused(tmp_path: Path) -> None:
    path, witnessed = _proof_file(tmp_path)
    assert witnessed is not None
    shifted = dataclasses.replace(
        witnessed,
        cosignatures=tuple(dataclasses.replace(c, key_sequence=3) for c in witnessed.cosignatures),
    )
    with pytest.raises(SignatureInvalid, match="not a valid key"):
        shifted.check(6, _root_of(path), {WITNESS.agent_id: WITNESS.keylog})


def _root_of(path: Path) -> bytes:
    return Checkpoint.parse(json.loads(path.read_text())["checkpoint"]).root


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=14), inner),
    max_leaves=20,
)


@given(
    st.fixed_dictionaries(
        {"origin": _JSON, "tree_size": _JSON, "root": _JSON, "cosignatures": _JSON},
        optional={"consistency": _JSON},
    )
    | _JSON
)
@settings(max_examples=300, deadline=None)
def test_witness_records_raise_only_malformed_frame(obj: Any) -> None:
    try:
        ProofWitnesses.from_json(obj, 10)
    except MalformedFrame:
        pass
