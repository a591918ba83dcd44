"""Shared cast for the key-rotation tests with real processes: agents run again and
again on the same ports, their CLI, audit and metrics, and frames forged with a key.

Used by test_peer_rotation.py and test_rotation_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from talos.client.own_keys import Rotation, rotate_at_rest
from talos.core import wire
from talos.core.crypto import SigningKey
from talos.core.identity import Identity
from talos.storage.home import AgentHome
from talos.system import SystemClock
from talos.testing import SeededRng
from talos.testing.cli import TalosCli
from talos.testing.processes import AgentProcess, Launcher, RegistryProcess, free_port

CLI = TalosCli()
WAIT = 30.0


def ok(home: Path, *args: str) -> str:
    return CLI.ok(home, *args).strip()


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
    #: More ``talos run`` options (e.g. ``--audit-witness PEER``).
    extra: tuple[str, ...] = ()

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
            *self.extra,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        assert self.process is not None
        assert self.process.stop() == 0
        self.process = None

    @property
    def url(self) -> str:
        """Where the agent listens, for frames injected as a stranger would."""
        return f"ws://127.0.0.1:{self.port}"

    def send(self, to: Peer, text: str, *extra: str) -> str:
        return ok(self.home, "send", to.agent_id, text, "--timeout", "20", *extra)

    def inbox(self) -> list[tuple[str, str]]:
        messages = json.loads(ok(self.home, "inbox", "--json"))
        return [(m["sender"], m["data"]) for m in messages]

    def queue_depth(self) -> int:
        return int(json.loads(ok(self.home, "status", "--json"))["queue_depth"])

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
        """Rotate the stopped agent's identity as the CLI does (``rotate_at_rest``);
        (old, new)."""
        home = AgentHome(self.home)
        old = home.load_identity(passphrase=None)
        rotation = Rotation(**options)
        new = rotate_at_rest(
            home, rotation, passphrase=None, clock=SystemClock(), rng=SeededRng(1414)
        )
        return old, new


def caster(tmp_path: Path, registry: RegistryProcess, launcher: Launcher) -> Callable[..., Peer]:
    """``cast(name, *accept)``: a fresh agent home under ``tmp_path``, initialised."""

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
