"""Pruning an anchored audit log (``prune_after_anchor``) on real LMDB files.

The anchor here is the ``AUDIT_ANCHORED`` entry the anchoring driver writes
when an anchor is final (the chain itself is in test_cli_prune_anchor.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lmdb
import pytest

from talos.audit import (
    AuditFull,
    AuditLog,
    EntryPruned,
    LogSigner,
    PrunedEntry,
    PruneStep,
    verify_consistency,
)
from talos.audit.config import AuditConfig
from talos.audit.recovery import rebuild
from talos.core.crypto import SigningKey
from talos.errors import StoreCorrupted
from talos.storage.lmdb import u64
from talos.testing import FakeClock

PEER = "peer-a"


def _open(path: Path, clock: FakeClock, **options: Any) -> AuditLog:
    options.setdefault("block_entries", 64)
    return AuditLog.open(path, clock=clock, commit_thread=False, **options)


def _fill(log: AuditLog, n: int, *, peer: str | None = PEER) -> None:
    log.append_many(("MESSAGE_SENT", {"n": i, "hash": os.urandom(32)}, peer) for i in range(n))


def _anchor(log: AuditLog, size: int | None = None, root: bytes | None = None) -> int:
    """What the anchoring driver writes when an anchor of ``size`` became final."""
    size = log.size if size is None else size
    data = {
        "chain": 31337,
        "contract": b"\x22" * 20,
        "tx": b"\x11" * 32,
        "block": 9,
        "block_hash": b"\x33" * 32,
        "size": size,
        "root": log.root_at(size) if root is None else root,
    }
    return log.append("AUDIT_ANCHORED", data)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_pruning_drops_payloads_under_the_anchor_and_keeps_the_tree(
    tmp_path: Path, clock: FakeClock
) -> None:
    key = SigningKey(bytes(range(32)))
    signer = LogSigner(key, "test", "test/audit")
    with _open(tmp_path / "log", clock, signer=signer) as log:
        _fill(log, 640)
        old_root, old_size = log.root(), log.size
        old_proof = log.prove_inclusion(5)
        anchor_seq = _anchor(log)
        steps = log.prune_anchored(limit=200)
        # Four steps of at most 200 payloads, each with its own AUDIT_PRUNED entry.
        assert [step.entries for step in steps] == [200, 200, 200, 40]
        assert [step.seq for step in steps] == [641, 642, 643, 644]
        assert log.pruning().below == 640
        assert log.pruning().entries == 640
        record = log.query(kind="AUDIT_PRUNED")[0].data
        assert (record["from"], record["to"], record["entries"]) == (0, 200, 200)
        assert (record["anchor_seq"], record["anchor_size"]) == (anchor_seq, 640)
        assert record["anchor_root"] == old_root
        # The tree is whole: old proofs verify, new ones are made, the root at the anchor holds.
        old_proof.verify(old_root)
        assert log.root_at(old_size) == old_root
        proof = log.prove_inclusion(5)
        proof.verify(log.root())
        assert proof.leaf_hash == old_proof.leaf_hash
        step = log.prove_consistency(old_size)
        verify_consistency(old_size, log.size, step.hashes, old_root, log.root())
        # Entries are gone; rows say so.
        with pytest.raises(EntryPruned, match="entry 5 was pruned") as caught:
            log.entry(5)
        assert caught.value.leaf == old_proof.leaf_hash
        rows = list(log.rows(4, 6))
        assert rows == [PrunedEntry(4, rows[0].leaf), PrunedEntry(5, old_proof.leaf_hash)]
        with pytest.raises(EntryPruned):
            list(log.entries())
        report = log.verify_chain(trusted_keys=[key.public_key], deep=True)
        assert report.ok, report.problem
        assert (report.pruned, report.pruned_below, report.entries) == (640, 640, 645)
        # Nothing more to do: no AUDIT_PRUNED for nothing.
        assert log.prune_anchored() == []
        # Appending goes on, also after a reopen.
        _fill(log, 10)
    with _open(tmp_path / "log", clock, signer=signer) as log:
        _fill(log, 10)
        assert log.verify_chain(trusted_keys=[key.public_key]).ok
        assert log.entry(log.size - 1).kind == "MESSAGE_SENT"


def test_queries_skip_pruned_entries_and_keep_the_anchors(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 128)
        start = int(clock.time() * 1000)
        clock.advance(10)
        _anchor(log)
        clock.advance(10)
        _fill(log, 5)
        log.prune_anchored()
        after = log.query()
        assert [e.kind for e in after[:2]] == ["AUDIT_ANCHORED", "MESSAGE_SENT"]
        assert [e.seq for e in after] == [128, *range(129, 134), 134]
        assert len(log.query(kind="MESSAGE_SENT")) == 5
        assert len(log.query(peer=PEER)) == 5
        assert [e.seq for e in log.query(last=2)] == [133, 134]
        assert [e.seq for e in log.query(kind="AUDIT_ANCHORED")] == [128]
        # Time filters: the kept anchor below the pruning point is found by its time.
        assert [e.seq for e in log.query(kind="AUDIT_ANCHORED", since=start)] == [128]
        assert log.query(kind="AUDIT_ANCHORED", until=start) == []
        assert [e.seq for e in log.query(until=int(clock.time() * 1000))] == [128]
        assert [
            e.seq for e in log.query(since=int(clock.time() * 1000), kind="MESSAGE_SENT")
        ] == list(range(129, 134))


def test_never_past_the_anchor_nor_the_last_sealed_block(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 100)  # one block of 64 sealed
        _anchor(log, 90)
        [step] = log.prune_anchored()
        assert (step.start, step.end, step.entries) == (0, 64, 64)
        log.entry(64)  # past the last block: kept
        log.seal_block()
        [step] = log.prune_anchored()
        assert (step.start, step.end) == (64, 90)
        log.entry(90)  # past the anchor: kept
        with pytest.raises(EntryPruned):
            log.entry(89)


def test_a_hold_keeps_what_the_mirrors_have_not_acknowledged(
    tmp_path: Path, clock: FakeClock
) -> None:
    mirrored = [10]
    with _open(tmp_path / "log", clock) as log:
        log.hold_pruning(lambda: mirrored[0])
        _fill(log, 64)  # one block sealed
        _anchor(log, 64)
        [step] = log.prune_anchored()
        assert (step.start, step.end) == (0, 10)
        log.entry(10)  # not acknowledged by every mirror: kept
        mirrored[0] = 64
        [step] = log.prune_anchored()
        assert (step.start, step.end) == (10, 64)


def test_no_anchor_or_an_anchor_of_another_root_prunes_nothing(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 64)
        assert log.prune_anchored() == []
        _anchor(log, 64, root=b"\x99" * 32)
        with caplog.at_level(logging.WARNING, logger="talos.audit"):
            assert log.prune_anchored() == []
        assert [r.event for r in caplog.records] == ["audit_prune_refused"]  # type: ignore[attr-defined]
        assert "not the log's root" in caplog.records[0].getMessage()
        assert log.pruning().entries == 0
        log.entry(0)


def test_a_log_opened_with_prune_after_anchor_prunes_before_it_is_full(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 1 << 20

    def fill_until_full(log: AuditLog, anchor_at: int | None) -> int:
        appended = 0
        while True:
            if anchor_at is not None and appended >= anchor_at:
                log.seal_block()
                _anchor(log)
                anchor_at = None
            try:
                _fill(log, 20)
            except AuditFull:
                return appended
            appended += 20

    with _open(tmp_path / "plain", clock, max_size_bytes=limit) as log:
        held = fill_until_full(log, None)
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="talos.audit"),
        _open(tmp_path / "pruned", clock, max_size_bytes=limit, prune_after_anchor=True) as log,
    ):
        assert log.prune_after_anchor
        pruned_log_held = fill_until_full(log, held // 2)
        assert log.pruning().entries >= held // 2
        assert log.verify_chain().ok
    # The anchored half was pruned to make room: the log held far more.
    assert pruned_log_held > held * 1.2, (held, pruned_log_held)
    events = [(r.event, getattr(r, "reason", None)) for r in caplog.records]  # type: ignore[attr-defined]
    assert ("audit_pruned", "space") in events
    # Full once more (nothing anchored left): then, and only then, AuditFull's warning.
    assert events[-1] == ("audit_full", None)
    assert ("audit_full", None) not in events[: events.index(("audit_pruned", "space"))]


def test_audit_config_prune_after_anchor_reaches_the_log(tmp_path: Path) -> None:
    config = AuditConfig.from_mapping({"prune_after_anchor": True})
    with AuditLog.open(tmp_path / "log", clock=FakeClock(), **config.open_arguments()) as log:
        assert log.prune_after_anchor
    with AuditLog.open(tmp_path / "log", clock=FakeClock()) as log:
        assert not log.prune_after_anchor


def test_watchers_see_each_step(tmp_path: Path, clock: FakeClock) -> None:
    seen: list[PruneStep] = []
    with _open(tmp_path / "log", clock) as log:
        log.watch_pruning(seen.append)
        _fill(log, 64)
        _anchor(log)
        steps = log.prune_anchored(limit=50)
    assert seen == steps
    assert sum(step.entries for step in seen) == 64


def _damage(path: Path, key: bytes, value: bytes, db: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=64, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(key, value, db=env.open_db(db, txn=txn))
    env.close()


def test_a_payload_dropped_past_the_pruning_point_is_damage(
    tmp_path: Path, clock: FakeClock
) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 64)
        _anchor(log)
        log.prune_anchored()
        _fill(log, 3)
        leaf = log.prove_inclusion(66).leaf_hash
    _damage(tmp_path / "log", u64(66), leaf, b"entries")
    with _open(tmp_path / "log", clock, readonly=True) as log:
        report = log.verify_chain()
    assert report.problem is not None
    assert (report.problem.seq, report.problem.where) == (66, "entry")


def test_a_damaged_pruned_log_is_not_rebuilt_from_what_it_no_longer_has(
    tmp_path: Path, clock: FakeClock
) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 64)
        _anchor(log)
        log.prune_anchored()
        _fill(log, 3)
        leaf = log.prove_inclusion(66).leaf_hash
    _damage(tmp_path / "log", u64(66), leaf, b"entries")
    before = (tmp_path / "log" / "data.mdb").read_bytes()
    with pytest.raises(StoreCorrupted, match="pruned after anchoring: a rebuild cannot"):
        rebuild(tmp_path / "log", clock=clock, trusted_keys=None)
    assert (tmp_path / "log" / "data.mdb").read_bytes() == before  # nothing changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


def test_a_pruned_count_that_does_not_match_is_damage(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 64)
        _anchor(log)
        log.prune_anchored()
    _damage(tmp_path / "log", b"pruned_entries", u64(3), b"meta")
    with _open(tmp_path / "log", clock, readonly=True) as log:
        report = log.verify_chain()
    assert report.problem is not None
    assert "metadata says 3 entries pruned, found 64" in report.problem.what


def test_a_pruned_log_backs_up_and_restores_verified(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 640)
        _anchor(log)
        log.prune_anchored()
        size, root = log.size, log.root()
        log.backup(tmp_path / "backup")
    done = AuditLog.restore(tmp_path / "restored", tmp_path / "backup", clock=clock)
    assert (done.size, done.root) == (size, root)
    with _open(tmp_path / "restored", clock) as restored:
        report = restored.verify_chain()
        assert report.ok, report.problem
        # The same log (its pruned entries too), then the LOG_RESTORED entry.
        assert (report.pruned, restored.root_at(size), restored.size) == (640, root, size + 1)
        _fill(restored, 5)
        assert restored.verify_chain().ok
