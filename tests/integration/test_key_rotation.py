"""Key rotation of a real agent: ``talos rotate``, ``talos emergency-rotate``, restarts, crashes.

Real processes (a registry and ``talos run`` agents), real LMDB files; see
docs/design/key-rotation.md for what each step must keep.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from talos.cli.exit_codes import exit_code_for_name
from talos.core.keylog import KeyLog
from talos.core.revocation import RevocationList
from talos.storage.home import AgentHome
from talos.storage.tokens import TokenStore
from talos.storage.watermark import load_watermark
from talos.testing.child import spawn
from talos.testing.cli import TalosCli, clean_env, talos_argv
from talos.testing.processes import AgentProcess, RegistryProcess, launched
from talos.testing.waiting import wait_until

CLI = TalosCli()
talos = CLI.run


def ok(home: Path, *args: str) -> str:
    return CLI.ok(home, *args).strip()


@pytest.fixture
def start() -> Iterator[Callable[..., AgentProcess]]:
    with launched() as launcher:
        yield launcher.agent


def inbox(home: Path) -> list[tuple[str, str]]:
    return [(m["sender"], m["data"]) for m in json.loads(ok(home, "inbox", "--json"))]


def queue_depth(home: Path) -> int:
    return int(json.loads(ok(home, "status", "--json"))["queue_depth"])


def delivered(home: Path, peer: str, text: str) -> None:
    assert ok(home, "send", peer, text, "--timeout", "20").startswith("delivered ")


@dataclass
class Pair:
    """Alice and Bob running with a registry, accepting anyone, one message each way done."""

    alice_home: Path
    bob_home: Path
    alice_id: str
    bob_id: str
    args: list[str]
    alice: AgentProcess
    bob: AgentProcess


def talking_pair(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> Pair:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice_id = ok(alice_home, "init", "--name", "alice", "--no-passphrase")
    bob_id = ok(bob_home, "init", "--name", "bob", "--no-passphrase")
    args = ["--registry", registry.url, "--accept", "open", "--reconnect-interval", "1"]
    bob = start(bob_home, *args)
    alice = start(alice_home, *args)
    delivered(alice_home, bob_id, "before")
    delivered(bob_home, alice_id, "hi alice")
    assert inbox(bob_home) == [(alice_id, "before")]
    return Pair(alice_home, bob_home, alice_id, bob_id, args, alice, bob)


@pytest.mark.parametrize("command", ["rotate", "emergency-rotate"])
def test_stopped_rotation_keeps_state_and_messages_flow(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess], command: str
) -> None:
    pair = talking_pair(tmp_path, registry, start)
    alice_home, bob_home, alice_id, bob_id = (
        pair.alice_home, pair.bob_home, pair.alice_id, pair.bob_id,
    )  # fmt: skip
    url = pair.args
    assert pair.alice.stop() == 0
    # Queued for alice while she is stopped, and one left in her inbox unread.
    queued = ok(bob_home, "send", alice_id, "while away", "--timeout", "0.5")
    assert queued.startswith("queued ")
    before = json.loads(ok(alice_home, "whoami", "--json"))
    args = ["rotate"] if command == "rotate" else [
        "emergency-rotate", "--revoke-old", "--reason", "compromise detected"]  # fmt: skip
    out = ok(alice_home, *args)
    assert "key sequence 1" in out
    after = json.loads(ok(alice_home, "whoami", "--json"))
    assert after["agent_id"] == alice_id
    assert (after["sequence"], before["sequence"]) == (1, 0)
    assert after["fingerprint"] != before["fingerprint"]

    start(alice_home, *url)  # bob, who still holds her old key log, follows by himself
    wait_until(lambda: queue_depth(bob_home) == 0, 30, what="bob's queue drained", interval=0.2)
    assert inbox(alice_home) == [(bob_id, "hi alice"), (bob_id, "while away")]
    delivered(alice_home, bob_id, "after")
    delivered(bob_home, alice_id, "after too")
    assert inbox(bob_home) == [(alice_id, "after")]
    assert inbox(alice_home) == [(bob_id, "after too")]
    followed = json.loads(ok(bob_home, "audit", "query", "--type", "PEER_KEY_ROTATED", "--json"))
    assert [(e["peer"], e["data"]["to"]) for e in followed] == [(alice_id, 1)]
    chain = json.loads(ok(alice_home, "audit", "verify-chain", "--json"))
    assert chain["ok"] is True, chain


# -- crash safety ------------------------------------------------------------------------------


def rotate_killed_at(home: Path, point: str, tmp_path: Path) -> None:
    """Run ``talos emergency-rotate`` and ``kill -9`` it at ``point`` (a test pause)."""
    marker = tmp_path / f"{point}.reached"
    child = spawn(
        talos_argv("--home", str(home), "emergency-rotate", "--revoke-old", "--reason", "crash"),
        env=clean_env({"TALOS_TEST_PAUSE": f"{point}:{marker}"}),
        log=tmp_path / f"{point}.log",
        name="rotate",
        stdout_pipe=False,
    )
    try:
        wait_until(marker.exists, 30, what=f"rotation paused at {point}")
    finally:
        assert child.kill() == -signal.SIGKILL


@pytest.mark.parametrize("point", ["keyfile-written", "identity-saved"])
def test_a_rotation_killed_midway_leaves_a_home_that_starts(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess], point: str
) -> None:
    home = tmp_path / "alice"
    agent_id = ok(home, "init", "--name", "alice", "--no-passphrase")
    start(home, "--registry", registry.url).stop()  # an audit log and agent state exist
    rotate_killed_at(home, point, tmp_path)
    # The key file holds the new key; the public log may still be one event behind.
    assert json.loads(ok(home, "whoami", "--json"))["sequence"] == 1
    public = KeyLog.from_bytes((home / "keylog.cbor").read_bytes())
    assert len(public) == (1 if point == "keyfile-written" else 2)
    agent = start(home, "--registry", registry.url)
    assert agent.agent_id == agent_id
    assert len(KeyLog.from_bytes((home / "keylog.cbor").read_bytes())) == 2  # completed
    agent.stop()
    # The own revocation list names the revoked key, written at start if the crash
    # came before it.
    with TokenStore.open(home / "capabilities") as tokens:
        stored = tokens.revocation_list(agent_id)
    assert stored is not None
    assert RevocationList.from_bytes(stored[0]).revoked_key_sequences == {0}
    assert json.loads(ok(home, "audit", "verify-chain", "--json"))["ok"] is True
    ok(home, "rotate")  # and the next rotation goes on from there
    assert json.loads(ok(home, "whoami", "--json"))["sequence"] == 2


def test_rotations_killed_at_random_moments_always_leave_a_home_that_opens(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    home = tmp_path / "alice"
    ok(home, "init", "--name", "alice", "--no-passphrase")
    start(home, "--registry", registry.url).stop()
    rng = random.Random(14)  # noqa: S311 -- kill times, not secrets
    for attempt in range(6):
        child = spawn(
            talos_argv("--home", str(home), "rotate"),
            env=clean_env(),
            log=tmp_path / f"rotate-{attempt}.log",
            name="rotate",
            stdout_pipe=False,
        )
        time.sleep(rng.uniform(0.2, 1.5))  # a random moment, not a wait for something
        child.kill()
        identity = json.loads(ok(home, "whoami", "--json"))
        public = KeyLog.from_bytes((home / "keylog.cbor").read_bytes())
        assert identity["sequence"] in (len(public) - 1, len(public))
    start(home, "--registry", registry.url).stop()
    assert json.loads(ok(home, "audit", "verify-chain", "--json"))["ok"] is True


# -- refused rotations change nothing ---------------------------------------------------------


def snapshot(home: Path) -> dict[str, bytes]:
    return {
        name: (home / name).read_bytes()
        for name in ("identity.key", "keylog.cbor")
        if (home / name).exists()
    }


def test_refused_emergency_rotations_change_nothing(tmp_path: Path) -> None:
    home, passfile, wrong = tmp_path / "alice", tmp_path / "pass", tmp_path / "wrong"
    passfile.write_text("correct horse battery staple\n")
    wrong.write_text("not the passphrase\n")
    ok(home, "init", "--name", "alice", "--key-passphrase-file", str(passfile))
    before = snapshot(home)
    cases = [
        (["--reason", ""], "ConfigurationError", "--reason must be 1-256 printable"),
        (["--reason", "   "], "ConfigurationError", "--reason must be"),
        (["--reason", "x" * 257], "ConfigurationError", "--reason must be"),
        (["--reason", "bad\x07bell"], "ConfigurationError", "--reason must be"),
        (["--reason", "stolen", "--key-passphrase-file", str(wrong)], "WrongPassphrase", "wrong"),
    ]
    for extra, error, text in cases:
        result = talos(home, "emergency-rotate", "--revoke-old", *extra)
        assert result.returncode == exit_code_for_name(error), result
        assert text in result.stderr
        assert "Traceback" not in result.stderr
        assert snapshot(home) == before
    missing = talos(home, "emergency-rotate")  # --reason is required
    assert missing.returncode == 2
    assert "--reason" in missing.stderr
    assert snapshot(home) == before
    # A home with a public key log but no key file: no pre-rotated key to rotate to.
    (home / "identity.key").rename(tmp_path / "identity.key.away")
    before = snapshot(home)
    result = talos(home, "emergency-rotate", "--revoke-old", "--reason", "stolen")
    assert result.returncode == exit_code_for_name("IdentityNotFound") == 4
    assert "no pre-rotated key" in result.stderr
    assert "talos recover" in result.stderr
    assert snapshot(home) == before


# -- a running agent rotates -------------------------------------------------------------------


def audit_entries(home: Path, kind: str) -> list[dict[str, object]]:
    rows = json.loads(ok(home, "audit", "query", "--type", kind, "--json"))
    return [row["data"] for row in rows]


def test_running_emergency_rotation_keeps_every_message_and_revokes_old_grants(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    alice_home, bob_home, passfile = tmp_path / "alice", tmp_path / "bob", tmp_path / "pass"
    passfile.write_text("alice's passphrase\n")
    key = ["--key-passphrase-file", str(passfile)]
    alice_id = ok(alice_home, "init", "--name", "alice", *key)
    bob_id = ok(bob_home, "init", "--name", "bob", "--no-passphrase")
    # Alice grants bob the right to message her, under her first key.
    token = ok(alice_home, "capabilities", "grant", "--to", bob_id, "--action", "message.send",
               "--expires-in", "1h", *key)  # fmt: skip
    ok(alice_home, "whoami", "--export-log", str(tmp_path / "alice.log"), *key)
    ok(bob_home, "capabilities", "add", token, "--issuer-log", str(tmp_path / "alice.log"))
    url = ["--registry", registry.url, "--reconnect-interval", "1"]
    # Bob accepts anyone; alice only holders of her grants (bob's is sent along).
    bob = start(bob_home, *url, "--accept", "open")
    alice = start(alice_home, *url, *key)
    delivered(bob_home, alice_id, "with the old grant")
    delivered(alice_home, bob_id, "hello bob")
    assert inbox(alice_home) == [(bob_id, "with the old grant")]
    assert inbox(bob_home) == [(alice_id, "hello bob")]
    # Bob goes offline; alice queues messages for him, then rotates while running.
    assert bob.stop() == 0
    queued = [f"queued {n}" for n in range(5)]
    for text in queued:
        assert ok(alice_home, "send", bob_id, text, "--timeout", "0.2").startswith("queued ")
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    refused = talos(alice_home, "emergency-rotate", "--revoke-old", "--reason", "stolen laptop",
                    "--key-passphrase-file", str(wrong))  # fmt: skip
    assert refused.returncode == exit_code_for_name("WrongPassphrase"), refused
    assert json.loads(ok(alice_home, "status", "--json"))["queue_depth"] == 5
    out = ok(alice_home, "emergency-rotate", "--revoke-old", "--reason", "stolen laptop", *key)
    assert "(running agent)" in out
    assert "key sequence 1" in out
    assert alice.process.poll() is None  # no restart
    assert json.loads(ok(alice_home, "whoami", "--json", *key))["sequence"] == 1
    assert json.loads(ok(alice_home, "status", "--json"))["sessions"] == []
    # Bob comes back with her old key log; the queue drains under a new session (the
    # key log offered on the link tells him about the rotation).
    start(bob_home, *url, "--accept", "open")
    wait_until(lambda: queue_depth(alice_home) == 0, 30, what="alice's queue drained", interval=0.2)
    assert inbox(bob_home) == [(alice_id, text) for text in queued]  # none lost, none twice
    delivered(alice_home, bob_id, "after the rotation")
    assert inbox(bob_home) == [(alice_id, "after the rotation")]
    assert [e["emergency"] for e in audit_entries(bob_home, "PEER_KEY_ROTATED")] == [True]
    # The grant alice issued under her revoked key is refused, naming the revocation.
    refused = talos(bob_home, "send", alice_id, "with the old grant again",
                    "--timeout", "10", "--on-failure", "raise", "--capability", token)  # fmt: skip
    assert refused.returncode == exit_code_for_name("CapabilityDenied"), refused
    assert "revoked by the emergency rotation to key sequence 1 (stolen laptop)" in refused.stderr
    # A routine rotation goes through the running agent too.
    again = ok(alice_home, "rotate", "--reason", "routine", *key)
    assert "key sequence 2 (running agent)" in again
    alice.stop()
    rotation, routine = audit_entries(alice_home, "KEY_ROTATED")
    assert (routine["sequence"], routine["emergency"], routine["reason"]) == (2, False, "routine")
    assert rotation["reason"] == "stolen laptop"
    assert rotation["emergency"] is True
    assert rotation["revoke_old"] is True
    chain = json.loads(ok(alice_home, "audit", "verify-chain", "--json"))
    assert chain["ok"] is True, chain
    assert "event=key_rotated" in alice.log.read_text()
    # The running agent's watermark is signed by its current key, never by the
    # revoked one (which would be refused), and the agent starts again.
    watermark = load_watermark(AgentHome(alice_home), KeyLog.from_bytes(
        (alice_home / "keylog.cbor").read_bytes()))  # fmt: skip
    assert watermark is not None
    assert watermark.key_seq == 2
    start(alice_home, *url, *key).stop()


# -- a new identity, and recovery from a backup --------------------------------------------------


def test_new_identity_keeps_the_name_and_archives_everything_the_old_one_had(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    home = tmp_path / "alice"
    first = ok(home, "init", "--name", "alice", "--no-passphrase")
    ok(home, "capabilities", "grant", "--to", first, "--action", "message.send",
       "--expires-in", "1h")  # fmt: skip
    start(home, "--registry", registry.url).stop()  # audit log and agent state exist
    old = {name: (home / name).read_bytes() for name in ("identity.key", "keylog.cbor")}
    second = ok(home, "init", "--new-identity", "--no-passphrase")  # no --name needed
    assert second != first
    whoami = json.loads(ok(home, "whoami", "--json"))
    assert (whoami["agent_id"], whoami["name"]) == (second, "alice")
    (archived,) = (home / "archive").iterdir()
    assert {p.name for p in archived.iterdir()} >= {
        "identity.key", "identity.localkey", "keylog.cbor", "audit", "capabilities",
    }  # fmt: skip
    assert {name: (archived / name).read_bytes() for name in old} == old
    assert json.loads(ok(home, "capabilities", "list", "--json")) == []  # a fresh store
    agent = start(home, "--registry", registry.url)
    assert agent.agent_id == second
    running = talos(home, "init", "--new-identity", "--no-passphrase")
    assert running.returncode == exit_code_for_name("AgentAlreadyRunning"), running
    agent.stop()
    ok(home, "init", "--new-identity", "--name", "alice-3", "--no-passphrase")
    assert json.loads(ok(home, "whoami", "--json"))["name"] == "alice-3"
    assert len(list((home / "archive").iterdir())) == 2


def test_recover_from_backup_then_run_keeps_sessions_outbox_and_inbox(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    backup, passfile = tmp_path / "alice.backup", tmp_path / "backup-pass"
    passfile.write_text("backup passphrase\n")
    pair = talking_pair(tmp_path, registry, start)
    alice_home, bob_home, alice_id, bob_id = (
        pair.alice_home, pair.bob_home, pair.alice_id, pair.bob_id,
    )  # fmt: skip
    url, alice = pair.args, pair.alice
    pair.bob.stop()
    queued = ok(alice_home, "send", bob_id, "queued for bob", "--timeout", "0.2")
    assert queued.startswith("queued ")
    alice.stop()
    ok(alice_home, "backup", "--out", str(backup), "--passphrase-file", str(passfile))
    (alice_home / "identity.key").write_bytes(b"not a key file any more")
    broken = talos(alice_home, "whoami")
    assert broken.returncode == exit_code_for_name("KeyFileCorrupted")
    recovered = ok(alice_home, "recover", "--backup", str(backup),
                   "--passphrase-file", str(passfile), "--no-passphrase")  # fmt: skip
    assert recovered == alice_id
    start(bob_home, *url)
    start(alice_home, *url)
    wait_until(lambda: queue_depth(alice_home) == 0, 30, what="alice's queue drained", interval=0.2)
    assert inbox(bob_home) == [(alice_id, "queued for bob")]
    assert inbox(alice_home) == [(bob_id, "hi alice")]
    delivered(alice_home, bob_id, "two")
    delivered(bob_home, alice_id, "three")
    assert inbox(bob_home) == [(alice_id, "two")]
    assert inbox(alice_home) == [(bob_id, "three")]


def test_a_public_key_log_that_cannot_be_written_does_not_undo_the_rotation(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    """Once the key file holds the rotated identity the rotation is done: a failed
    public key log write is logged and completed at the next start, never
    reported as a failure that a retry would turn into a second rotation."""
    home = tmp_path / "alice"
    ok(home, "init", "--name", "alice", "--no-passphrase")
    public = home / "keylog.cbor"
    before = public.read_bytes()
    agent = start(home, "--registry", registry.url)
    public.unlink()
    public.mkdir()  # the public log can no longer be replaced
    out = ok(home, "rotate", "--reason", "routine")
    assert "key sequence 1 (running agent)" in out
    wait_until(lambda: "public_keylog_behind" in agent.child.log_text(), 10,
               what="the warning in the agent's log")  # fmt: skip
    assert agent.stop() == 0
    public.rmdir()
    public.write_bytes(before)  # behind the key file: completed by the next command
    # A stopped rotation whose public log write fails once its key file is written.
    marker = tmp_path / "paused"
    paused = spawn(talos_argv("--home", str(home), "rotate", "--reason", "again"),
                   env=clean_env({"TALOS_TEST_PAUSE": f"keyfile-written:{marker}"}),
                   log=tmp_path / "rotate.log", name="rotate", stdout_pipe=False)  # fmt: skip
    wait_until(marker.exists, 30, what="the rotation paused after its key file")
    public.unlink()
    public.mkdir()
    marker.unlink()
    assert paused.wait(30) == 0, paused.log_text()
    assert "key sequence 2" in paused.log_text()  # reported done
    assert "public key log was not written" in paused.log_text()
    public.rmdir()
    public.write_bytes(before)  # behind the key file by both rotations
    assert json.loads(ok(home, "whoami", "--json"))["sequence"] == 2
    again = start(home, "--registry", registry.url)
    assert KeyLog.from_bytes(public.read_bytes()).state.sequence == 2  # completed at start
    assert again.stop() == 0
    rotated = json.loads(ok(home, "audit", "query", "--type", "KEY_ROTATED", "--json"))
    assert [row["data"]["sequence"] for row in rotated] == [1, 2]
