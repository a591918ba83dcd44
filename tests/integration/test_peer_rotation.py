"""Peers that follow a key rotation, as real processes over a real registry.

Alice rotates while stopped (``talos rotate``, or an emergency rotation that
revokes her old key, written with Identity.rotate as ``talos emergency-rotate``
will), then starts again. Bob, who had a session with her, learns her new
key log when they next talk (the KEYLOG offer, or the registry when a frame
fails under the key he held), audits PEER_KEY_ROTATED, discards his sessions
with her and opens new ones; messages queued during the rotation arrive once.
Carol, offline during the rotation, follows when she comes back. After an
emergency rotation, a frame signed with Alice's old key is refused
(``revoked_key``), a token she issued under it is refused naming the
rotation, and a forked or rolled-back key log offered in her name is refused.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.core import wire
from talos.core.crypto import SigningKey
from talos.core.identity import Identity
from talos.demo.wiretap import inject
from talos.storage.home import AgentHome
from talos.system import SystemClock
from talos.testing import SeededRng
from talos.testing.cli import TalosCli
from talos.testing.processes import (
    AgentProcess,
    Launcher,
    RegistryProcess,
    free_port,
    launched,
    registry_process,
)
from talos.testing.waiting import wait_until

pytestmark = pytest.mark.slow

CLI = TalosCli()
WAIT = 30.0


def ok(home: Path, *args: str) -> str:
    return CLI.ok(home, *args).strip()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with registry_process(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    with launched() as started:
        yield started


@dataclasses.dataclass
class Peer:
    """One agent home, run again and again on the same ports."""

    home: Path
    registry: RegistryProcess
    launcher: Launcher
    accept: tuple[str, ...] = ("--accept", "open")
    port: int = dataclasses.field(default_factory=free_port)
    metrics_port: int = dataclasses.field(default_factory=free_port)
    process: AgentProcess | None = None
    agent_id: str = ""

    def init(self, name: str) -> Peer:
        self.agent_id = ok(self.home, "init", "--name", name)
        return self

    def start(self) -> Peer:
        self.process = self.launcher.agent(
            self.home,
            "--registry", self.registry.url,
            "--listen", f"127.0.0.1:{self.port}",
            "--metrics-port", str(self.metrics_port),
            "--reconnect-interval", "1",
            *self.accept,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        assert self.process is not None
        assert self.process.stop() == 0
        self.process = None

    def send(self, to: Peer, text: str, *extra: str) -> str:
        return ok(self.home, "send", to.agent_id, text, "--timeout", "20", *extra)

    def inbox(self) -> list[tuple[str, str]]:
        messages = json.loads(ok(self.home, "inbox", "--json"))
        return [(m["sender"], m["data"]) for m in messages]

    def audit(self, kind: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = json.loads(
            ok(self.home, "audit", "query", "--type", kind, "--json")
        )
        return entries

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return float("nan")

    def identity(self) -> Identity:
        return AgentHome(self.home).load_identity(passphrase=None)

    def rotate(self, **options: Any) -> tuple[Identity, Identity]:
        """Rotate the stopped agent's identity as the CLI would; (old, new)."""
        home = AgentHome(self.home)
        old = home.load_identity(passphrase=None)
        rng = SeededRng(1414)
        new = old.rotate(rng=rng, clock=SystemClock(), **options)
        home.save_identity(new, rng=rng, passphrase=None)
        return old, new


@pytest.fixture
def cast(tmp_path: Path, registry: RegistryProcess, launcher: Launcher) -> Callable[..., Peer]:
    def make(name: str, *accept: str) -> Peer:
        peer = Peer(tmp_path / name, registry, launcher)
        if accept:
            peer.accept = accept
        return peer.init(name)

    return make


def rotated_entries(peer: Peer, about: Peer) -> list[dict[str, Any]]:
    return [e for e in peer.audit("PEER_KEY_ROTATED") if e["peer"] == about.agent_id]


def grant(issuer: Peer, to: Peer) -> str:
    """A token for ``to`` to message ``issuer`` (the issuer is stopped: it owns its log)."""
    return ok(issuer.home, "capabilities", "grant", "--to", to.agent_id,
              "--action", "message.send", "--expires-in", "1h")  # fmt: skip


def test_peers_follow_a_routine_rotation(cast: Callable[..., Peer]) -> None:
    alice, bob, carol = cast("alice", "--accept", "capability"), cast("bob"), cast("carol")
    for_bob, for_carol = grant(alice, bob), grant(alice, carol)
    alice.start(), bob.start(), carol.start()
    assert bob.send(alice, "b1", "--capability", for_bob).startswith("delivered ")
    assert alice.send(bob, "a1").startswith("delivered ")
    assert carol.send(alice, "c1", "--capability", for_carol).startswith("delivered ")
    carol.stop()  # offline during the rotation
    alice.stop()
    queued = bob.send(alice, "b2 queued while alice rotates", "--capability", for_bob,
                      "--timeout", "1")  # fmt: skip
    assert queued.startswith("queued ")
    assert "to key sequence 1" in ok(alice.home, "rotate")
    fresh_for_carol = grant(alice, carol)  # under her new key, sequence 1
    alice.start()

    # Bob's queued message goes out under a new session against her new keys, and the
    # token she issued before the (routine) rotation is still good.
    wait_until(
        lambda: json.loads(ok(bob.home, "status", "--json"))["queue_depth"] == 0,
        WAIT,
        what="bob's queue drained",
        interval=0.2,
    )
    assert bob.send(alice, "b3", "--capability", for_bob).startswith("delivered ")
    assert alice.send(bob, "a2").startswith("delivered ")
    entries = rotated_entries(bob, alice)
    assert len(entries) == 1, entries
    assert entries[0]["data"] == {"from": 0, "to": 1, "emergency": False, "revoked_below": 0}
    assert bob.metric("talos_peer_key_updates_total") == 1
    assert bob.metric("talos_signature_failures_total", reason="revoked_key") == 0
    resets = [e for e in bob.audit("SESSION_RESET") if e["data"]["reason"] == "peer_key_rotated"]
    assert len(resets) == 1

    # Carol comes back with a token under a key her cached log of alice lacks: she
    # fetches alice's newer log first, then follows.
    carol.start()
    assert carol.send(alice, "c2", "--capability", fresh_for_carol).startswith("delivered ")
    assert alice.send(carol, "a3").startswith("delivered ")
    assert len(rotated_entries(carol, alice)) == 1

    # Nothing lost, nothing twice.
    assert sorted(alice.inbox()) == sorted(
        [(bob.agent_id, t) for t in ("b1", "b2 queued while alice rotates", "b3")]
        + [(carol.agent_id, t) for t in ("c1", "c2")]
    )
    assert bob.inbox() == [(alice.agent_id, "a1"), (alice.agent_id, "a2")]
    assert carol.inbox() == [(alice.agent_id, "a3")]


def forged(sender: Identity, recipient: str, key: SigningKey, **content: Any) -> bytes:
    """A frame from ``sender`` signed with ``key`` (a MESSAGE unless ``content`` says)."""
    rng = SeededRng(int.from_bytes(key.public_key.raw[:4], "big"))
    fields: dict[str, Any] = {
        "type": wire.EnvelopeType.MESSAGE,
        "ratchet_header": b"h" * 40,
        "ciphertext": b"c" * 64,
    }
    fields.update(content)
    return wire.seal(
        wire.Envelope(
            message_id=wire.new_message_id(rng),
            sender=sender.agent_id,
            sender_instance=wire.new_instance_id(rng),
            recipient=recipient,
            timestamp_ms=int(SystemClock().time() * 1000),
            **fields,
        ),
        key,
    )


def test_after_an_emergency_rotation_the_old_key_is_refused(cast: Callable[..., Peer]) -> None:
    alice = cast("alice", "--accept", "capability")
    bob = cast("bob")
    token = grant(alice, bob)
    alice.start()
    bob.start()
    assert bob.send(alice, "b1", "--capability", token).startswith("delivered ")
    assert alice.send(bob, "a1").startswith("delivered ")
    alice.stop()
    old, new = alice.rotate(reason="compromise detected", emergency=True, revoke_old=True)
    alice.start()

    # Bob still holds her old log: his token passes his own check, hers refuses it.
    refused = CLI.run(bob.home, "send", alice.agent_id, "b2", "--capability", token,
                      "--timeout", "20")  # fmt: skip
    assert refused.returncode != 0
    assert "revoked by the emergency rotation to key sequence 1" in refused.stderr
    assert "compromise detected" in refused.stderr
    wait_until(lambda: rotated_entries(bob, alice), WAIT, what="bob audited the rotation")
    entry = rotated_entries(bob, alice)[0]
    assert entry["data"] == {
        "from": 0,
        "to": 1,
        "emergency": True,
        "revoked_below": 1,
        "reason": "compromise detected",
    }
    # Now that he knows, bob's own check refuses it too, naming the rotation.
    again = CLI.run(bob.home, "send", alice.agent_id, "b3", "--capability", token)
    assert again.returncode == 6, again.stderr
    assert "revoked by the emergency rotation to key sequence 1" in again.stderr

    # A frame signed with her old (stolen) key: refused, counted and audited as such.
    url = f"ws://127.0.0.1:{bob.port}"
    assert inject(url, forged(old, bob.agent_id, old.signing_key), answer_within=0.5) is None
    wait_until(
        lambda: bob.metric("talos_signature_failures_total", reason="revoked_key") == 1,
        WAIT,
        what="the stolen-key frame counted",
    )
    failures = [e["data"] for e in bob.audit("SIGNATURE_FAILURE")]
    assert [(f["reason"], f.get("key_sequence")) for f in failures] == [("revoked_key", 0)]

    # Key logs offered in her name that fork or roll back the one bob holds.
    fork = old.rotate(rng=SeededRng(5), clock=SystemClock(), reason="another history")
    fork_frame = forged(
        old, bob.agent_id, fork.signing_key, type=wire.EnvelopeType.KEYLOG,
        ratchet_header=b"", ciphertext=b"", key_log=fork.keylog.to_bytes(),
    )  # fmt: skip
    rollback_frame = forged(
        old, bob.agent_id, new.signing_key, type=wire.EnvelopeType.KEYLOG,
        ratchet_header=b"", ciphertext=b"", key_log=old.keylog.to_bytes(),
    )  # fmt: skip
    inject(url, fork_frame, answer_within=0.2)
    inject(url, rollback_frame, answer_within=0.2)
    wait_until(lambda: len(bob.audit("PEER_KEY_LOG_REFUSED")) == 2, WAIT, what="refusals")
    reasons = sorted(e["data"]["reason"] for e in bob.audit("PEER_KEY_LOG_REFUSED"))
    assert reasons == ["fork", "rollback"]
    assert bob.metric("talos_peer_key_logs_refused_total", reason="fork") == 1
    assert bob.metric("talos_peer_key_logs_refused_total", reason="rollback") == 1
    assert len(rotated_entries(bob, alice)) == 1  # still the one real rotation

    # A fresh grant works; messages flow both ways under the new keys.
    alice.stop()
    fresh = grant(alice, bob)
    alice.start()
    assert bob.send(alice, "b4", "--capability", fresh).startswith("delivered ")
    assert alice.send(bob, "a2").startswith("delivered ")
    assert alice.inbox() == [(bob.agent_id, "b1"), (bob.agent_id, "b4")]
    assert bob.inbox() == [(alice.agent_id, "a1"), (alice.agent_id, "a2")]
