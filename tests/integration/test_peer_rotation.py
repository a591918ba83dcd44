"""Peers that follow a key rotation, as real processes over a real registry.

Alice rotates while stopped (``talos rotate``, or an emergency rotation that
revokes her old key, written with Identity.rotate as ``talos emergency-rotate``
will), then starts again. Bob, who had a session with her, learns her new
key log when they next talk (the KEYLOG offer, or the registry when a frame
fails under the key he held), audits PEER_KEY_ROTATED, discards his sessions
with her and opens new ones; messages queued during the rotation arrive once.
Carol, offline during the rotation, follows when she comes back. After an
emergency rotation, a frame signed with Alice's old key is refused
(``revoked_key``), a token she issued under it is refused naming the
rotation, and a forked or rolled-back key log offered in her name is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rotation_cast import CLI, WAIT, Peer, caster, forged, grant, ok, rotated_entries

from talos.core import wire
from talos.demo.wiretap import inject
from talos.system import SystemClock
from talos.testing import SeededRng
from talos.testing.processes import Launcher, RegistryProcess, launched
from talos.testing.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    with launched() as started:
        yield started


@pytest.fixture
def cast(tmp_path: Path, registry: RegistryProcess, launcher: Launcher) -> Callable[..., Peer]:
    return caster(tmp_path, registry, launcher)


def test_peers_follow_a_routine_rotation(cast: Callable[..., Peer]) -> None:
    alice, bob, carol = cast("alice", "--accept", "capability"), cast("bob"), cast("carol")
    for_bob, for_carol = grant(alice, bob), grant(alice, carol)
    alice.start(), bob.start(), carol.start()
    assert bob.send(alice, "b1", "--capability", for_bob).startswith("delivered ")
    assert alice.send(bob, "a1").startswith("delivered ")
    assert carol.send(alice, "c1", "--capability", for_carol).startswith("delivered ")
    carol.stop()  # offline during the rotation
    alice.stop()
    queued = bob.send(alice, "b2 queued while alice rotates", "--capability", for_bob,
                      "--timeout", "1")  # fmt: skip
    assert queued.startswith("queued ")
    assert "to key sequence 1" in ok(alice.home, "rotate")
    fresh_for_carol = grant(alice, carol)  # under her new key, sequence 1
    alice.start()

    # Bob's queued message goes out under a new session against her new keys, and the
    # token she issued before the (routine) rotation is still good.
    wait_until(
        lambda: bob.queue_depth() == 0,
        WAIT,
        what="bob's queue drained",
        interval=0.2,
    )
    assert bob.send(alice, "b3", "--capability", for_bob).startswith("delivered ")
    assert alice.send(bob, "a2").startswith("delivered ")
    entries = rotated_entries(bob, alice)
    assert len(entries) == 1, entries
    assert entries[0]["data"] == {"from": 0, "to": 1, "emergency": False, "revoked_below": 0}
    assert bob.metric("talos_peer_key_updates_total") == 1
    assert bob.metric("talos_signature_failures_total", reason="revoked_key") == 0
    resets = [e for e in bob.audit("SESSION_RESET") if e["data"]["reason"] == "peer_key_rotated"]
    assert len(resets) == 1

    # Carol comes back with a token under a key her cached log of alice lacks: she
    # fetches alice's newer log first, then follows.
    carol.start()
    assert carol.send(alice, "c2", "--capability", fresh_for_carol).startswith("delivered ")
    assert alice.send(carol, "a3").startswith("delivered ")
    assert len(rotated_entries(carol, alice)) == 1

    # Nothing lost, nothing twice.
    assert sorted(alice.inbox()) == sorted(
        [(bob.agent_id, t) for t in ("b1", "b2 queued while alice rotates", "b3")]
        + [(carol.agent_id, t) for t in ("c1", "c2")]
    )
    assert bob.inbox() == [(alice.agent_id, "a1"), (alice.agent_id, "a2")]
    assert carol.inbox() == [(alice.agent_id, "a3")]


def test_after_an_emergency_rotation_the_old_key_is_refused(cast: Callable[..., Peer]) -> None:
    alice = cast("alice", "--accept", "capability")
    bob = cast("bob")
    token = grant(alice, bob)
    alice.start()
    bob.start()
    assert bob.send(alice, "b1", "--capability", token).startswith("delivered ")
    assert alice.send(bob, "a1").startswith("delivered ")
    alice.stop()
    old, new = alice.rotate(reason="compromise detected", emergency=True, revoke_old=True)
    alice.start()

    # Bob still holds her old log: his token passes his own check, hers refuses it.
    refused = CLI.run(bob.home, "send", alice.agent_id, "b2", "--capability", token,
                      "--timeout", "20")  # fmt: skip
    assert refused.returncode != 0
    assert "revoked by the emergency rotation to key sequence 1" in refused.stderr
    assert "compromise detected" in refused.stderr
    wait_until(lambda: rotated_entries(bob, alice), WAIT, what="bob audited the rotation")
    entry = rotated_entries(bob, alice)[0]
    assert entry["data"] == {
        "from": 0,
        "to": 1,
        "emergency": True,
        "revoked_below": 1,
        "reason": "compromise detected",
    }
    # Now that he knows, bob's own check refuses it too, naming the rotation.
    again = CLI.run(bob.home, "send", alice.agent_id, "b3", "--capability", token)
    assert again.returncode == 6, again.stderr
    assert "revoked by the emergency rotation to key sequence 1" in again.stderr

    # A frame signed with her old (stolen) key: refused, counted and audited as such.
    url = bob.url
    assert inject(url, forged(old, bob.agent_id, old.signing_key), answer_within=0.5) is None
    wait_until(
        lambda: bob.metric("talos_signature_failures_total", reason="revoked_key") == 1,
        WAIT,
        what="the stolen-key frame counted",
    )
    failures = [e["data"] for e in bob.audit("SIGNATURE_FAILURE")]
    assert [(f["reason"], f.get("key_sequence")) for f in failures] == [("revoked_key", 0)]

    # Key logs offered in her name that fork or roll back the one bob holds.
    fork = old.rotate(rng=SeededRng(5), clock=SystemClock(), reason="another history")
    fork_frame = forged(
        old, bob.agent_id, fork.signing_key, type=wire.EnvelopeType.KEYLOG,
        ratchet_header=b"", ciphertext=b"", key_log=fork.keylog.to_bytes(),
    )  # fmt: skip
    rollback_frame = forged(
        old, bob.agent_id, new.signing_key, type=wire.EnvelopeType.KEYLOG,
        ratchet_header=b"", ciphertext=b"", key_log=old.keylog.to_bytes(),
    )  # fmt: skip
    inject(url, fork_frame, answer_within=0.2)
    inject(url, rollback_frame, answer_within=0.2)
    wait_until(lambda: len(bob.audit("PEER_KEY_LOG_REFUSED")) == 2, WAIT, what="refusals")
    reasons = sorted(e["data"]["reason"] for e in bob.audit("PEER_KEY_LOG_REFUSED"))
    assert reasons == ["fork", "rollback"]
    assert bob.metric("talos_peer_key_logs_refused_total", reason="fork") == 1
    assert bob.metric("talos_peer_key_logs_refused_total", reason="rollback") == 1
    assert len(rotated_entries(bob, alice)) == 1  # still the one real rotation

    # A fresh grant works; messages flow both ways under the new keys.
    alice.stop()
    fresh = grant(alice, bob)
    alice.start()
    assert bob.send(alice, "b4", "--capability", fresh).startswith("delivered ")
    assert alice.send(bob, "a2").startswith("delivered ")
    assert alice.inbox() == [(bob.agent_id, "b1"), (bob.agent_id, "b4")]
    assert bob.inbox() == [(alice.agent_id, "a1"), (alice.agent_id, "a2")]
