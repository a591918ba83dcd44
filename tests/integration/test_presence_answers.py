"""A running agent answers PRESENCE challenges: only its own identity's, and at a bounded rate.

A real agent (``TalosClient``, real LMDB, a real listener) and a real
WebSocket client; time is a ``FakeClock`` so the rate limit does not refill
while the test runs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.client import TalosClient
from talos.client.presence import PresenceAnswers
from talos.core import presence, wire
from talos.core.clock import time_ms
from talos.core.identity import Identity
from talos.storage.home import AgentHome
from talos.system import SYSTEM_RNG
from talos.testing import FakeClock
from talos.transport import Link, Transport

pytestmark = pytest.mark.asyncio


def challenge(
    identity: Identity, recipient: str, now_ms: int, endpoint: str | None = None
) -> tuple[bytes, bytes]:
    """A sealed CHALLENGE as ``identity`` to ``recipient`` (naming ``endpoint``), and its nonce."""
    nonce = SYSTEM_RNG.bytes(presence.NONCE_SIZE)
    envelope = wire.Envelope(
        type=wire.EnvelopeType.PRESENCE,
        message_id=wire.new_message_id(SYSTEM_RNG),
        sender=identity.agent_id,
        sender_instance=wire.new_instance_id(SYSTEM_RNG),
        recipient=recipient,
        timestamp_ms=now_ms,
        presence_kind=presence.PresenceKind.CHALLENGE,
        presence_body=presence.encode_body(presence.Challenge(nonce, endpoint)),
    )
    return wire.seal(envelope, identity.signing_key), nonce


def challenges(client: TalosClient, outcome: str) -> float:
    """``talos_presence_challenges_total{outcome=...}`` in one scrape of ``client``."""
    for family in text_string_to_metric_families(client.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "talos_presence_challenges_total" and sample.labels == {
                "outcome": outcome
            }:
                return float(sample.value)
    raise AssertionError("no talos_presence_challenges_total")


async def wait_for(client: TalosClient, outcome: str, count: int) -> None:
    """Until the agent has counted ``count`` challenges with ``outcome`` (real time, 10 s)."""
    deadline = time.monotonic() + 10
    while challenges(client, outcome) < count:
        assert time.monotonic() < deadline, f"{outcome}: {challenges(client, outcome)} < {count}"
        await asyncio.sleep(0.01)  # the agent runs on this loop: yield to it


async def test_only_the_own_identity_is_answered_and_at_a_bounded_rate(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_frame(link: Link, frame: bytes) -> None:
        answers.put_nowait(frame)

    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], clock=clock) as alice,
        TalosClient.create("mallory", home=tmp_path / "m", discovery=[], clock=clock),
    ):
        me = AgentHome(tmp_path / "a").load_identity(passphrase=None)
        stranger = AgentHome(tmp_path / "m").load_identity(passphrase=None)
        transport = Transport(on_frame, clock=clock)
        try:
            link = await transport.connect(alice.status()["endpoint"])
            # A stranger's challenge (even addressed to alice) gets no proof.
            sealed, _ = challenge(stranger, alice.agent_id, time_ms(clock))
            await link.send(sealed)
            # Alice's own: the limiter's burst is answered, the rest refused.
            nonces = []
            for _ in range(8):
                sealed, nonce = challenge(me, me.agent_id, time_ms(clock))
                nonces.append(nonce)
                await link.send(sealed)
            await wait_for(alice, "refused", 1 + 8 - PresenceAnswers.BURST)
            clock.advance(2)  # the limiter refills (an unverified link lives 10 s)
            sealed, last = challenge(me, me.agent_id, time_ms(clock))
            await link.send(sealed)
            await wait_for(alice, "proved", PresenceAnswers.BURST + 1)
            proofs = []
            for _ in range(PresenceAnswers.BURST + 1):
                envelope = wire.verify(wire.decode(answers.get_nowait()), me.state.signing_key)
                body = presence.decode_body(
                    presence.PresenceKind.PROOF, envelope.presence_body or b""
                )
                assert isinstance(body, presence.Proof)
                assert body.instance_id == bytes.fromhex(alice.status()["instance_id"])
                proofs.append(body)
        finally:
            await transport.close()
    assert [p.nonce for p in proofs] == [*nonces[: PresenceAnswers.BURST], last]


async def test_a_challenge_for_another_endpoint_or_a_replay_gets_no_proof(tmp_path: Path) -> None:
    """The proof is bound to the endpoint challenged: a challenge naming an endpoint alice
    does not listen on (relayed from another listing) is refused, and so is a challenge
    she already answered (replayed); each counted and logged as what it is."""
    clock = FakeClock(start=time.time())
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_frame(link: Link, frame: bytes) -> None:
        answers.put_nowait(frame)

    async with TalosClient.create("alice", home=tmp_path / "a", discovery=[], clock=clock) as alice:
        me = AgentHome(tmp_path / "a").load_identity(passphrase=None)
        endpoint = alice.status()["endpoint"]
        transport = Transport(on_frame, clock=clock)
        try:
            link = await transport.connect(endpoint)
            stale = "ws://192.0.2.7:4242"  # a stale listing relayed to alice
            relayed, _ = challenge(me, me.agent_id, time_ms(clock), endpoint=stale)
            await link.send(relayed)
            await wait_for(alice, "relayed", 1)
            sealed, nonce = challenge(me, me.agent_id, time_ms(clock), endpoint=endpoint)
            await link.send(sealed)
            await wait_for(alice, "proved", 1)
            await link.send(sealed)  # the same challenge again
            await wait_for(alice, "replayed", 1)
            clock.advance(2)  # the limiter refills: a fresh challenge is answered again
            again, last = challenge(me, me.agent_id, time_ms(clock), endpoint=endpoint)
            await link.send(again)
            await wait_for(alice, "proved", 2)
        finally:
            await transport.close()
    proofs = []
    while not answers.empty():
        envelope = wire.verify(wire.decode(answers.get_nowait()), me.state.signing_key)
        body = presence.decode_body(presence.PresenceKind.PROOF, envelope.presence_body or b"")
        assert isinstance(body, presence.Proof)
        proofs.append(body.nonce)
    assert proofs == [nonce, last]  # one proof each: none for the relayed nor the replay
    assert challenges(alice, "refused") == 0
