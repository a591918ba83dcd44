"""The origin's check of a witness's answer to a head query (talos.core.audit.head_query)."""

from __future__ import annotations

import pytest

from talos.core.audit.checkpoint import Checkpoint
from talos.core.audit.cosignature import Cosignature, origin_of
from talos.core.audit.head_query import check_head_answer
from talos.core.identity import Identity
from talos.errors import MalformedFrame, SignatureInvalid
from talos.testing import FakeClock, SeededRng

ROOT = bytes(range(32))


def _witness(seed: int) -> Identity:
    return Identity.create("witness", rng=SeededRng(seed), clock=FakeClock())


def _cosign(witness: Identity, origin: str, size: int, root: bytes) -> bytes:
    body = Checkpoint(origin_of(origin), size, root).body()
    return Cosignature.sign(
        body,
        witness=witness.agent_id,
        key_sequence=witness.sequence,
        key=witness.signing_key,
        timestamp=1000,
    ).to_bytes()


def test_a_good_answer_gives_the_head() -> None:
    witness = _witness(1)
    head = check_head_answer("alice", witness.keylog, 7, ROOT, _cosign(witness, "alice", 7, ROOT))
    assert (head.witness, head.size, head.root) == (witness.agent_id, 7, ROOT)


@pytest.mark.parametrize("what", ["size", "root", "origin", "other-witness", "garbage", "short"])
def test_a_bad_answer_is_refused(what: str) -> None:
    witness, other = _witness(1), _witness(2)
    good = _cosign(witness, "alice", 7, ROOT)
    size, root, cosig = 7, ROOT, good
    if what == "size":
        size = 8
    elif what == "root":
        root = bytes(32)
    elif what == "origin":
        cosig = _cosign(witness, "mallory", 7, ROOT)
    elif what == "other-witness":
        cosig = _cosign(other, "alice", 7, ROOT)
    elif what == "garbage":
        cosig = b"\xa1av\x01"
    else:
        root = ROOT[:31]
    with pytest.raises((SignatureInvalid, MalformedFrame)):
        check_head_answer("alice", witness.keylog, size, root, cosig)


def test_a_cosignature_by_a_revoked_key_is_refused() -> None:
    witness = _witness(1)
    old = _cosign(witness, "alice", 7, ROOT)
    rotated = witness.rotate(
        rng=SeededRng(3), clock=FakeClock(), reason="lost", emergency=True, revoke_old=True
    )
    with pytest.raises(SignatureInvalid, match="not a valid key"):
        check_head_answer("alice", rotated.keylog, 7, ROOT, old)
