"""The audit index trails the log (format 2): a one-entry commit writes no index row,
the commit that brings the unindexed entries to ``INDEX_BATCH`` writes them all, and
queries read the entries beyond the index directly, so they answer as before."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lmdb
import pytest

from talos.audit import AuditLog
from talos.audit.records import prepare
from talos.audit.store import FORMAT_VERSION, index_key
from talos.audit.writer import INDEX_BATCH
from talos.errors import StoreCorrupted, UnsupportedVersion
from talos.storage.lmdb import read_u64, u64
from talos.testing import FakeClock

KINDS = ("MESSAGE_SENT", "MESSAGE_RECEIVED", "SESSION_ESTABLISHED")
PEERS = ("peer-a", "peer-b", None)


def _open(path: Path, clock: FakeClock, **options: Any) -> AuditLog:
    return AuditLog.open(path, clock=clock, commit_thread=False, **options)


def _index_rows(log: AuditLog) -> set[bytes]:
    environment = log._environment
    with environment.read() as txn:
        return {bytes(key) for key, _ in txn.cursor(db=environment.audit.index)}


def _meta(log: AuditLog, key: bytes) -> bytes | None:
    environment = log._environment
    with environment.read() as txn:
        value = txn.get(key, db=environment.audit.meta)
    return None if value is None else bytes(value)


def _expected_rows(log: AuditLog, below: int) -> set[bytes]:
    rows = set()
    for entry in log.entries(0, below):
        rows.add(index_key(b"k", entry.kind, entry.seq))
        if entry.peer is not None:
            rows.add(index_key(b"p", entry.peer, entry.seq))
    return rows


def _set_meta(log: AuditLog, key: bytes, value: bytes | None) -> None:
    """Write (or with None delete) a row of the log's ``meta`` database directly."""
    environment = log._environment
    with environment.write() as txn:
        if value is None:
            txn.delete(key, db=environment.audit.meta)
        else:
            txn.put(key, value, db=environment.audit.meta)


def _append_indexed(log: AuditLog, n: int) -> None:
    """``n`` entries in one commit that writes their index rows (as format 1 did)."""
    records = [prepare(KINDS[i % 3], {"n": i}, PEERS[i % 3]) for i in range(n)]
    log._writer.commit(records, index=True)


def _append(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append(KINDS[i % 3], {"n": i}, peer=PEERS[i % 3])


def _check_queries(log: AuditLog) -> None:
    """Every kind/peer query (with and without ``last``) answers what a full scan does."""
    everything = list(log.entries())
    for kind in KINDS:
        want = [e.seq for e in everything if e.kind == kind]
        assert [e.seq for e in log.query(kind=kind)] == want
        assert [e.seq for e in log.query(kind=kind, last=5)] == want[-5:]
    for peer in PEERS[:2]:
        want = [e.seq for e in everything if e.peer == peer]
        assert [e.seq for e in log.query(peer=peer)] == want
        assert [e.seq for e in log.query(peer=peer, last=3)] == want[-3:]
    middle = everything[len(everything) // 2].time_ms if everything else 0
    want = [e.seq for e in everything if e.kind == KINDS[0] and e.time_ms >= middle]
    assert [e.seq for e in log.query(kind=KINDS[0], since=middle)] == want


def test_single_commits_write_no_index_row_until_the_batch_is_due(tmp_path: Path) -> None:
    clock = FakeClock()
    with _open(tmp_path / "log", clock) as log:
        _append(log, INDEX_BATCH - 1)
        assert _index_rows(log) == set()
        assert read_u64(_meta(log, b"indexed") or b"") == 0
        assert read_u64(_meta(log, b"format") or b"") == FORMAT_VERSION == 2
        _check_queries(log)
        _append(log, 1, INDEX_BATCH - 1)
        assert read_u64(_meta(log, b"indexed") or b"") == INDEX_BATCH
        assert _index_rows(log) == _expected_rows(log, INDEX_BATCH)
        _append(log, 10, INDEX_BATCH)
        assert _index_rows(log) == _expected_rows(log, INDEX_BATCH)
        _check_queries(log)


def test_a_large_batch_is_indexed_by_its_own_commit(tmp_path: Path) -> None:
    with _open(tmp_path / "log", FakeClock()) as log:
        log.append_many((KINDS[i % 3], {"n": i}, PEERS[i % 3]) for i in range(INDEX_BATCH + 5))
        assert read_u64(_meta(log, b"indexed") or b"") == INDEX_BATCH + 5
        assert _index_rows(log) == _expected_rows(log, INDEX_BATCH + 5)


@pytest.mark.parametrize("sizes", [(0, 1), (10, 5), (INDEX_BATCH - 1, 1), (70, 70)])
def test_queries_agree_with_a_scan_across_reopens(tmp_path: Path, sizes: tuple[int, int]) -> None:
    """The writer reloads the unindexed keys from the entries; nothing is left out."""
    clock = FakeClock()
    first, second = sizes
    with _open(tmp_path / "log", clock) as log:
        _append(log, first)
        _check_queries(log)
    with _open(tmp_path / "log", clock) as log:
        _check_queries(log)
        _append(log, second, first)
        _check_queries(log)
        _append(log, INDEX_BATCH, first + second)
        indexed = read_u64(_meta(log, b"indexed") or b"")
        assert indexed > first  # the rows read back at reopen were written too
        assert _index_rows(log) == _expected_rows(log, indexed)
        _check_queries(log)


def test_a_failed_commit_leaves_the_unindexed_keys_as_they_were(tmp_path: Path) -> None:
    """Clone, then commit: a transaction that fails neither loses nor duplicates a key."""
    with _open(tmp_path / "log", FakeClock(), extra_databases=("x",)) as log:
        _append(log, INDEX_BATCH - 2)
        writer = log._writer
        records = [prepare("MESSAGE_SENT", {"n": -1}, "peer-z")] * 3

        def fail(txn: lmdb.Transaction[bytes]) -> None:
            raise RuntimeError("the caller's rows failed")

        with pytest.raises(RuntimeError):
            writer.commit(records, fail)
        assert log.size == INDEX_BATCH - 2
        assert _index_rows(log) == set()
        _append(log, 2, INDEX_BATCH - 2)
        assert _index_rows(log) == _expected_rows(log, INDEX_BATCH)
        assert log.query(peer="peer-z") == []


def test_a_format_1_log_reads_as_indexed_and_moves_to_format_2(tmp_path: Path) -> None:
    """A log written before the index trailed: no ``indexed`` row, every entry indexed."""
    clock = FakeClock()
    with _open(tmp_path / "log", clock) as log:
        _append_indexed(log, 20)
        _set_meta(log, b"format", u64(1))
        _set_meta(log, b"indexed", None)
    with _open(tmp_path / "log", clock) as log:
        assert _meta(log, b"indexed") is None
        _check_queries(log)
        _append(log, 3, 20)
        assert read_u64(_meta(log, b"format") or b"") == 2
        assert read_u64(_meta(log, b"indexed") or b"") == 20
        _check_queries(log)


def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    with _open(tmp_path / "log", clock) as log:
        _append(log, 2)
        _set_meta(log, b"format", u64(3))
    with pytest.raises(UnsupportedVersion, match="format 3"):
        _open(tmp_path / "log", clock)


def test_a_malformed_index_point_is_named(tmp_path: Path) -> None:
    clock = FakeClock()
    with _open(tmp_path / "log", clock) as log:
        _append(log, 5)
        _set_meta(log, b"indexed", b"\x01")
        with pytest.raises(StoreCorrupted, match="index point"):
            log.query(kind=KINDS[0])


def test_an_index_point_past_the_size_a_reader_knows_reads_as_that_size(
    tmp_path: Path,
) -> None:
    """A reader's size may be older than its transaction (a writer in another thread
    or process went on): the index point past it covers nothing it looks at."""
    clock = FakeClock()
    with _open(tmp_path / "log", clock) as log:
        _append_indexed(log, 5)
        _set_meta(log, b"indexed", u64(10_000))
        _check_queries(log)


def test_a_damaged_entry_past_the_index_does_not_stop_writing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    with _open(tmp_path / "log", clock) as log:
        _append(log, 10)
        environment = log._environment
        with environment.write() as txn:
            row = bytearray(txn.get(u64(3), db=environment.audit.entries))
            row[-1] ^= 0x01
            txn.put(u64(3), bytes(row), db=environment.audit.entries)
    with _open(tmp_path / "log", clock) as log, caplog.at_level("WARNING", "talos.audit"):
        _append(log, INDEX_BATCH, 10)  # the writer loads the tail: entry 3 is skipped
        assert any(r.event == "audit_entry_not_indexed" for r in caplog.records)  # type: ignore[attr-defined]
        rows = _index_rows(log)
        assert index_key(b"k", KINDS[3 % 3], 3) not in rows
        assert index_key(b"k", KINDS[4 % 3], 4) in rows
        assert log.size == 10 + INDEX_BATCH
        report = log.verify_chain(deep=True)
        assert not report.ok
        assert "3" in str(report.problem)


def test_pruning_indexes_the_tail_so_kept_entries_stay_found(tmp_path: Path) -> None:
    """The pruning point never passes the index: kept kinds below it are found by it."""
    clock = FakeClock()
    with _open(tmp_path / "log", clock, block_entries=8, prune_after_anchor=True) as log:
        log.append_many(
            ("MESSAGE_SENT", {"n": i, "h": os.urandom(8)}, "peer-a") for i in range(100)
        )
        for i in range(5):  # single commits: unindexed
            log.append("CHECKPOINT_COSIGNED", {"n": i}, peer="peer-a")
            log.append("MESSAGE_SENT", {"n": i}, peer="peer-a")
        size = log.size
        assert read_u64(_meta(log, b"indexed") or b"") < size
        log.append(
            "AUDIT_ANCHORED",
            {
                "chain": 31337,
                "contract": b"\x22" * 20,
                "tx": b"\x11" * 32,
                "block": 9,
                "block_hash": b"\x33" * 32,
                "size": size,
                "root": log.root_at(size),
            },
        )
        log.seal_block()
        steps = log.prune_anchored()
        assert steps
        below = log.pruning().below
        assert below > 100
        assert read_u64(_meta(log, b"indexed") or b"") >= below
        kept = [e.seq for e in log.query(kind="CHECKPOINT_COSIGNED")]
        assert kept == [100, 102, 104, 106, 108]
        assert [e.seq for e in log.query(peer="peer-a") if e.kind == "MESSAGE_SENT"] == []
