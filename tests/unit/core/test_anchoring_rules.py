"""talos.core.anchoring: an anchor's states, reorgs, finality and the retry schedule, as data."""

from __future__ import annotations

import cbor2
import pytest

from talos.core.anchoring import (
    Anchor,
    AnchorState,
    Broadcast,
    Finality,
    Inclusion,
    Observation,
    Outcome,
    Schedule,
    follow,
    wants_anchor,
)
from talos.errors import ConfigurationError, MalformedFrame
from talos.testing import FakeClock, SeededRng

TX = Broadcast(b"\x01" * 32, b"\x02raw", max_fee=100, priority_fee=10)
ANCHOR = Anchor(5, b"\xaa" * 32, nonce=3, broadcasts=(TX,), created=1.5)
IN_BLOCK_7 = Inclusion(TX.tx_hash, 7, b"\x07" * 32)


def seen(
    inclusion: Inclusion | None = None,
    *,
    head: int = 7,
    finalized: int | None = None,
    reverted: bool = False,
    nonce_used: bool = False,
) -> Observation:
    return Observation(inclusion, reverted, head, finalized, nonce_used)


def test_pending_then_included_then_final_by_confirmations() -> None:
    three = Finality(confirmations=3)
    same, outcome = follow(ANCHOR, seen(), three)
    assert (same, outcome) == (ANCHOR, Outcome.WAITING)
    included, outcome = follow(ANCHOR, seen(IN_BLOCK_7, head=8), three)
    assert outcome is Outcome.INCLUDED
    assert included.state is AnchorState.INCLUDED
    assert included.inclusion == IN_BLOCK_7
    final, outcome = follow(included, seen(IN_BLOCK_7, head=9), three)
    assert outcome is Outcome.FINAL
    assert final.state is AnchorState.FINAL


def test_final_by_the_chain_s_finalized_block() -> None:
    chain = Finality()
    _, outcome = follow(ANCHOR, seen(IN_BLOCK_7, head=100, finalized=6), chain)
    assert outcome is Outcome.INCLUDED
    _, outcome = follow(ANCHOR, seen(IN_BLOCK_7, head=100, finalized=None), chain)
    assert outcome is Outcome.INCLUDED
    _, outcome = follow(ANCHOR, seen(IN_BLOCK_7, head=100, finalized=7), chain)
    assert outcome is Outcome.FINAL


def test_a_reorg_that_drops_the_transaction_sends_it_back_to_pending() -> None:
    included, _ = follow(ANCHOR, seen(IN_BLOCK_7), Finality(5))
    back, outcome = follow(included, seen(None, head=9), Finality(5))
    assert outcome is Outcome.REORGED
    assert back.state is AnchorState.PENDING
    assert back.inclusion is None
    assert back.broadcasts == ANCHOR.broadcasts


def test_a_reorg_that_moves_the_transaction_keeps_it_included_in_the_new_block() -> None:
    included, _ = follow(ANCHOR, seen(IN_BLOCK_7), Finality(5))
    elsewhere = Inclusion(TX.tx_hash, 8, b"\x08" * 32)
    moved, outcome = follow(included, seen(elsewhere, head=9), Finality(5))
    assert outcome is Outcome.REORGED
    assert moved.state is AnchorState.INCLUDED
    assert moved.inclusion == elsewhere


def test_reverted_and_lost_anchors() -> None:
    assert follow(ANCHOR, seen(reverted=True), Finality(1))[1] is Outcome.REVERTED
    assert follow(ANCHOR, seen(nonce_used=True), Finality(1))[1] is Outcome.LOST


def test_a_replacement_raises_both_fees_and_keeps_nonce_and_call() -> None:
    higher = Broadcast(b"\x03" * 32, b"\x04raw", max_fee=125, priority_fee=13)
    replaced = ANCHOR.with_broadcast(higher)
    assert replaced.latest == higher
    assert replaced.nonce == ANCHOR.nonce
    assert replaced.tree_size == ANCHOR.tree_size
    with pytest.raises(ValueError, match="both fees"):
        ANCHOR.with_broadcast(Broadcast(b"\x03" * 32, b"x", max_fee=200, priority_fee=10))


def test_merging_one_anchor_at_a_time_for_the_newest_size() -> None:
    assert wants_anchor(10, 0, None)
    assert not wants_anchor(10, 10, None)
    assert not wants_anchor(12, 10, ANCHOR)


def test_stored_form_round_trips_and_refuses_damage() -> None:
    included, _ = follow(ANCHOR, seen(IN_BLOCK_7), Finality(5))
    for anchor in (ANCHOR, included):
        raw = cbor2.dumps(anchor.to_map(), canonical=True)
        assert Anchor.from_map(cbor2.loads(raw)) == anchor
    damaged = [
        {**ANCHOR.to_map(), "v": 2},
        {**ANCHOR.to_map(), "root": b"short"},
        {**ANCHOR.to_map(), "txs": []},
        {**ANCHOR.to_map(), "state": "included"},  # included without a block
        {**ANCHOR.to_map(), "nonce": -1},
        {k: v for k, v in ANCHOR.to_map().items() if k != "size"},
        "not a map",
    ]
    for value in damaged:
        with pytest.raises(MalformedFrame):
            Anchor.from_map(value)


def test_backoff_grows_with_jitter_and_never_exceeds_the_interval() -> None:
    clock, rng = FakeClock(), SeededRng(3)
    schedule = Schedule(interval=60.0, poll=5.0, retry_base=2.0)
    delays = []
    for _ in range(12):
        now = clock.monotonic()
        schedule = schedule.failed(now, rng)
        delays.append(schedule.next_at - now)
        clock.advance(schedule.next_at - now)
    assert schedule.failures == 12
    assert all(0 < d <= 60.0 for d in delays)
    assert 1.0 <= delays[0] <= 2.0  # equal jitter: between half and all of the base
    assert delays[-1] >= 30.0  # capped at the interval, jittered down at most to half
    assert len(set(delays)) > 6  # jittered, not lock-step
    recovered = schedule.succeeded(clock.monotonic(), in_flight=True)
    assert recovered.failures == 0
    assert recovered.next_at == clock.monotonic() + 5.0


def test_one_start_per_interval() -> None:
    schedule = Schedule(interval=600.0, poll=5.0)
    assert schedule.may_start(0.0)
    started = schedule.started(100.0)
    assert not started.may_start(699.0)
    assert started.may_start(700.0)
    idle = started.succeeded(100.0, in_flight=False)
    assert idle.next_at == 700.0


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        Schedule(interval=10.0, poll=20.0)
    with pytest.raises(ConfigurationError):
        Finality(confirmations=0)
