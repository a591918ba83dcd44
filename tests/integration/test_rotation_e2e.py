"""Key compromise end to end: a registry and three ``talos run`` agents, one of them
rotating its key in an emergency while it runs and while messages are in flight.

Alice accepts only holders of her grants; Bob and Carol accept anyone. Alice runs
``talos emergency-rotate --revoke-old --reason "compromise detected"`` through her
control socket (no restart) while she is sending to Bob; Carol is stopped during
the rotation and follows when she comes back. Then: every message arrives exactly
once, both peers audit PEER_KEY_ROTATED, a frame signed with Alice's old (stolen)
key is refused by both (``revoked_key``), a grant Alice issued under the old key is
refused naming the rotation, and a fresh grant makes messages flow again.

(Bob's messages to Alice carry a grant the rotation revokes, so the traffic in
flight across the rotation is Alice's: Bob's side of it is his ACKs.)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rotation_cast import CLI, WAIT, Peer, caster, forged, grant, ok, rotated_entries

from talos.cli.exit_codes import exit_code_for_name
from talos.demo.wiretap import inject
from talos.testing.processes import launched, registry_process
from talos.testing.waiting import wait_until

pytestmark = pytest.mark.slow

#: Messages alice sends to bob once her rotation has returned.
AFTER = 3
REASON = "compromise detected"


@pytest.fixture
def cast(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    with registry_process(tmp_path / "registry") as registry, launched() as launcher:
        yield caster(tmp_path, registry, launcher)


def stolen_key_frame_refused(peer: Peer, frame: bytes) -> None:
    """``frame`` (signed with the revoked key) sent to ``peer``: no answer, one failure
    counted as ``revoked_key`` and audited with the key sequence it was signed under."""
    assert inject(peer.url, frame, answer_within=0.5) is None
    wait_until(
        lambda: peer.metric("talos_signature_failures_total", reason="revoked_key") == 1,
        WAIT,
        what="the stolen-key frame counted",
    )
    failures = [e["data"] for e in peer.audit("SIGNATURE_FAILURE")]
    assert [(f["reason"], f.get("key_sequence")) for f in failures] == [("revoked_key", 0)]


def followed(peer: Peer, alice: Peer) -> None:
    """``peer`` learned the emergency rotation once and discarded its sessions with her."""
    wait_until(lambda: rotated_entries(peer, alice), WAIT, what="the rotation audited")
    (entry,) = rotated_entries(peer, alice)
    assert entry["data"] == {
        "from": 0, "to": 1, "emergency": True, "revoked_below": 1, "reason": REASON,
    }  # fmt: skip
    assert peer.metric("talos_peer_key_updates_total") == 1
    resets = [e for e in peer.audit("SESSION_RESET") if e["data"]["reason"] == "peer_key_rotated"]
    assert resets, "the sessions with the rotated peer were not discarded"


def test_emergency_rotation_while_running_with_messages_in_flight_and_a_peer_offline(
    cast: Callable[..., Peer],
) -> None:
    alice = cast("alice", "--accept", "capability")
    bob, carol = cast("bob"), cast("carol")
    for_bob, for_carol = grant(alice, bob), grant(alice, carol)
    alice.start(), bob.start(), carol.start()
    assert bob.send(alice, "b1", "--capability", for_bob).startswith("delivered ")
    assert carol.send(alice, "c1", "--capability", for_carol).startswith("delivered ")
    assert alice.send(bob, "to bob 0").startswith("delivered ")
    assert alice.send(carol, "to carol 0").startswith("delivered ")
    old = alice.identity()  # what a thief copied off her disk

    carol.stop()  # offline during the rotation
    for n in (1, 2):
        assert alice.send(carol, f"to carol {n}", "--timeout", "0.2").startswith("queued ")

    # Alice keeps sending to Bob, before, during and after the rotation.
    started, rotated = threading.Event(), threading.Event()

    def keep_sending() -> list[str]:
        answers, after = [], 0
        while after < AFTER:
            answers.append(alice.send(bob, f"to bob {len(answers) + 1}"))
            started.set()
            after += rotated.is_set()
        return answers

    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(keep_sending)
        assert started.wait(WAIT)
        out = ok(alice.home, "emergency-rotate", "--revoke-old", "--reason", REASON)
        rotated.set()
        answers = sending.result(timeout=4 * WAIT)
    assert "to key sequence 1 (running agent)" in out
    assert "keys before sequence 1 are revoked" in out
    assert alice.process is not None
    assert alice.process.process.poll() is None  # no restart
    assert all(a.startswith(("delivered ", "queued ")) for a in answers), answers
    wait_until(lambda: alice.queue_depth() == 2, WAIT, what="only carol's left queued")
    assert bob.inbox() == [(alice.agent_id, f"to bob {n}") for n in range(len(answers) + 1)]
    followed(bob, alice)

    # Carol comes back: alice's queued messages reach her under a new session, and
    # the key log offered on that link tells her about the rotation.
    carol.start()
    wait_until(lambda: alice.queue_depth() == 0, WAIT, what="alice's queue drained")
    assert carol.inbox() == [(alice.agent_id, f"to carol {n}") for n in range(3)]
    followed(carol, alice)

    # The thief signs frames with alice's old key: both peers refuse them.
    stolen_key_frame_refused(bob, forged(old, bob.agent_id, old.signing_key))
    stolen_key_frame_refused(carol, forged(old, carol.agent_id, old.signing_key))

    # Grants alice issued under the old key are refused, naming the rotation.
    for holder, token in ((bob, for_bob), (carol, for_carol)):
        refused = CLI.run(holder.home, "send", alice.agent_id, "with the old grant",
                          "--capability", token, "--timeout", "10")  # fmt: skip
        assert refused.returncode == exit_code_for_name("CapabilityDenied"), refused
        assert "revoked by the emergency rotation to key sequence 1" in refused.stderr
        assert REASON in refused.stderr
        assert "needs a fresh grant from the issuer" in refused.stderr
        assert "suspect tampering" not in refused.stderr

    # A fresh grant under her new key; messages flow again, both ways.
    alice.stop()
    fresh_bob, fresh_carol = grant(alice, bob), grant(alice, carol)
    alice.start()
    assert bob.send(alice, "b2", "--capability", fresh_bob).startswith("delivered ")
    assert carol.send(alice, "c2", "--capability", fresh_carol).startswith("delivered ")
    assert alice.send(bob, "after").startswith("delivered ")
    assert alice.send(carol, "after").startswith("delivered ")
    assert sorted(alice.inbox()) == sorted(
        [(bob.agent_id, "b1"), (bob.agent_id, "b2"), (carol.agent_id, "c1"), (carol.agent_id, "c2")]
    )
    assert bob.inbox() == [(alice.agent_id, "after")]
    assert carol.inbox() == [(alice.agent_id, "after")]
    (rotation,) = [e["data"] for e in alice.audit("KEY_ROTATED")]
    assert (rotation["emergency"], rotation["revoke_old"], rotation["reason"]) == (
        True, True, REASON,
    )  # fmt: skip
    assert json.loads(ok(alice.home, "audit", "verify-chain", "--json"))["ok"] is True
