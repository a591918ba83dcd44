"""`make demo` runs end to end: the same module, in a real process, over real processes.

The demo prints stable markers: ``ok [n.name]`` checkpoints, ``metric n AGENT
SERIES BEFORE -> AFTER`` lines, ``demo pids: ...`` and the working directory.
These tests check every checkpoint, that the metrics it printed moved as the
story says, and that nothing it started is left behind, also when it is
interrupted.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from talos.testing.child import spawn
from talos.testing.cli import clean_env

CHECKPOINTS = (
    "0.running",
    "0.session",
    "1.queued",
    "1.delivered",
    "2.sessions",
    "2.status",
    "3.dropped",
    "3.audited",
    "4.rejected",
    "4.audited",
    "5.chain",
    "5.proof",
    "6.rotated",
    "6.followed",
    "6.stolen",
    "6.token",
    "6.granted",
    "7.anchored",
    "7.counted",
    "7.recovered",
    "7.proof",
    "8.mirrored",
    "8.rebuilt",
    "8.proof",
    "9.stopped",
    "9.clean",
)
#: (step, agent, series) -> the change the demo must have printed.
CHANGES = {
    (1, "alice", "talos_messages_delivered_total"): 1.0,
    (2, "alice", "talos_messages_delivered_total"): 1.0,
    (2, "bob", "talos_messages_received_total"): 1.0,
    (2, "carol", "talos_registry_up"): -1.0,
    (2, "carol", "talos_messages_queued"): 1.0,
    (3, "bob", "talos_replays_dropped_total"): 1.0,
    (3, "bob", "talos_messages_received_total"): 1.0,
    (4, "bob", "talos_signature_failures_total"): 1.0,
    (4, "bob", "talos_messages_received_total"): 0.0,
    (6, "bob", "talos_peer_key_updates_total"): 1.0,
    (6, "bob", "talos_signature_failures_total"): 1.0,
}
_METRIC = re.compile(r"^\s*metric (\d) (\w+) (\w+) (\S+) -> (\S+)", re.MULTILINE)
_PIDS = re.compile(r"^demo pids: ([\d ]*)$", re.MULTILINE)
_ROOT = re.compile(r"working in \$DEMO = (\S+)")


def _command() -> list[str]:
    return [sys.executable, "-m", "talos.demo"]


def _metric_lines(out: str) -> dict[tuple[int, str, str], list[tuple[float, float]]]:
    found: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
    for step, agent, series, before, after in _METRIC.findall(out):
        found.setdefault((int(step), agent, series), []).append((float(before), float(after)))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is still a running Talos process (a reused pid is not ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return b"talos" in cmdline and state != "Z"


def _assert_nothing_left(out: str) -> None:
    match = _PIDS.search(out)
    assert match, "the demo did not print its pids"
    pids = [int(pid) for pid in match.group(1).split()]
    assert pids, "the demo started no process"
    assert [pid for pid in pids if _alive(pid)] == []
    root = _ROOT.search(out)
    assert root, "the demo did not print its directory"
    assert not Path(root.group(1)).exists()


def test_demo_walks_through_every_failure_and_leaves_nothing() -> None:
    result = subprocess.run(  # noqa: S603 -- our own interpreter and module
        _command(),
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr
    assert "Traceback" not in out + result.stderr
    for step in ("SETUP", *(f"STEP {n}" for n in range(1, 9))):
        assert step in out
    for checkpoint in CHECKPOINTS:
        assert f"ok [{checkpoint}]" in out, checkpoint
    metrics = _metric_lines(out)
    for key, change in CHANGES.items():
        assert key in metrics, key
        assert [after - before for before, after in metrics[key]] == [change], key
    # Queued while bob is down, then delivered: the gauge goes up and back down.
    assert metrics[1, "alice", "talos_messages_queued"] == [(0.0, 1.0), (1.0, 0.0)]
    # The chain down: failed attempts counted; back: anchored again, nothing left behind.
    down, back = metrics[7, "bob", "talos_audit_anchor_failures_total"]
    assert down[1] - down[0] >= 3
    assert back[0] == down[1] <= back[1]
    assert metrics[7, "bob", "talos_audit_anchor_lag_entries"][0][1] > 0
    assert "demo finished in" in out
    _assert_nothing_left(out)


def test_interrupted_demo_stops_everything_it_started(tmp_path: Path) -> None:
    demo = spawn(_command(), env=clean_env(), log=tmp_path / "demo.stderr", name="demo")
    try:
        seen = demo.read_until("STEP 2", 120)
        assert "STEP 2" in seen, seen
        demo.signal(signal.SIGINT)  # Ctrl-C, delivered to the demo alone
        rest = demo.finish(60)
    finally:
        if demo.running:
            demo.kill()
    out, errors = seen + rest, demo.log_text()
    assert demo.returncode == 130, out[-3000:] + errors
    assert "demo interrupted" in out
    assert "Traceback" not in out + errors
    _assert_nothing_left(out)
