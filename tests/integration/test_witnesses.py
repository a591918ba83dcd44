"""Peers as witnesses of each other's audit logs, as real processes over a real registry.

Two agents that message each other cosign each other's checkpoints; a
configured witness that is no messaging peer cosigns too; a home put back
from an earlier copy (its log rolled back) and a forked checkpoint signed
with the origin's real key are refused and audited on both sides; bad
CHECKPOINT frames get a clear refusal and nothing is stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import witness_cast
from rotation_cast import CLI, WAIT, grant, ok
from witness_cast import (
    WitnessPeer,
    audit_size,
    checkpoint_frame,
    cosignature_answer,
    signed_checkpoint,
)

from talos.client.witnessing import WITNESS_BURST
from talos.core import wire
from talos.core.audit.cosignature import Cosignature
from talos.testing.waiting import wait_until

pytestmark = pytest.mark.slow

# The shared fixtures, bound here by name for pytest.
launcher, cast = witness_cast.launcher, witness_cast.cast


def test_two_agents_that_talk_cosign_each_other(cast: Callable[..., WitnessPeer]) -> None:
    alice, bob = cast("alice"), cast("bob")
    alice.start(), bob.start()
    assert alice.send(bob, "hello").startswith("delivered ")
    assert bob.send(alice, "hi").startswith("delivered ")
    wait_until(lambda: alice.cosigned(bob), WAIT, what="bob cosigned alice's checkpoint")
    wait_until(lambda: bob.cosigned(alice), WAIT, what="alice cosigned bob's checkpoint")
    entry = alice.cosigned(bob)[0]
    assert set(entry["data"]) == {"size", "root", "ks", "ts", "sig"}
    assert alice.metric("talos_audit_checkpoints_cosigned_total", role="origin") >= 1
    assert alice.metric("talos_audit_checkpoints_cosigned_total", role="witness") >= 1
    assert bob.metric("talos_audit_checkpoints_cosigned_total", role="witness") >= 1
    assert alice.metric("talos_audit_equivocations_total", role="origin") == 0
    assert "event=cosignature_received" in alice.log_text()
    assert "event=checkpoint_cosigned" in bob.log_text()


def test_a_configured_witness_that_is_no_messaging_peer_cosigns(
    cast: Callable[..., WitnessPeer], tmp_path: Path
) -> None:
    carol = cast("carol")
    alice = cast("alice", "--audit-witness", carol.agent_id)
    grant(alice, carol)  # something in alice's log to witness (an empty log has nothing)
    carol.start()
    alice.start()
    wait_until(lambda: alice.cosigned(carol), WAIT, what="carol cosigned alice's checkpoint")
    assert carol.inbox() == []
    assert alice.inbox() == []
    assert carol.metric("talos_audit_checkpoints_cosigned_total", role="witness") >= 1

    # The proof file of an entry carries carol's cosignature; verify-proof checks it
    # against carol's key log.
    proof = tmp_path / "proof.json"
    ok(alice.home, "audit", "prove", "0", "--out", str(proof))
    assert '"witnessed"' in proof.read_text()
    carol_log = tmp_path / "carol-keylog.cbor"
    carol_log.write_bytes(carol.identity().keylog.to_bytes())
    checked = ok(alice.home, "audit", "verify-proof", "--proof", str(proof),
                 "--witness-log", str(carol_log))  # fmt: skip
    assert f"cosigned by {carol.agent_id}" in checked


def test_a_rolled_back_log_and_a_forked_checkpoint_are_refused_on_both_sides(
    cast: Callable[..., WitnessPeer], tmp_path: Path
) -> None:
    alice, bob = cast("alice"), cast("bob")
    earlier = tmp_path / "alice-earlier"
    alice.copy_home(earlier)
    alice.start(), bob.start()
    for n in range(3):
        assert alice.send(bob, f"a{n}").startswith("delivered ")
    wait_until(lambda: alice.cosigned(bob), WAIT, what="bob cosigned alice's checkpoint")
    held = max(e["data"]["size"] for e in alice.cosigned(bob))

    # A fork: a checkpoint of the size bob holds, another root, signed with alice's
    # real key. Refused with bob's head; nothing stored; audited and counted.
    identity = alice.identity()
    fork = signed_checkpoint(identity, held, os.urandom(32))
    answer = cosignature_answer(bob.url, checkpoint_frame(identity, bob.agent_id, fork, old=held))
    assert answer is not None
    assert answer.cosign_status is wire.CosignStatus.CONFLICT
    assert (answer.reason, answer.held_size) == ("fork", held)
    assert answer.cosignature is None
    wait_until(lambda: bob.equivocations(), WAIT, what="bob audited the fork")
    assert bob.equivocations()[0]["data"]["reason"] == "fork"
    assert bob.metric("talos_audit_equivocations_total", role="witness") == 1
    assert bob.metric("talos_audit_checkpoints_refused_total", reason="fork") == 1

    # A frame of alice's captured earlier and replayed (an older head, sent an hour
    # ago): stale, not an equivocation.
    hour_ago = int((time.time() - 3600) * 1000)
    older = signed_checkpoint(identity, held - 1, os.urandom(32))
    replayed = checkpoint_frame(identity, bob.agent_id, older, sent_ms=hour_ago)
    answer = cosignature_answer(bob.url, replayed)
    assert answer is not None
    assert (answer.cosign_status, answer.reason) == (wire.CosignStatus.CONFLICT, "stale")
    assert bob.metric("talos_audit_equivocations_total", role="witness") == 1

    # The real alice is still cosigned after the fork was refused (bob kept her head).
    bob.stop(), bob.start()
    assert alice.send(bob, "after the fork").startswith("delivered ")
    wait_until(
        lambda: max(e["data"]["size"] for e in alice.cosigned(bob)) > held,
        WAIT,
        what="bob cosigned alice's next checkpoint",
    )

    # A rollback: alice's home is put back from the earlier copy.
    alice.stop()
    alice.put_home_back(earlier)
    alice.start()
    assert audit_size(alice) < held
    assert alice.send(bob, "from the past").startswith("delivered ")
    wait_until(lambda: alice.equivocations(), WAIT, what="alice audited the rollback")
    mine = alice.equivocations()[0]["data"]
    assert (mine["role"], mine["reason"]) == ("origin", "rollback")
    assert alice.metric("talos_audit_equivocations_total", role="origin") == 1
    wait_until(lambda: len(bob.equivocations()) == 2, WAIT, what="bob audited the rollback")
    assert bob.equivocations()[1]["data"]["reason"] == "rollback"
    # (bob restarted since the fork: his counter started again)
    assert bob.metric("talos_audit_equivocations_total", role="witness") == 1
    assert "audit_equivocation" in alice.log_text()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("garbage note", "invalid"),
        ("another origin", "invalid"),
        ("bad signature", "bad_signature"),
    ],
)
def test_bad_checkpoints_are_refused_and_nothing_is_stored(
    cast: Callable[..., WitnessPeer], case: str, reason: str
) -> None:
    alice, bob = cast("alice"), cast("bob")
    alice.start(), bob.start()  # alice announced: bob finds her key log
    identity, other = alice.identity(), bob.identity()
    good = signed_checkpoint(identity, 3, bytes(32))
    frame = {
        "garbage note": checkpoint_frame(identity, bob.agent_id, good, note=b"\xff not a note"),
        "another origin": checkpoint_frame(
            identity, bob.agent_id, signed_checkpoint(other, 3, bytes(32))
        ),
        "bad signature": checkpoint_frame(
            identity,
            bob.agent_id,
            good,
            note=good.to_text().replace("\n3\n", "\n4\n").encode(),
        ),
    }[case]
    answer = cosignature_answer(bob.url, frame)
    assert answer is not None
    assert (answer.cosign_status, answer.reason) == (wire.CosignStatus.REFUSED, reason)
    assert bob.metric("talos_audit_checkpoints_refused_total", reason=reason) == 1
    by_object = bob.metric("talos_signature_failures_by_object_total", object="checkpoint")
    assert by_object == (1 if reason == "bad_signature" else 0)
    # Nothing stored: the valid checkpoint is then accepted as the first of alice's log.
    accepted = cosignature_answer(bob.url, checkpoint_frame(identity, bob.agent_id, good))
    assert accepted is not None
    assert accepted.cosign_status is wire.CosignStatus.COSIGNED
    cosig = Cosignature.from_bytes(accepted.cosignature or b"")
    cosig.verify(good.body(), other.signing_key.public_key)
    assert bob.equivocations() == []


def test_a_larger_checkpoint_without_a_valid_proof_is_an_equivocation(
    cast: Callable[..., WitnessPeer],
) -> None:
    """The witness checks the consistency proof from the head it holds: a larger head
    whose proof does not lead from it is refused ``inconsistent``, audited, counted,
    and the held head is kept."""
    alice, bob = cast("alice"), cast("bob")
    alice.start(), bob.start()
    identity = alice.identity()
    first = signed_checkpoint(identity, 3, bytes(32))
    accepted = cosignature_answer(bob.url, checkpoint_frame(identity, bob.agent_id, first))
    assert accepted is not None
    assert accepted.cosign_status is wire.CosignStatus.COSIGNED
    larger = signed_checkpoint(identity, 5, os.urandom(32))
    bogus = (os.urandom(32), os.urandom(32))  # no path from the held head at 3
    frame = checkpoint_frame(identity, bob.agent_id, larger, old=3, proof=bogus)
    answer = cosignature_answer(bob.url, frame)
    assert answer is not None
    assert (answer.cosign_status, answer.reason) == (wire.CosignStatus.CONFLICT, "inconsistent")
    assert (answer.held_size, answer.held_root) == (3, bytes(32))
    assert answer.cosignature is None
    wait_until(lambda: bob.equivocations(), WAIT, what="bob audited the inconsistent head")
    assert bob.equivocations()[0]["data"]["reason"] == "inconsistent"
    assert bob.metric("talos_audit_equivocations_total", role="witness") == 1
    assert bob.metric("talos_audit_checkpoints_refused_total", reason="inconsistent") == 1
    # Nothing stored: the held head is still the one at 3.
    again = cosignature_answer(bob.url, checkpoint_frame(identity, bob.agent_id, first))
    assert again is not None
    assert again.cosign_status is wire.CosignStatus.COSIGNED


def test_a_malformed_checkpoint_frame_is_dropped(cast: Callable[..., WitnessPeer]) -> None:
    alice, bob = cast("alice"), cast("bob")
    alice.start(), bob.start()
    identity = alice.identity()
    frame = checkpoint_frame(identity, bob.agent_id, signed_checkpoint(identity, 3, bytes(32)))
    answer = cosignature_answer(bob.url, frame[:-5], within=2.0)
    assert answer is None
    wait_until(
        lambda: bob.metric("talos_frames_malformed_total") == 1, WAIT, what="counted malformed"
    )
    assert "malformed_frame" in bob.log_text()
    dave = cast("dave")
    refused = CLI.run(dave.home, "run", "--audit-witness", "not-an-agent-id", "--offline")
    assert refused.returncode != 0
    assert "not an agent id" in refused.stderr


def test_a_witness_accepts_only_a_few_checkpoints_per_origin_a_minute(
    cast: Callable[..., WitnessPeer],
) -> None:
    alice, bob = cast("alice"), cast("bob")
    alice.start(), bob.start()
    identity = alice.identity()
    frame = checkpoint_frame(identity, bob.agent_id, signed_checkpoint(identity, 3, bytes(32)))
    statuses = []
    for _ in range(WITNESS_BURST + 1):
        answer = cosignature_answer(bob.url, frame)
        assert answer is not None
        statuses.append((answer.cosign_status, answer.reason))
    assert statuses[:-1] == [(wire.CosignStatus.COSIGNED, "")] * WITNESS_BURST
    assert statuses[-1] == (wire.CosignStatus.REFUSED, "rate_limited")
    assert bob.metric("talos_audit_checkpoints_refused_total", reason="rate_limited") == 1
