"""The FETCHes of ``rebuild --from-peers`` carry a fresh request id, and only an answer
echoing it is taken (talos.client.mirror_fetch; docs/design/mirrors.md).

A real listener plays the mirror: it answers each FETCH with a replay of its
answer to the previous one (a stale copy, validly signed by the mirror) and
then with the real answer. Without request ids the stale copy would be
taken as the answer to the second FETCH.
"""

from __future__ import annotations

import time

import pytest

from talos.client.asking import Asking, Peer
from talos.client.mirror_fetch import _Session
from talos.core import mirror, wire
from talos.core.identity import Identity
from talos.testing import FakeClock, SeededRng
from talos.transport import Link, Transport

pytestmark = pytest.mark.asyncio

CLOCK = FakeClock(start=time.time())
ORIGIN = Identity.create("origin", rng=SeededRng(1), clock=CLOCK)
MIRROR = Identity.create("mirror", rng=SeededRng(2), clock=CLOCK)
RNG = SeededRng(3)


def entries(held: int, request: bytes | None) -> bytes:
    """An empty ENTRIES answer saying the mirror holds ``held``, signed by the mirror."""
    envelope = wire.Envelope(
        type=wire.EnvelopeType.MIRROR,
        message_id=wire.new_message_id(RNG),
        sender=MIRROR.agent_id,
        sender_instance=b"\x03" * 16,
        recipient=ORIGIN.agent_id,
        timestamp_ms=int(CLOCK.time() * 1000),
        mirror_kind=mirror.MirrorKind.ENTRIES,
        mirror_body=mirror.encode_body(mirror.Entries(0, (), None, held, request)),
    )
    return wire.seal(envelope, MIRROR.signing_key)


async def test_an_answer_to_an_earlier_fetch_is_not_taken_for_the_next() -> None:
    fetched: list[mirror.Fetch] = []
    sent: list[bytes] = []

    async def on_frame(link: Link, frame: bytes) -> None:
        envelope = wire.verify(wire.decode(frame), ORIGIN.state.signing_key)
        body = mirror.decode_body(mirror.MirrorKind.FETCH, envelope.mirror_body or b"")
        assert isinstance(body, mirror.Fetch)
        fetched.append(body)
        for stale in sent:  # a copy of every earlier answer comes first
            await link.send(stale)
        sent.append(entries(len(fetched), body.request))
        await link.send(sent[-1])

    transport = Transport(on_frame, clock=CLOCK)
    host, port = await transport.listen("127.0.0.1", 0)
    try:
        peer = Peer(MIRROR.agent_id, MIRROR.keylog, f"ws://{host}:{port}")
        async with Asking(
            peer, me=ORIGIN.agent_id, kind=wire.EnvelopeType.MIRROR, clock=CLOCK
        ) as asking:
            session = _Session(ORIGIN, asking, clock=CLOCK, rng=SeededRng(4))
            answers = [await session.fetch(MIRROR.agent_id, 0) for _ in range(3)]
            stale = asking.set_aside
    finally:
        await transport.close()
    assert [a.held for a in answers if isinstance(a, mirror.Entries)] == [1, 2, 3]
    requests = [f.request for f in fetched]
    assert all(r is not None and len(r) == mirror.REQUEST_ID_SIZE for r in requests)
    assert len(set(requests)) == 3  # a fresh id each time
    assert len(stale) == 3  # 1 copy before the 2nd answer, 2 before the 3rd
    assert all("another request" in why for why in stale)
