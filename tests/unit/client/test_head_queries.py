"""The asking side of a witness head query keeps only answers signed after it asked."""

from __future__ import annotations

import time

import pytest

from talos.client.head_queries import FRESH_MS, _Asker
from talos.core import wire
from talos.core.identity import Identity
from talos.testing import FakeClock, SeededRng

pytestmark = pytest.mark.asyncio


def _answer(witness: Identity, origin: str, timestamp_ms: int) -> bytes:
    envelope = wire.Envelope(
        type=wire.EnvelopeType.COSIGNATURE,
        message_id=SeededRng(timestamp_ms).bytes(16),
        sender=witness.agent_id,
        sender_instance=b"\x01" * 16,
        recipient=origin,
        timestamp_ms=timestamp_ms,
        tree_size=0,
        tree_root=b"\x00" * 32,
        cosign_status=wire.CosignStatus.REFUSED,
        held_size=0,
        reason="no_head",
    )
    return wire.seal(envelope, witness.signing_key)


async def test_an_answer_signed_before_the_query_is_ignored() -> None:
    clock = FakeClock(start=time.time())
    origin = Identity.create("origin", rng=SeededRng(1), clock=clock)
    witness = Identity.create("witness", rng=SeededRng(2), clock=clock)
    asker = _Asker(origin, witness.agent_id, witness.keylog, SeededRng(3))
    asker.query(clock)
    recorded = _answer(witness, origin.agent_id, asker.asked_ms - FRESH_MS - 1)
    await asker.on_frame(None, recorded)  # type: ignore[arg-type]
    assert not asker.answer.done()
    fresh = _answer(witness, origin.agent_id, asker.asked_ms + 5)
    await asker.on_frame(None, fresh)  # type: ignore[arg-type]
    assert asker.answer.done()
    assert asker.answer.result().timestamp_ms == asker.asked_ms + 5
