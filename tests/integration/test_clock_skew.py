"""A host clock that is wrong, for real: Talos processes under libfaketime.

Failure-Modes ("Clock Skew"): a clock that is significantly wrong makes
timestamp checks fail and capabilities look mistimed; ``talos diagnose
--check-clock`` detects it. Here whole ``talos`` processes run under Debian's
libfaketime (preloaded), which shifts what the process reads
from the wall clock, and every other process keeps the true time:

* ``diagnose --check-clock`` measures the shift against a real registry;
* a message from an agent 10 minutes ahead is refused by its peer, with a
  reason that names clock skew;
* a capability issued by that agent is rejected by the other agent, with a
  reason that names clock skew (it was issued in the other's future).

Each shifted process preloads the library itself (``shifted_clock``): Debian's
``faketime`` wrapper names a semaphore after its pid and leaves it behind when
it is stopped by a signal, and a later wrapper given the same pid refuses to
start. ``FAKETIME_DONT_FAKE_MONOTONIC`` keeps the monotonic clock (asyncio's
timers) true; only the wall clock is shifted. Every process still gets its
own process group and is stopped through it. Without libfaketime
(``.ci/install-faketime.sh`` installs it) these tests are skipped, and fail in CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shifted_clock import LIBRARY, MISSING, prefix, sweep

from talos.cli.diagnose import REJECT_TOLERANCE
from talos.testing.cli import CliResult, TalosCli, clean_env
from talos.testing.processes import AgentProcess, RegistryProcess, launched

AHEAD = 600.0  # seconds: FAKETIME=+10m


def _env() -> dict[str, str]:
    return clean_env(drop=("TALOS_", "FAKETIME", "LD_PRELOAD"))


def _command(args: tuple[str, ...], shift: str | None) -> list[str]:
    return [*prefix(shift), *args] if shift else list(args)


def talos(home: Path, *args: str, shift: str | None = None) -> CliResult:
    """One ``talos`` command, its wall clock shifted by ``shift`` (faketime syntax)."""
    cli = TalosCli(_env(), prefix=tuple(_command((), shift)), new_session=True)
    result = cli.run(home, *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(home: Path, *args: str, shift: str | None = None) -> str:
    result = talos(home, *args, shift=shift)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def faketime_works() -> Iterator[None]:
    """libfaketime must shift Python's wall clock here, or these tests would prove nothing.

    What it leaves in /dev/shm for processes that are gone is removed before and after.
    Without libfaketime the module skips, except in CI (``CI`` set), where
    ``.ci/run`` installs it: there it fails rather than passes unrun.
    """
    if LIBRARY is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    sweep()
    probe = subprocess.run(
        _command((sys.executable, "-c", "import time; print(time.time())"), "+10m"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    shifted = float(probe.stdout.strip() or 0) - time.time()
    if not AHEAD - 30 < shifted < AHEAD + 30:
        pytest.fail(f"libfaketime does not shift Python's clock ({shifted:.1f} s): {probe.stderr}")
    yield
    sweep()


@pytest.fixture
def start() -> Iterator[Callable[..., AgentProcess]]:
    """Starts ``talos run`` processes, each with a shifted clock when given a ``shift``."""
    with launched(_env()) as launcher:

        def launch(home: Path, *args: str, shift: str | None = None) -> AgentProcess:
            return launcher.agent(home, *args, prefix=_command((), shift))

        yield launch


def _clock(
    home: Path, registry: RegistryProcess, *extra: str, shift: str | None, code: int
) -> dict:
    result = talos(
        home, "diagnose", "--check-clock", "--registry", registry.url, "--json", *extra, shift=shift
    )
    assert result.returncode == code, (result.stdout, result.stderr)
    (finding,) = [
        f for f in json.loads(result.stdout)["checks"]["clock"] if f["subject"] == "registry"
    ]
    return dict(finding)


def test_diagnose_measures_a_shifted_clock(tmp_path: Path, registry: RegistryProcess) -> None:
    home = tmp_path / "home"  # no identity needed to measure a clock
    ahead = _clock(home, registry, shift="+10m", code=1)
    assert ahead["status"] == "fail"
    assert abs(ahead["offset_s"] - AHEAD) < 5
    assert f"beyond the {REJECT_TOLERANCE:g} s clock-skew tolerance" in ahead["detail"]
    assert "NTP" in ahead["hint"]

    true = _clock(home, registry, shift=None, code=0)
    assert true["status"] == "ok"
    assert abs(true["offset_s"]) < 1.0

    behind = _clock(home, registry, shift="-10s", code=0)
    assert behind["status"] == "warn"  # above the 5 s default threshold, within tolerance
    assert abs(behind["offset_s"] + 10) < 2
    assert "behind" in behind["detail"]
    relaxed = _clock(home, registry, "--warn-threshold", "30", shift="-10s", code=0)
    assert relaxed["status"] == "ok"

    text = talos(home, "diagnose", "--check-clock", "--registry", registry.url, shift="+10m")
    assert text.returncode == 1
    assert re.search(r"FAIL\s+registry\s+this host's clock is 6\d\d\.\d+ s ahead of", text.stdout)
    assert not home.exists()


def test_a_message_from_an_agent_ten_minutes_ahead_is_refused_as_clock_skew(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    ahead, bob = tmp_path / "ahead", tmp_path / "bob"
    ahead_id = ok(ahead, "init", "--name", "ahead")
    bob_id = ok(bob, "init", "--name", "bob")
    url = ["--registry", registry.url]
    start(bob, *url, "--accept", "open")
    start(ahead, *url, shift="+10m")

    result = talos(ahead, "send", bob_id, "hello from the future", "--timeout", "10", shift="+10m")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "error: PeerRejected:" in result.stderr
    assert f"{bob_id} refused the message" in result.stderr
    assert "clock skew" in result.stderr
    assert re.search(r"timestamp is 59\d{4} ms ahead of the local clock", result.stderr)
    # Nothing reached bob's inbox, and the refusal is in his audit log.
    assert json.loads(ok(bob, "inbox", "--json")) == []
    refusals = json.loads(ok(bob, "audit", "query", "--type", "PEER_REJECTED", "--json"))
    assert [(e["peer"], e["data"]["reason"]) for e in refusals] == [(ahead_id, "stale")]

    # The agent that is ahead can see why: its clock against the registry.
    report = talos(ahead, "diagnose", "--check-clock", "--json", shift="+10m")
    assert report.returncode == 1
    (measured,) = [
        f for f in json.loads(report.stdout)["checks"]["clock"] if f["subject"] == "registry"
    ]
    assert measured["status"] == "fail"
    assert abs(measured["offset_s"] - AHEAD) < 5


def test_a_capability_issued_ten_minutes_ahead_is_rejected_as_clock_skew(tmp_path: Path) -> None:
    ahead, bob = tmp_path / "ahead", tmp_path / "bob"
    ok(ahead, "init", "--name", "ahead")
    bob_id = ok(bob, "init", "--name", "bob")
    keylog = tmp_path / "ahead.keylog"
    ok(ahead, "whoami", "--export-log", str(keylog))
    token = ok(
        ahead,
        "capabilities",
        "grant",
        "--to",
        bob_id,
        "--action",
        "message.send",
        "--expires-in",
        "1h",
        shift="+10m",
    )
    result = talos(bob, "capabilities", "add", token, "--issuer-log", str(keylog))
    assert result.returncode == 6, (result.stdout, result.stderr)
    assert "NotYetValid" in result.stderr
    assert "in the future" in result.stderr
    assert "clock skew" in result.stderr
    # The issuer itself, its clock still ahead, holds the token for valid.
    listed = json.loads(ok(ahead, "capabilities", "list", "--json", shift="+10m"))
    assert [row["state"] for row in listed] == ["valid"]


def test_a_peer_thirty_seconds_ahead_is_a_warning_from_its_acks(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    alice, ahead = tmp_path / "alice", tmp_path / "ahead"
    ok(alice, "init", "--name", "alice")
    ahead_id = ok(ahead, "init", "--name", "ahead")
    url = ["--registry", registry.url]
    start(ahead, *url, "--accept", "open", shift="+30s")  # within the tolerance: it works
    start(alice, *url)
    assert ok(alice, "send", ahead_id, "hi", "--timeout", "10").startswith("delivered")

    def peer_clock(*extra: str, code: int) -> dict[str, object]:
        result = talos(alice, "diagnose", "--check-clock", "--json", *extra)
        assert result.returncode == code, (result.stdout, result.stderr)
        (peer,) = [
            f for f in json.loads(result.stdout)["checks"]["clock"] if f["subject"] == "peer"
        ]
        return dict(peer)

    measured = peer_clock(code=0)  # a warning, not a problem
    assert (measured["agent_id"], measured["status"]) == (ahead_id, "warn")
    assert abs(float(str(measured["offset_s"])) - 30) < 3
    assert "ahead of this host's" in str(measured["detail"])
    assert peer_clock("--warn-threshold", "45", code=0)["status"] == "ok"
