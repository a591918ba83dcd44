"""Key rotation of a real agent: ``talos rotate``, ``talos emergency-rotate``, restarts, crashes.

Real processes (a registry and ``talos run`` agents), real LMDB files; see
docs/design/key-rotation.md for what each step must keep.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from talos.core.keylog import KeyLog
from talos.storage.tokens import TokenStore
from talos.testing.cli import TalosCli
from talos.testing.processes import AgentProcess, RegistryProcess, launched, registry_process
from talos.testing.waiting import wait_until

CLI = TalosCli()
talos = CLI.run


def ok(home: Path, *args: str) -> str:
    return CLI.ok(home, *args).strip()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with registry_process(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def start() -> Iterator[Callable[..., AgentProcess]]:
    with launched() as launcher:
        yield launcher.agent


def inbox(home: Path) -> list[tuple[str, str]]:
    return [(m["sender"], m["data"]) for m in json.loads(ok(home, "inbox", "--json"))]


def queue_depth(home: Path) -> int:
    return int(json.loads(ok(home, "status", "--json"))["queue_depth"])


def learn_keylog(home: Path, other: Path) -> None:
    """Give a stopped agent ``other``'s current public key log, as ``capabilities add
    --issuer-log`` would. (Peers following a rotation by themselves, over their links,
    is the peer side of issue 14, tested in test_peer_key_rotation.py.)"""
    log = (other / "keylog.cbor").read_bytes()
    with TokenStore.open(home / "capabilities") as tokens:
        tokens.put_keylog(KeyLog.from_bytes(log).agent_id, log)


def delivered(home: Path, peer: str, text: str) -> None:
    assert ok(home, "send", peer, text, "--timeout", "20").startswith("delivered ")


@pytest.mark.parametrize("command", ["rotate", "emergency-rotate"])
def test_stopped_rotation_keeps_state_and_messages_flow(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess], command: str
) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice_id = ok(alice_home, "init", "--name", "alice", "--no-passphrase")
    bob_id = ok(bob_home, "init", "--name", "bob", "--no-passphrase")
    url = ["--registry", registry.url, "--accept", "open", "--reconnect-interval", "1"]
    bob = start(bob_home, *url)
    alice = start(alice_home, *url)
    delivered(alice_home, bob_id, "before")
    delivered(bob_home, alice_id, "hi alice")
    assert inbox(bob_home) == [(alice_id, "before")]
    assert alice.stop() == 0
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

    bob.stop()
    learn_keylog(bob_home, alice_home)
    start(bob_home, *url)
    start(alice_home, *url)
    wait_until(lambda: queue_depth(bob_home) == 0, 30, what="bob's queue drained", interval=0.2)
    assert inbox(alice_home) == [(bob_id, "hi alice"), (bob_id, "while away")]
    delivered(alice_home, bob_id, "after")
    delivered(bob_home, alice_id, "after too")
    assert inbox(bob_home) == [(alice_id, "after")]
    assert inbox(alice_home) == [(bob_id, "after too")]
    chain = json.loads(ok(alice_home, "audit", "verify-chain", "--json"))
    assert chain["ok"] is True, chain
