"""Asking one peer once (talos.client.asking), over real sockets.

A real listener plays the peer and answers with what each test scripts:
nothing, a frame signed by another key, a proof ``read`` rejects, then the
real answer. Only a verified answer that ``read`` accepts is returned, a
frame set aside never ends the wait, and the deadline does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from talos.client.asking import (
    MAX_SET_ASIDE,
    Asking,
    NoAnswer,
    NotFound,
    Peer,
    Rejected,
    Unreachable,
    ask_once,
    look_up,
)
from talos.client.mirror_fetch import MemoryPeerCache
from talos.core import wire
from talos.core.crypto import SigningKey
from talos.core.identity import Identity
from talos.peers import PeerDirectory
from talos.testing import FakeClock, SeededRng
from talos.testing.processes import free_port
from talos.transport import Link, Transport

pytestmark = pytest.mark.asyncio

CLOCK = FakeClock(start=time.time())
ASKER = Identity.create("asker", rng=SeededRng(1), clock=CLOCK)
PEER = Identity.create("peer", rng=SeededRng(2), clock=CLOCK)
OTHER_KEY = SigningKey.generate(SeededRng(3))
RNG = SeededRng(4)


def answer(note: str, key: SigningKey = PEER.signing_key, sender: str = PEER.agent_id) -> bytes:
    """A COSIGNATURE envelope to the asker carrying ``note`` (as its reason)."""
    envelope = wire.Envelope(
        type=wire.EnvelopeType.COSIGNATURE,
        message_id=wire.new_message_id(RNG),
        sender=sender,
        sender_instance=b"\x01" * 16,
        recipient=ASKER.agent_id,
        timestamp_ms=int(CLOCK.time() * 1000),
        tree_size=0,
        tree_root=b"\x00" * 32,
        cosign_status=wire.CosignStatus.REFUSED,
        held_size=0,
        reason=note,
    )
    return wire.seal(envelope, key)


def question() -> bytes:
    envelope = wire.Envelope(
        type=wire.EnvelopeType.CHECKPOINT,
        message_id=wire.new_message_id(RNG),
        sender=ASKER.agent_id,
        sender_instance=b"\x02" * 16,
        recipient=PEER.agent_id,
        timestamp_ms=int(CLOCK.time() * 1000),
        checkpoint_note=b"a question",
        old_size=0,
        consistency=(),
    )
    return wire.seal(envelope, ASKER.signing_key)


def reason(envelope: wire.Envelope) -> str:
    """The ``read`` of these tests: the answer's note; ``bad`` is rejected, ``skip`` ignored."""
    if envelope.reason == "bad":
        raise Rejected("a bad note")
    return None if envelope.reason == "skip" else str(envelope.reason)


@asynccontextmanager
async def peer(script: Callable[[int], list[bytes]]) -> AsyncIterator[tuple[Peer, list[bytes]]]:
    """A listener that answers the n-th question (from 0) with ``script(n)``; yields the
    peer to ask and the questions it received."""
    received: list[bytes] = []

    async def on_frame(link: Link, frame: bytes) -> None:
        received.append(frame)
        for reply in script(len(received) - 1):
            await link.send(reply)

    transport = Transport(on_frame, clock=CLOCK)
    host, port = await transport.listen("127.0.0.1", 0)
    try:
        yield Peer(PEER.agent_id, PEER.keylog, f"ws://{host}:{port}"), received
    finally:
        await transport.close()


async def ask(target: Peer, within: float = 5.0) -> str:
    return await ask_once(
        target,
        question(),
        reason,
        me=ASKER.agent_id,
        kind=wire.EnvelopeType.COSIGNATURE,
        within=within,
        clock=CLOCK,
    )


async def test_the_first_verified_answer_is_returned() -> None:
    async with peer(lambda n: [answer("first"), answer("second")]) as (target, received):
        assert await ask(target) == "first"
    assert len(received) == 1  # one question sent


async def test_an_unreachable_peer_is_named_unreachable() -> None:
    nobody = Peer(PEER.agent_id, PEER.keylog, f"ws://127.0.0.1:{free_port()}")
    with pytest.raises(Unreachable, match="unreachable"):
        await ask(nobody)


async def test_a_silent_peer_ends_at_the_deadline() -> None:
    async with peer(lambda n: []) as (target, received):
        started = asyncio.get_running_loop().time()
        with pytest.raises(NoAnswer, match=r"no answer within 0s") as caught:
            await ask(target, within=0.3)
        assert asyncio.get_running_loop().time() - started >= 0.3
    assert caught.value.set_aside == ()
    assert len(received) == 1


async def test_an_answer_with_a_bad_signature_is_set_aside_not_accepted() -> None:
    forged = answer("forged", key=OTHER_KEY)
    async with peer(lambda n: [forged, answer("real")]) as (target, _):
        assert await ask(target) == "real"  # the forgery did not end the wait
    async with peer(lambda n: [forged]) as (target, _):
        with pytest.raises(NoAnswer) as caught:
            await ask(target, within=0.5)
    (why,) = caught.value.set_aside
    assert why.startswith("SignatureInvalid")
    assert "set aside: SignatureInvalid" in str(caught.value)


async def test_frames_from_another_sender_or_type_are_set_aside() -> None:
    stranger = answer("stranger", key=OTHER_KEY, sender=ASKER.agent_id)
    async with peer(lambda n: [question(), stranger, answer("real")]) as (target, _):
        async with Asking(
            target, me=ASKER.agent_id, kind=wire.EnvelopeType.COSIGNATURE, clock=CLOCK
        ) as asking:
            assert await asking.ask(question(), reason, within=5) == "real"
            await_set_aside = asking.set_aside
    assert [why.split(":")[0] for why in await_set_aside] == ["RemoteProtocolError"] * 2


async def test_what_read_rejects_or_ignores_is_not_the_answer() -> None:
    script = [answer("bad"), answer("skip"), answer("good")]
    async with peer(lambda n: script) as (target, _):
        async with Asking(
            target, me=ASKER.agent_id, kind=wire.EnvelopeType.COSIGNATURE, clock=CLOCK
        ) as asking:
            assert await asking.ask(question(), reason, within=5) == "good"
            assert asking.set_aside == ("Rejected: a bad note",)


async def test_several_questions_on_one_link_and_a_bounded_evidence_list() -> None:
    forged = answer("forged", key=OTHER_KEY)
    async with peer(lambda n: [forged] * MAX_SET_ASIDE + [answer(f"answer {n}")]) as (
        target,
        received,
    ):
        async with Asking(
            target, me=ASKER.agent_id, kind=wire.EnvelopeType.COSIGNATURE, clock=CLOCK
        ) as asking:
            assert await asking.ask(question(), reason, within=5) == "answer 0"
            assert await asking.ask(question(), reason, within=5) == "answer 1"
            assert len(asking.set_aside) == MAX_SET_ASIDE  # 16 forgeries, 8 reasons kept
    assert len(received) == 2


async def test_a_peer_nobody_knows_is_not_found() -> None:
    directory = PeerDirectory(MemoryPeerCache(), [], clock=CLOCK, own=ASKER.keylog)
    with pytest.raises(NotFound, match="not found"):
        await look_up(directory, PEER.agent_id)
