"""talos.audit.rebuild: writing a log again from its entries, on real LMDB files."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.rebuild import read_intact, write_log
from talos.core.audit.entry import AuditEntry
from talos.core.crypto import SigningKey
from talos.errors import LocalProtocolError, StoreCorrupted
from talos.storage.environment import Environment
from talos.storage.lmdb import u64
from talos.testing import FakeClock, SeededRng
from talos.testing.damage import flip_stored_bit

KEY = SigningKey.generate(SeededRng(31))
OTHER = SigningKey.generate(SeededRng(32))


def _build(path: Path, size: int, *, block_entries: int = 4) -> None:
    signer = LogSigner(KEY, name="tester")
    clock = FakeClock()
    with AuditLog.open(path, clock=clock, signer=signer, block_entries=block_entries) as log:
        for i in range(size):
            clock.advance(0.001)
            log.append("TEST", {"i": i}, peer=f"peer-{i % 3}")


def _raw(path: Path) -> tuple[list[bytes], list[object]]:
    with AuditLog.open(path, readonly=True) as log:
        entries = [entry.to_bytes() for entry in log.entries()]
        blocks = [log.block(h) for h in range(log.block_count)]
    return entries, blocks


@pytest.mark.parametrize("size", [0, 1, 5, 8, 13, 33])
def test_a_rebuilt_log_is_the_same_log(tmp_path: Path, size: int) -> None:
    _build(tmp_path / "old", size)
    entries, blocks = _raw(tmp_path / "old")
    target = Environment.open(tmp_path / "new")
    try:
        rebuilt = write_log(
            target,
            entries,
            blocks=blocks,  # type: ignore[arg-type]
            checkpoints=range(1, size + 1),
            trusted_keys=[KEY.public_key],
        )
    finally:
        target.close()
    with AuditLog.open(tmp_path / "old", readonly=True) as old:
        expected = {n: old.root_at(n) for n in range(1, size + 1)}
        proofs = [old.prove_inclusion(seq) for seq in range(size)]
        old_root = old.root()
    assert rebuilt.size == size
    assert rebuilt.root == old_root
    assert rebuilt.roots == expected
    assert rebuilt.blocks == len(blocks)
    assert rebuilt.dropped_blocks == 0
    with AuditLog.open(tmp_path / "new", readonly=True) as new:
        report = new.verify_chain(trusted_keys=[KEY.public_key], deep=True)
        assert report.ok, report.problem
        assert new.root() == old_root
        assert [e.to_bytes() for e in new.query(peer="peer-1")] == [
            e for e in entries if AuditEntry.from_bytes(e).peer == "peer-1"
        ]
        for seq, proof in enumerate(proofs):
            assert new.prove_inclusion(seq) == proof


def test_new_appends_extend_a_rebuilt_log(tmp_path: Path) -> None:
    _build(tmp_path / "old", 10)
    entries, blocks = _raw(tmp_path / "old")
    target = Environment.open(tmp_path / "new")
    try:
        write_log(target, entries, blocks=blocks)  # type: ignore[arg-type]
    finally:
        target.close()
    signer = LogSigner(KEY, name="tester")
    with AuditLog.open(tmp_path / "new", clock=FakeClock(10.0), signer=signer) as log:
        log.append("AFTER", {})
        log.seal_block()
        old_root = log.root_at(10)
        log.prove_consistency(10).verify(old_root, log.root())
        assert log.verify_chain(trusted_keys=[KEY.public_key]).ok


def test_blocks_that_no_longer_match_are_dropped_from_the_first_one(tmp_path: Path) -> None:
    _build(tmp_path / "old", 12)
    entries, blocks = _raw(tmp_path / "old")
    target = Environment.open(tmp_path / "new")
    try:
        rebuilt = write_log(
            target,
            entries[:6],
            blocks=blocks,  # type: ignore[arg-type]
            trusted_keys=[KEY.public_key],
        )
        untrusted = Environment.open(tmp_path / "other")
        try:
            by_other = write_log(
                untrusted,
                entries,
                blocks=blocks,  # type: ignore[arg-type]
                trusted_keys=[OTHER.public_key],
            )
        finally:
            untrusted.close()
    finally:
        target.close()
    assert (rebuilt.size, rebuilt.blocks, rebuilt.dropped_blocks) == (6, 1, 2)
    assert rebuilt.block_problem is not None
    assert (by_other.blocks, by_other.dropped_blocks) == (0, 3)
    assert "untrusted" in (by_other.block_problem or "")


def test_an_entry_out_of_place_writes_nothing(tmp_path: Path) -> None:
    _build(tmp_path / "old", 5)
    entries, _ = _raw(tmp_path / "old")
    target = Environment.open(tmp_path / "new")
    try:
        with pytest.raises(StoreCorrupted, match="position 2"):
            write_log(target, [entries[0], entries[1], entries[3]])
        with pytest.raises(StoreCorrupted, match="does not decode"):
            write_log(target, [entries[0], b"\xa0"])
        with target.read() as txn:
            assert txn.stat(target.audit.entries)["entries"] == 0
        write_log(target, entries)
        with pytest.raises(LocalProtocolError, match="already holds"):
            write_log(target, entries)
        again = write_log(target, entries[:2], replace=True)
    finally:
        target.close()
    assert again.size == 2


def test_read_intact_stops_at_the_first_bad_entry(tmp_path: Path) -> None:
    _build(tmp_path / "old", 20)
    flip_stored_bit(tmp_path / "old", b"entries", u64(7), 40)
    found, entries, blocks, close = read_intact(tmp_path / "old")
    try:
        raws = list(entries)
        stored_blocks = list(blocks)
    finally:
        close()
    assert len(raws) == 7
    assert (found.intact, found.first_bad, found.stored_after, found.recorded_size) == (
        7,
        7,
        13,
        20,
    )
    assert found.lost == 13
    assert "leaf hash" in (found.problem or "")
    assert len(stored_blocks) == 5
