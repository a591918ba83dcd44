"""A witness's bounds, as real processes (issue 16, hardening).

* The heads a witness keeps are capped (``--witness-max-origins``): a new
  stranger takes the place of the stranger whose head is oldest; the peers it
  has a session with and its configured witnesses are never evicted, and when
  every head is theirs a new stranger is refused ``witness_full``.
* A restored origin is an equivocation once: audited, counted and alerted on
  both sides the first time; the same conflict seen again is counted
  (``talos_audit_equivocations_repeated_total``) and never audited again, and
  the origin stops sending checkpoints to that witness, with one clear event
  saying why and what to do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import witness_cast
from rotation_cast import CLI, WAIT, ok
from witness_cast import (
    WitnessPeer,
    checkpoint_frame,
    cosignature_answer,
    signed_checkpoint,
)

from talos.client.witnessing import WITNESS_RATE
from talos.core import wire
from talos.testing.waiting import wait_until

pytestmark = pytest.mark.slow

# The shared fixtures, bound here by name for pytest.
launcher, cast = witness_cast.launcher, witness_cast.cast


def _first_checkpoint(stranger: WitnessPeer, witness: WitnessPeer) -> wire.Envelope:
    """``stranger`` (registered, stopped) offers ``witness`` a first head of its log."""
    identity = stranger.identity()
    checkpoint = signed_checkpoint(identity, 1, os.urandom(32))
    answer = cosignature_answer(
        witness.url, checkpoint_frame(identity, witness.agent_id, checkpoint)
    )
    assert answer is not None
    return answer


def test_a_witness_keeps_heads_for_a_bounded_number_of_origins(
    cast: Callable[..., WitnessPeer],
) -> None:
    strangers = [cast(f"stranger{n}") for n in range(3)]
    for stranger in strangers:  # registered (their key logs are in the registry), then gone
        stranger.start()
        stranger.stop()
    s0, s1, s2 = strangers
    alice = cast("alice")
    # bob keeps 2 heads; s0 is one of his configured witnesses (protected).
    bob = cast("bob", "--witness-max-origins", "2", "--audit-witness", s0.agent_id)
    alice.start(), bob.start()
    assert alice.send(bob, "hello").startswith("delivered ")  # a session: alice is protected
    wait_until(lambda: alice.cosigned(bob), WAIT, what="bob cosigned alice's checkpoint")
    assert _first_checkpoint(s0, bob).cosign_status is wire.CosignStatus.COSIGNED
    # Both heads are protected: a new stranger finds no room, and is told so.
    refused = _first_checkpoint(s1, bob)
    assert (refused.cosign_status, refused.reason) == (wire.CosignStatus.REFUSED, "witness_full")
    assert bob.metric("talos_audit_checkpoints_refused_total", reason="witness_full") == 1

    # bob again, with room for 3 and s0 no longer his witness: strangers now take
    # each other's places, oldest first; alice's head is never touched.
    bob.stop()
    bob.extra = ("--witness-max-origins", "3")
    bob.start()
    assert _first_checkpoint(s1, bob).cosign_status is wire.CosignStatus.COSIGNED  # 3 of 3
    assert _first_checkpoint(s2, bob).cosign_status is wire.CosignStatus.COSIGNED  # s0 goes
    assert bob.metric("talos_audit_witness_origins_evicted_total") == 1
    again = _first_checkpoint(s0, bob)  # s0 is new again (its head was dropped): s1 goes
    assert again.cosign_status is wire.CosignStatus.COSIGNED
    assert bob.metric("talos_audit_witness_origins_evicted_total") == 2
    assert "witness_origin_evicted" in bob.log_text()
    # alice's head is still held: a fork of it is still refused as one.
    held = max(e["data"]["size"] for e in alice.cosigned(bob))
    identity = alice.identity()
    fork = signed_checkpoint(identity, held, os.urandom(32))
    answer = cosignature_answer(bob.url, checkpoint_frame(identity, bob.agent_id, fork, old=held))
    assert answer is not None
    assert (answer.cosign_status, answer.reason) == (wire.CosignStatus.CONFLICT, "fork")
    CLI.fails(bob.home, 2, "run", "--offline", "--witness-max-origins", "0")


def _refused(peer: WitnessPeer, reason: str) -> float:
    return peer.metric("talos_audit_checkpoints_refused_total", reason=reason)


def _all_refused(peer: WitnessPeer) -> float:
    reasons = ("rollback", "inconsistent", "stale")
    return sum(_refused(peer, reason) for reason in reasons)


def test_a_restored_origin_is_an_equivocation_once_and_stops_sending(
    cast: Callable[..., WitnessPeer], tmp_path: Path
) -> None:
    bob = cast("bob")
    alice = cast("alice", "--audit-witness", bob.agent_id)
    alice.start(), bob.start()
    assert alice.send(bob, "a0").startswith("delivered ")
    wait_until(lambda: alice.cosigned(bob), WAIT, what="bob cosigned alice's checkpoint")
    alice.stop()
    backup = tmp_path / "alice-backup"
    ok(alice.home, "audit", "backup", "--out", str(backup))
    alice.start()
    first = max(e["data"]["size"] for e in alice.cosigned(bob))
    for n in range(5):
        assert alice.send(bob, f"a{n + 1}").startswith("delivered ")
    alice.stop(), alice.start()  # a new link: her newest checkpoint goes to bob
    wait_until(
        lambda: max(e["data"]["size"] for e in alice.cosigned(bob)) > first + 5,
        WAIT,
        what="bob cosigned alice's grown log",
    )
    alice.stop()
    ok(alice.home, "audit", "restore", "--backup", str(backup))

    # The first detection: audited, counted and explained on both sides.
    alice.start()
    wait_until(lambda: alice.equivocations(), WAIT, what="alice read bob's conflict answer")
    wait_until(lambda: bob.equivocations(), WAIT, what="bob audited the rollback")
    assert alice.metric("talos_audit_equivocations_total", role="origin") == 1
    assert bob.metric("talos_audit_equivocations_total", role="witness") == 1
    log = alice.log_text()
    assert log.count("event=witness_conflict_paused") == 1
    assert "rebuild --from-peers" in log
    refused = _all_refused(bob)

    # Alice restarts twice and messages bob (new links, a witness round at each
    # start): she sends bob no checkpoint, and nothing new is audited anywhere.
    for n in range(2):
        alice.stop(), alice.start()
        assert alice.send(bob, f"again {n}").startswith("delivered ")
    assert len(alice.equivocations()) == 1
    assert len(bob.equivocations()) == 1
    assert _all_refused(bob) == refused

    # The same conflict offered to bob again (alice's real key, a fresh frame): refused,
    # counted as a repeat, not audited or alerted on again.
    held = max(e["data"]["held_size"] for e in bob.equivocations())
    identity = alice.identity()
    again = signed_checkpoint(identity, 1, os.urandom(32))
    assert held > 1
    answer = cosignature_answer(bob.url, checkpoint_frame(identity, bob.agent_id, again))
    assert answer is not None
    if answer.reason == "rate_limited":
        # Alice's own checkpoints of this minute spent bob's burst for her (a slow
        # machine stretches the test over several witness rounds); one comes back.
        time.sleep(1 / WITNESS_RATE + 1)
        answer = cosignature_answer(bob.url, checkpoint_frame(identity, bob.agent_id, again))
        assert answer is not None
    assert (answer.cosign_status, answer.reason) == (wire.CosignStatus.CONFLICT, "rollback")
    assert bob.metric("talos_audit_equivocations_repeated_total", role="witness") >= 1
    assert bob.metric("talos_audit_equivocations_total", role="witness") == 1
    assert len(bob.equivocations()) == 1
    assert "event=audit_equivocation_repeated" in bob.log_text()
