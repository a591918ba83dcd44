"""``kill -9`` of a process in the middle of pruning leaves a log that verifies.

Each pruning step is one LMDB transaction: after the kill, the log is as it
was after the last whole step (its ``AUDIT_PRUNED`` entries say how far it
went), verifies, and pruning carries on from there.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

from talos.audit import AuditLog
from talos.testing import FakeClock
from talos.testing.child import spawn
from talos.testing.cli import clean_env

#: Prunes the log in argv[1] in small steps, printing each step as it is committed.
_PRUNER = textwrap.dedent(
    """
    import sys
    from talos.audit import AuditLog
    with AuditLog.open(sys.argv[1]) as log:
        log.watch_pruning(lambda step: print("step", step.end, flush=True))
        log.prune_anchored(limit=32)
    print("done", flush=True)
    """
)


def _anchored_log(path: Path) -> int:
    with AuditLog.open(path, clock=FakeClock(), block_entries=256) as log:
        for _ in range(20):
            log.append_many(
                ("MESSAGE_SENT", {"hash": os.urandom(32)}, "peer-b") for _ in range(1000)
            )
        log.seal_block()
        size = log.size
        log.append("AUDIT_ANCHORED", {"size": size, "root": log.root_at(size)})
        return size


def test_a_pruning_process_killed_mid_step_leaves_a_verifiable_log(tmp_path: Path) -> None:
    path = tmp_path / "log"
    anchored = _anchored_log(path)
    child = spawn(
        [sys.executable, "-c", _PRUNER, str(path)],
        env=clean_env(),
        log=tmp_path / "pruner.stderr",
        name="pruner",
    )
    try:
        for _ in range(20):
            assert child.read_line(30.0).startswith("step"), child.log_tail()
        child.signal(signal.SIGKILL)
        assert child.wait(10.0) == -signal.SIGKILL
    finally:
        child.stop()
    with AuditLog.open(path, clock=FakeClock()) as log:
        report = log.verify_chain(deep=True)
        assert report.ok, report.problem
        records = [entry.data for entry in log.query(kind="AUDIT_PRUNED")]
        state = log.pruning()
        # Killed between steps or in one: the log says exactly what was done.
        assert 20 <= len(records) < anchored // 32
        assert state.below == records[-1]["to"]
        assert state.entries == sum(record["entries"] for record in records) == report.pruned
        log.prune_anchored()
        assert log.pruning().entries == anchored
        assert log.verify_chain(deep=True).ok
