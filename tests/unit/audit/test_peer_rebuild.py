"""Rebuilding from mirrors (talos.audit.peer_rebuild): what verifies, and the log it writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.audit.peer_rebuild import (
    MirrorInvalid,
    PeerLog,
    TrustedRoot,
    check_roots,
    roots_of,
    write_entries,
)
from talos.core.audit.checkpoint import Checkpoint, LogSigner
from talos.core.crypto import SigningKey, VerifyKey
from talos.core.identity import Identity
from talos.core.mirror import Entries
from talos.errors import VerificationError
from talos.testing import FakeClock, SeededRng

ORIGIN = "alice-origin"
KEY = SigningKey(bytes(range(32)))
SIGNER = LogSigner(KEY, ORIGIN, f"{ORIGIN}/audit")


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    opened = AuditLog.open(
        tmp_path / "origin", signer=SIGNER, commit_thread=False, block_entries=16
    )
    for n in range(50):
        opened.append("MESSAGE_SENT", {"n": n}, peer="bob")
    yield opened
    opened.close()


def served(log: AuditLog, start: int, end: int, signer: LogSigner = SIGNER) -> Entries:
    entries = tuple(e.to_bytes() for e in log.entries(start, end))
    return Entries(start, entries, Checkpoint.sign(signer, end, log.root_at(end)), 50)


def test_verified_stretches_rebuild_the_same_log_and_proofs(tmp_path: Path, log: AuditLog) -> None:
    copy = PeerLog(ORIGIN, "bob", [KEY.public_key])
    for start in range(0, 50, 20):
        copy.add(served(log, start, min(start + 20, 50)))
    assert (copy.size, copy.root) == (50, log.root())
    proof = log.prove_inclusion(7, size=30)
    size, root = write_entries(tmp_path / "rebuilt", copy.entries, signer=SIGNER, clock=FakeClock())
    assert (size, root) == (50, log.root())
    with AuditLog.open(tmp_path / "rebuilt", signer=SIGNER) as rebuilt:
        assert rebuilt.verify_chain(trusted_keys=[KEY.public_key]).problem is None
        assert rebuilt.prove_inclusion(7, size=30) == proof
        proof.verify(rebuilt.root_at(30))
        assert rebuilt.query(peer="bob", last=1)[0].seq == 49  # the index was rebuilt too
        # The log continues: a new entry extends the rebuilt tree.
        rebuilt.append("MESSAGE_SENT", {"n": 50}, peer="bob")
        rebuilt.prove_consistency(50).verify(log.root(), rebuilt.root())


@pytest.mark.parametrize(
    "what", ["flip", "reorder", "wrong-key", "gap", "other-origin", "truncated"]
)
def test_a_stretch_that_does_not_verify_names_the_mirror(log: AuditLog, what: str) -> None:
    copy = PeerLog(ORIGIN, "mallory", [KEY.public_key])
    copy.add(served(log, 0, 10))
    good = served(log, 10, 20)
    entries = list(good.entries)
    bad = good
    if what == "flip":
        # The last byte of the entry's time: it still decodes; only the root differs.
        entries[3] = entries[3][:-4] + bytes([entries[3][-4] ^ 1]) + entries[3][-3:]
        bad = Entries(10, tuple(entries), good.checkpoint, 50)
    elif what == "reorder":
        entries[0], entries[1] = entries[1], entries[0]
        bad = Entries(10, tuple(entries), good.checkpoint, 50)
    elif what == "wrong-key":
        bad = served(log, 10, 20, LogSigner(SigningKey(bytes(32)), ORIGIN, f"{ORIGIN}/audit"))
    elif what == "gap":
        bad = served(log, 12, 20)
    elif what == "truncated":
        # The last entry cut off, the checkpoint (of 20 entries) kept.
        bad = Entries(10, tuple(entries[:-1]), good.checkpoint, 50)
    else:
        bad = served(log, 10, 20, LogSigner(KEY, ORIGIN, "someone/audit"))
    with pytest.raises(MirrorInvalid) as invalid:
        copy.add(bad)
    assert invalid.value.mirror == "mallory"
    assert copy.size == 10  # nothing of the bad stretch kept


def test_trusted_roots_are_checked_and_those_beyond_are_a_loss(log: AuditLog) -> None:
    entries = [e.to_bytes() for e in log.entries(0, 30)]
    root_at = roots_of(entries)
    good = TrustedRoot(20, log.root_at(20), "watermark")
    beyond = TrustedRoot(40, log.root_at(40), "watermark")
    assert check_roots([good, beyond], 30, root_at) == [beyond]
    with pytest.raises(VerificationError, match="witness"):
        check_roots([TrustedRoot(20, log.root_at(21), "witness")], 30, root_at)


def test_a_copy_ending_on_a_rotated_away_key_is_not_trusted(log: AuditLog) -> None:
    old = Identity.create("alice", rng=SeededRng(1), clock=FakeClock())
    new = old.rotate(rng=SeededRng(2), clock=FakeClock())
    keys = [VerifyKey(event.signing_key) for event in new.keylog.events]
    signer_old = LogSigner(old.signing_key, ORIGIN, f"{ORIGIN}/audit")
    signer_new = LogSigner(new.signing_key, ORIGIN, f"{ORIGIN}/audit")
    copy = PeerLog(ORIGIN, "bob", keys, current=new.sequence)
    copy.add(served(log, 0, 20, signer_old))
    assert copy.retired_end is not None
    assert "rotated away" in copy.retired_end
    copy.add(served(log, 20, 30, signer_new))
    assert copy.retired_end is None  # the newest checkpoint is by the current key
    copy.add(served(log, 30, 40, signer_old))  # a later batch by the old key again
    assert copy.retired_end is not None
    # Without a current key named (the older callers), nothing is refused.
    assert PeerLog(ORIGIN, "bob", keys).retired_end is None
