"""Split brain found at once: ``talos diagnose --check-duplicates`` challenges each live instance.

Real ``talos run`` processes, a real registry, real sockets: a copy of a home
runs on a second port; diagnose asks every instance the registry lists to
prove it holds the key (PRESENCE), and two different instance ids that prove
it are a duplicate, reported with exit status 1 before any re-announcement.
An endpoint listed for the identity that answers without the key is an
impostor.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from talos.core import presence, wire
from talos.core.clock import time_ms
from talos.core.crypto import SigningKey, VerifyKey
from talos.core.peer_record import PeerRecord
from talos.discovery.registry_client import RegistryClient
from talos.storage.home import AgentHome
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG
from talos.testing.cli import TalosCli
from talos.testing.processes import launched, registry_process
from talos.transport import Link, Transport

CLI = TalosCli(timeout=120)


def diagnose(home: Path, code: int) -> dict[str, Any]:
    result = CLI.run(home, "diagnose", "--json", "--check-duplicates")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.stdout, result.stderr)
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def presence_findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["checks"]["duplicates"] if f["subject"] == "presence"]


def instance(home: Path) -> str:
    status: dict[str, Any] = json.loads(CLI.ok(home, "status", "--json"))
    return str(status["instance_id"])


def test_a_copy_of_a_home_on_a_second_port_is_a_duplicate_at_once(tmp_path: Path) -> None:
    home, twin = tmp_path / "alice", tmp_path / "twin"
    CLI.ok(home, "init", "--name", "alice")
    shutil.copytree(home, twin)  # the same identity, as if restored on a second host
    with registry_process(tmp_path / "registry") as registry, launched() as launcher:
        url = ["--registry", registry.url]
        launcher.agent(home, *url)
        alone = diagnose(home, code=0)
        (proved,) = presence_findings(alone)
        assert proved["status"] == "ok"
        assert list(proved["proven"]) == [instance(home)]

        launcher.agent(twin, *url)  # announces once at start, on its own port
        started = time.monotonic()
        report = diagnose(home, code=1)
        print(f"diagnose found the copy in {time.monotonic() - started:.1f} s")  # noqa: T201
        (duplicate,) = presence_findings(report)
        assert duplicate["status"] == "fail"
        assert sorted(duplicate["proven"]) == sorted([instance(home), instance(twin)])
        assert "2 instances right now" in duplicate["detail"]
        assert "rotate" in duplicate["hint"]
        text = CLI.run(home, "diagnose", "--check-duplicates")
        assert text.returncode == 1
        assert "proved it holds the key" in text.stdout


class _Impostor:
    """A listener that answers every PRESENCE challenge with a proof signed by another key."""

    def __init__(self, identity: VerifyKey) -> None:
        self.identity = identity  # public: the challenge verifies, the proof cannot
        self.key = SigningKey.generate(SYSTEM_RNG)
        self.challenged = 0
        self.transport = Transport(self.on_frame, clock=SYSTEM_CLOCK)

    async def on_frame(self, link: Link, frame: bytes) -> None:
        unverified = wire.decode(frame)
        body = wire.verify(unverified, self.identity).presence_body or b""
        challenge = presence.decode_body(presence.PresenceKind.CHALLENGE, body)
        assert isinstance(challenge, presence.Challenge)
        self.challenged += 1
        instance, now = wire.new_instance_id(SYSTEM_RNG), time_ms(SYSTEM_CLOCK)
        proof = presence.Proof(challenge.nonce, instance, now)
        envelope = wire.Envelope(
            type=wire.EnvelopeType.PRESENCE,
            message_id=wire.new_message_id(SYSTEM_RNG),
            sender=unverified.sender,
            sender_instance=instance,
            recipient=unverified.sender,
            timestamp_ms=now,
            presence_kind=presence.PresenceKind.PROOF,
            presence_body=presence.encode_body(proof),
        )
        await link.send(wire.seal(envelope, self.key))


async def _list(url: str, home: Path, endpoint: str) -> None:
    """Announce ``endpoint`` as a live instance of ``home``'s identity (a stale listing)."""
    identity = AgentHome(home).load_identity(passphrase=None)
    record = PeerRecord.create(
        identity.signing_key,
        agent_id=identity.agent_id,
        key_sequence=identity.sequence,
        instance_id=wire.new_instance_id(SYSTEM_RNG),
        endpoint=endpoint,
        sequence=time_ms(SYSTEM_CLOCK),
        now=SYSTEM_CLOCK.time(),
        lifetime=3600,
    )
    async with RegistryClient(url) as registry:
        await registry.publish_keylog(identity.keylog)
        await registry.publish_record(record)


@pytest.mark.asyncio
async def test_an_endpoint_that_cannot_prove_the_key_is_an_impostor(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    CLI.ok(home, "init", "--name", "alice")
    keylog = AgentHome(home).load_public_keylog()
    assert keylog is not None
    impostor = _Impostor(keylog.state.signing_key)
    host, port = await impostor.transport.listen("127.0.0.1", 0)
    try:
        with registry_process(tmp_path / "registry") as registry:
            await _list(registry.url, home, f"ws://{host}:{port}")
            result = await asyncio.to_thread(
                CLI.run, home, "diagnose", "--json", "--check-duplicates",
                "--registry", registry.url,
            )  # fmt: skip
    finally:
        await impostor.transport.close()
    assert result.returncode == 1, (result.stdout, result.stderr)
    (finding,) = presence_findings(json.loads(result.stdout))
    assert (finding["status"], finding["impostor"]) == ("fail", True)
    assert "SignatureInvalid" in finding["detail"]
    assert impostor.challenged == 1


class _Relay:
    """A listener that forwards every frame to ``upstream`` and every answer back: a stale
    listing pointed at the real instance."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.forwarded = upstream, 0
        self.listener = Transport(self.on_frame, clock=SYSTEM_CLOCK)
        self.dialer = Transport(self.on_answer, clock=SYSTEM_CLOCK)
        self.back: Link | None = None
        self.out: Link | None = None

    async def on_frame(self, link: Link, frame: bytes) -> None:
        self.back = link
        if self.out is None:
            self.out = await self.dialer.connect(self.upstream)
        self.forwarded += 1
        await self.out.send(frame)

    async def on_answer(self, link: Link, frame: bytes) -> None:
        if self.back is not None:
            await self.back.send(frame)

    async def close(self) -> None:
        await self.listener.close()
        await self.dialer.close()


@pytest.mark.asyncio
async def test_a_listing_relayed_to_the_live_instance_is_not_proven(tmp_path: Path) -> None:
    """A stale listing relayed to the real instance cannot borrow its proof: the challenge
    names the endpoint diagnose dialled, the instance refuses one naming an endpoint it
    does not listen on, and diagnose reports that listing as not proven."""
    home = tmp_path / "alice"
    CLI.ok(home, "init", "--name", "alice")
    with registry_process(tmp_path / "registry") as registry, launched() as launcher:
        agent = launcher.agent(home, "--registry", registry.url)
        relay = _Relay(agent.endpoint)
        host, port = await relay.listener.listen("127.0.0.1", 0)
        stale = f"ws://{host}:{port}"
        try:
            await _list(registry.url, home, stale)
            result = await asyncio.to_thread(
                CLI.run, home, "diagnose", "--json", "--check-duplicates"
            )
        finally:
            await relay.close()
        assert result.returncode == 0, (result.stdout, result.stderr)  # a warning only
        findings = {f["status"]: f for f in presence_findings(json.loads(result.stdout))}
        assert set(findings) == {"ok", "warn"}
        assert findings["ok"]["proven"] == {instance(home): [agent.endpoint]}
        assert findings["warn"]["endpoint"] == stale
        assert "not proven" in findings["warn"]["detail"]
        assert relay.forwarded == 1  # the challenge did reach the real instance
        assert "presence_relayed" in agent.log.read_text()
