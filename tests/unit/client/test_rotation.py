"""What TalosClient.rotate_keys returns of the new key."""

from __future__ import annotations

from talos.client.rotation import key_summary
from talos.core.identity import Identity
from talos.testing import FakeClock, SeededRng


def test_the_summary_names_the_new_key_of_the_same_agent(rng: SeededRng, clock: FakeClock) -> None:
    identity = Identity.create("alice", rng=rng, clock=clock)
    rotated = identity.rotate(rng=rng, clock=clock)
    summary = key_summary(rotated)
    assert summary == {
        "agent_id": identity.agent_id,
        "sequence": 1,
        "fingerprint": rotated.fingerprint,
    }
    assert summary["fingerprint"] != identity.fingerprint
