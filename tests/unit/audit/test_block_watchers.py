"""Block watchers run after the block is committed, and never for a transaction that failed."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from talos.audit import AuditLog
from talos.core.audit.checkpoint import Block
from talos.testing import FakeClock


def test_a_watcher_sees_each_block_after_its_commit(tmp_path: Path) -> None:
    seen: list[tuple[int, int, int]] = []
    with AuditLog.open(tmp_path / "log", clock=FakeClock(), block_entries=4) as log:

        def watcher(block: Block) -> None:
            # A new read transaction: only committed data is visible to it.
            seen.append((block.height, block.tree_size, log.block_count))

        log.watch_blocks(watcher)
        log.append_many([("MESSAGE_SENT", {"n": n}, None) for n in range(9)])
        log.append("MESSAGE_SENT", {"n": 9})
        log.seal_block()
    # One call per transaction, with its last block; each already committed.
    assert seen == [(1, 8, 2), (2, 10, 3)]


def test_no_watcher_call_for_a_failed_transaction(tmp_path: Path) -> None:
    seen: list[Block] = []
    with AuditLog.open(tmp_path / "log", clock=FakeClock(), block_entries=2) as log:
        log.watch_blocks(seen.append)

        def fail(txn: lmdb.Transaction[bytes]) -> None:
            raise RuntimeError("the caller's rows could not be written")

        with pytest.raises(RuntimeError):
            log.append_with([("MESSAGE_SENT", {"n": n}, None) for n in range(3)], fail)
        assert seen == []
        assert log.block_count == 0
