"""``talos diagnose`` as a real process: a real registry, real agents, real LMDB homes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from talos.audit import AuditLog, LogSigner
from talos.cli.diagnose import REJECT_TOLERANCE, best_sample, clock_status, disk_status
from talos.client import TalosClient
from talos.core.capability import DEFAULT_CLOCK_SKEW
from talos.core.clock import time_ms
from talos.core.clocksync import ClockSample
from talos.core.peer_record import PeerRecord
from talos.core.replay import DEFAULT_MAX_SKEW_MS
from talos.discovery.registry_client import RegistryClient
from talos.storage.home import AgentHome
from talos.storage.lmdb import u64
from talos.system import SYSTEM_CLOCK
from talos.testing.cli import CliResult, TalosCli
from talos.testing.damage import flip_stored_bit
from talos.testing.processes import (
    AgentProcess,
    RegistryProcess,
    free_port,
    launched,
)
from talos.testing.waiting import wait_until

CHECKS = ["clock", "duplicates", "network", "storage"]


CLI = TalosCli(timeout=120)


def talos(home: Path, *args: str, env: dict[str, str] | None = None) -> CliResult:
    result = CLI.run(home, *args, extra_env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return CLI.ok(home, *args, extra_env=env).strip()


def diagnose(
    home: Path, *args: str, code: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``talos diagnose --json ARGS``, check the exit status, return the report."""
    result = talos(home, "diagnose", "--json", *args, env=env)
    assert result.returncode == code, (result.stdout, result.stderr)
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["ok"] is (code == 0)
    return report


def found(report: dict[str, Any], check: str, subject: str) -> list[dict[str, Any]]:
    """The findings of ``check`` about ``subject``."""
    return [f for f in report["checks"][check] if f["subject"] == subject]


def one(report: dict[str, Any], check: str, subject: str) -> dict[str, Any]:
    (finding,) = found(report, check, subject)
    return finding


@pytest.fixture
def start() -> Iterator[Callable[..., AgentProcess]]:
    """Starts ``talos run`` processes; every one is stopped at the end."""
    with launched() as launcher:
        yield launcher.agent


# -- pure parts ---------------------------------------------------------------------------


def test_the_rejection_tolerance_is_the_envelope_and_capability_one() -> None:
    assert REJECT_TOLERANCE == min(DEFAULT_MAX_SKEW_MS / 1000, DEFAULT_CLOCK_SKEW)
    assert clock_status(0.2, warn=5) == "ok"
    assert clock_status(-7, warn=5) == "warn"
    assert clock_status(REJECT_TOLERANCE, warn=5) == "warn"  # refused only beyond it
    assert clock_status(-REJECT_TOLERANCE - 0.5, warn=5) == "fail"
    assert clock_status(600, warn=1000) == "fail"  # the threshold only adds warnings
    samples = [ClockSample(9.0, 0.5, 1), ClockSample(2.0, 0.001, 2), ClockSample(5, 0.02, 3)]
    assert best_sample(samples).offset == 2.0


def test_disk_verdicts() -> None:
    gib = 1 << 30
    assert disk_status(100 * gib, 200 * gib, gib, None)[0] == "ok"
    assert disk_status(5 * gib, 200 * gib, gib, None)[0] == "warn"  # under 10% free
    assert disk_status(1000, 200 * gib, gib, None)[0] == "fail"
    assert disk_status(100 * gib, 200 * gib, gib, 10 * gib)[0] == "ok"
    status, detail, _ = disk_status(2 * gib, 200 * gib, gib, 10 * gib)
    assert status == "warn"
    assert "before the log reaches its limit" in detail
    assert disk_status(100 * gib, 200 * gib, int(9.5 * gib), 10 * gib)[0] == "warn"
    assert disk_status(100 * gib, 200 * gib, 10 * gib, 10 * gib)[0] == "fail"


# -- without the agent ----------------------------------------------------------------


def test_every_check_runs_without_the_agent(tmp_path: Path, registry: RegistryProcess) -> None:
    home = tmp_path / "alice"
    agent_id = ok(home, "init", "--name", "alice")
    report = diagnose(home, "--registry", registry.url, code=0)
    assert sorted(report["checks"]) == CHECKS
    assert report["agent"] == {"running": False, "pid": None, "problem": None}
    assert report["registry"] == {"url": registry.url, "source": "--registry"}

    assert one(report, "network", "registry")["status"] == "ok"
    assert one(report, "network", "registry")["latency_ms"] > 0
    assert one(report, "network", "agent")["status"] == "info"
    assert one(report, "network", "peers")["status"] == "skip"  # no agent state yet
    storage = {f["subject"]: f["status"] for f in report["checks"]["storage"]}
    assert storage == {
        "key log": "ok",
        "key file": "ok",
        "audit log": "skip",
        "token store": "skip",
        "lost state": "ok",
        "agent state": "skip",
        "disk": "ok",
    }
    duplicates = one(report, "duplicates", "registry")
    assert (duplicates["status"], duplicates["agent_id"], duplicates["instances"]) == (
        "ok",
        agent_id,
        [],
    )
    assert one(report, "duplicates", "agent")["status"] == "skip"
    clock = one(report, "clock", "registry")
    assert clock["status"] == "ok"
    assert abs(clock["offset_s"]) < 1.0
    assert clock["samples"] == 5
    assert clock["delay_s"] >= 0

    text = ok(home, "diagnose", "--registry", registry.url)
    for heading in ("network", "storage", "duplicates", "clock", "no problem found"):
        assert heading in text
    assert re.search(r"OK\s+registry\s+this host's clock is", text)

    # A capability granted before the agent ever ran: a log and a token store, no state.
    ok(home, "capabilities", "grant", "--to", agent_id, "--action", "x", "--expires-in", "1h")
    granted = diagnose(home, "--storage", code=0)
    storage = {f["subject"]: f["status"] for f in granted["checks"]["storage"]}
    assert (storage["audit log"], storage["token store"], storage["agent state"]) == (
        "ok",
        "ok",
        "skip",
    )
    assert one(granted, "storage", "token store")["granted"] == 1

    # The registry from the environment talos run uses, when none is given.
    env = {"TALOS_REGISTRY_URL": registry.url}
    by_env = diagnose(home, "--check-clock", code=0, env=env)
    assert list(by_env["checks"]) == ["clock"]
    assert by_env["registry"]["source"] == "$TALOS_REGISTRY_URL"


def test_a_check_that_cannot_start_is_an_error(tmp_path: Path, registry: RegistryProcess) -> None:
    home = tmp_path / "alice"
    ok(home, "init", "--name", "alice")
    # Every check by default: those that need a registry are skipped.
    report = diagnose(home, code=0)
    assert one(report, "clock", "registry")["status"] == "skip"
    assert one(report, "network", "registry")["status"] == "skip"
    # Asked for by name: an error (exit 1) with a hint, and no report.
    for flag in ("--check-clock", "--check-duplicates"):
        result = talos(home, "diagnose", flag)
        assert result.returncode == 1
        assert "error: ConfigurationError:" in result.stderr
        assert "--registry" in result.stderr
    assert talos(home, "diagnose", "--all").returncode == 2
    assert talos(home, "diagnose", "--audit-max-size-gb", "0").returncode == 2
    # Duplicates of this identity need one: exit 4, as for any missing identity.
    empty = tmp_path / "empty"
    result = talos(empty, "diagnose", "--check-duplicates", "--registry", registry.url)
    assert result.returncode == 4
    assert "IdentityNotFound" in result.stderr
    assert not empty.exists()  # diagnose created nothing
    # --all needs none.
    every = diagnose(empty, "--check-duplicates", "--all", "--registry", registry.url, code=0)
    assert [f["status"] for f in found(every, "duplicates", "registry")] == ["skip", "ok"]


# -- with the agent running -----------------------------------------------------------


def test_every_check_with_the_agent_running_and_after_it_stops(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    ok(alice_home, "init", "--name", "alice")
    bob_id = ok(bob_home, "init", "--name", "bob")
    url = ["--registry", registry.url]
    bob = start(bob_home, *url, "--accept", "open", "--dht-port", "0")
    alice = start(alice_home, *url, "--reconnect-interval", "1")
    assert ok(alice_home, "send", bob_id, "hello", "--timeout", "10").startswith("delivered")

    # No --registry and no environment: the running agent's registry is used.
    report = diagnose(alice_home, code=0)
    assert report["agent"]["running"] is True
    assert report["registry"] == {"url": registry.url, "source": "the running agent"}
    assert one(report, "network", "agent")["status"] == "ok"
    listener = one(report, "network", "listener")
    assert listener["status"] == "ok"
    assert listener["endpoint"].startswith("ws://127.0.0.1:")
    peer = one(report, "network", "peer")
    assert (peer["agent_id"], peer["connected"], peer["session"], peer["queued"]) == (
        bob_id,
        True,
        True,
        0,
    )
    assert one(report, "storage", "agent state")["detail"].startswith("open in the running agent")
    assert one(report, "storage", "audit log")["status"] == "ok"
    registered = one(report, "duplicates", "registry")
    assert registered["status"] == "ok"
    assert [i["this_agent"] for i in registered["instances"]] == [True]
    assert one(report, "duplicates", "agent")["status"] == "ok"
    measured = one(report, "clock", "peer")  # from bob's signed ACK
    assert (measured["agent_id"], measured["status"]) == (bob_id, "ok")
    assert abs(measured["offset_s"]) < 1.0

    # Bob runs a DHT node: it answers; a bootstrap node that is not there does not.
    dead = f"127.0.0.1:{free_port(udp=True)}"
    dht = diagnose(bob_home, "--network", "--dht-bootstrap", dead, code=1)
    assert one(dht, "network", "agent dht node")["status"] == "ok"
    assert one(dht, "network", "dht bootstrap") == {
        "subject": "dht bootstrap",
        "status": "fail",
        "detail": f"{dead} does not answer",
        "hint": one(dht, "network", "dht bootstrap")["hint"],
        "address": dead,
    }

    # Bob stops: a message waits in alice's queue, which the network check shows.
    bob.stop()
    assert ok(alice_home, "send", bob_id, "later", "--timeout", "1").startswith("queued")
    waiting = one(diagnose(alice_home, "--network", code=0), "network", "peer")
    assert (waiting["status"], waiting["connected"], waiting["queued"]) == ("warn", False, 1)

    # Alice stops too: the same facts come from her state on disk.
    alice.stop()
    offline = diagnose(alice_home, "--network", "--storage", *url, code=0)
    assert offline["agent"]["running"] is False
    state = one(offline, "storage", "agent state")
    assert (state["status"], state["queued"], state["sessions"]) == ("ok", 1, 1)
    peer = one(offline, "network", "peer")
    assert (peer["agent_id"], peer["connected"], peer["queued"]) == (bob_id, None, 1)
    assert "agent not running" in peer["detail"]


# -- storage ----------------------------------------------------------------------------


def _run_agent_once(home: Path, passphrase: bytes | None = None) -> None:
    """Create the agent state (and a few audit entries) by running a client briefly."""

    async def run() -> None:
        async with TalosClient.create(
            home.name, home=home, discovery=[], passphrase=passphrase, offline_mode=True
        ):
            pass

    asyncio.run(run())


def test_storage_damage_is_found_and_named(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    ok(home, "init", "--name", "alice")
    _run_agent_once(home)
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")
    with AuditLog.open(home / "audit", signer=signer) as log:
        log.append_many([("MESSAGE_SENT", {"n": n}, None) for n in range(20)])
        size = log.size
    clean = diagnose(home, "--storage", "--audit-max-size-gb", "1", code=0)
    audit = one(clean, "storage", "audit log")
    assert (audit["status"], audit["entries"]) == ("ok", size)
    assert one(clean, "storage", "agent state")["status"] == "ok"
    assert one(clean, "storage", "disk")["max_size_bytes"] == 1 << 30

    flip_stored_bit(home / "audit", b"entries", u64(7))
    (home / "capabilities" / "data.mdb").write_bytes(b"not an LMDB file" * 512)
    damaged = diagnose(home, "--storage", code=1)
    audit = one(damaged, "storage", "audit log")
    assert audit["status"] == "fail"
    assert "seq 7" in audit["detail"]
    assert one(damaged, "storage", "token store")["status"] == "fail"
    assert damaged["problems"] == 2
    text = talos(home, "diagnose", "--storage")
    assert text.returncode == 1
    assert "FAIL  audit log" in text.stdout
    assert "hint: keep the damaged log" in text.stdout
    assert "2 problems found" in text.stdout

    key_file = home / "identity.key"
    raw = bytearray(key_file.read_bytes())
    raw[-1] ^= 0x01
    key_file.write_bytes(bytes(raw))
    broken = diagnose(home, "--storage", code=1)
    assert one(broken, "storage", "key file")["status"] == "fail"
    assert one(broken, "storage", "agent state")["status"] == "fail"  # its key is in that file


def test_agent_state_sealed_under_a_passphrase(tmp_path: Path) -> None:
    home = tmp_path / "carol"
    secret = {"TALOS_KEY_PASSPHRASE": "correct horse"}
    ok(home, "init", "--name", "carol", env=secret)
    _run_agent_once(home, b"correct horse")
    sealed = one(diagnose(home, "--storage", code=0), "storage", "agent state")
    assert sealed["status"] == "skip"
    assert "TALOS_KEY_PASSPHRASE" in sealed["hint"]
    opened = one(diagnose(home, "--storage", code=0, env=secret), "storage", "agent state")
    assert opened["status"] == "ok"
    wrong = {"TALOS_KEY_PASSPHRASE": "wrong"}
    refused = one(diagnose(home, "--storage", code=0, env=wrong), "storage", "agent state")
    assert refused["status"] == "warn"


# -- duplicates -------------------------------------------------------------------------


async def _announce(url: str, home: Path, instance: bytes, endpoint: str) -> None:
    identity = AgentHome(home).load_identity(passphrase=None)
    record = PeerRecord.create(
        identity.signing_key,
        agent_id=identity.agent_id,
        key_sequence=identity.sequence,
        instance_id=instance,
        endpoint=endpoint,
        sequence=time_ms(SYSTEM_CLOCK),
        now=SYSTEM_CLOCK.time(),
        lifetime=3600,
    )
    async with RegistryClient(url) as registry:
        await registry.publish_record(record)


def test_the_registry_reports_a_second_live_instance(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    home, other = tmp_path / "dave", tmp_path / "erin"
    ok(home, "init", "--name", "dave")
    erin_id = ok(other, "init", "--name", "erin")
    dave = start(home, "--registry", registry.url)
    mine = json.loads(ok(home, "status", "--json"))
    # A copy of dave elsewhere announces, then the running one announces again:
    # both kept announcing at once (the registry's split-brain rule).
    twin = bytes(range(16))
    asyncio.run(_announce(registry.url, home, twin, "ws://127.0.0.1:9"))
    announced = time_ms(SYSTEM_CLOCK)  # the next announcement needs a higher sequence
    wait_until(lambda: time_ms(SYSTEM_CLOCK) > announced, 1.0, what="a new ms", interval=0.001)
    asyncio.run(_announce(registry.url, home, bytes.fromhex(mine["instance_id"]), mine["endpoint"]))

    report = diagnose(home, "--check-duplicates", code=1)
    duplicate = one(report, "duplicates", "registry")
    assert (duplicate["status"], duplicate["agent_id"]) == ("fail", dave.agent_id)
    assert sorted((i["instance_id"], i["this_agent"]) for i in duplicate["instances"]) == sorted(
        [(twin.hex(), False), (mine["instance_id"], True)]
    )
    assert "rotate" in duplicate["hint"]
    text = talos(home, "diagnose", "--check-duplicates")
    assert text.returncode == 1
    assert "runs as 2 live instances" in text.stdout

    # Any identity: erin has no duplicate herself, but the registry knows dave's.
    every = diagnose(other, "--check-duplicates", "--all", "--registry", registry.url, code=1)
    verdicts = [(f["status"], f.get("agent_id")) for f in found(every, "duplicates", "registry")]
    assert verdicts == [("ok", erin_id), ("fail", dave.agent_id)]


def test_the_running_agent_reports_a_peer_speaking_from_two_instances(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    bob_home, alice_home, twin_home = tmp_path / "bob", tmp_path / "alice", tmp_path / "twin"
    bob_id = ok(bob_home, "init", "--name", "bob")
    alice_id = ok(alice_home, "init", "--name", "alice")
    shutil.copytree(alice_home, twin_home)  # the same identity on a second "host"
    url = ["--registry", registry.url]
    start(bob_home, *url, "--accept", "open")
    start(alice_home, *url)
    start(twin_home, *url)
    # Frames from alice's instances reach bob in the order A, B, A.
    for home in (alice_home, twin_home, alice_home):
        talos(home, "send", bob_id, "who am I?", "--timeout", "5")

    report = diagnose(bob_home, "--check-duplicates", code=1)
    seen = one(report, "duplicates", "agent")
    assert (seen["status"], seen["agent_id"]) == ("fail", alice_id)
    assert seen["count"] >= 1
    assert "two instances" in seen["detail"]
