"""The asking side of a witness head query keeps only answers signed after it asked."""

from __future__ import annotations

import time

import pytest

from talos.client.asking import Rejected
from talos.client.head_queries import FRESH_MS, _fresh
from talos.core import wire
from talos.core.identity import Identity
from talos.testing import FakeClock, SeededRng


def _answer(witness: Identity, origin: str, timestamp_ms: int) -> wire.Envelope:
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
    sealed = wire.seal(envelope, witness.signing_key)
    return wire.verify(wire.decode(sealed), witness.state.signing_key)


def test_an_answer_signed_before_the_query_is_ignored() -> None:
    clock = FakeClock(start=time.time())
    origin = Identity.create("origin", rng=SeededRng(1), clock=clock)
    witness = Identity.create("witness", rng=SeededRng(2), clock=clock)
    asked_ms = int(clock.time() * 1000)
    read = _fresh(asked_ms)
    with pytest.raises(Rejected, match="replayed"):
        read(_answer(witness, origin.agent_id, asked_ms - FRESH_MS - 1))
    fresh = _answer(witness, origin.agent_id, asked_ms + 5)
    assert read(fresh).timestamp_ms == asked_ms + 5
