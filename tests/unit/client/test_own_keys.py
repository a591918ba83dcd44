"""The agent's own identity holder, rotation requests, and revoking earlier keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.client.own_keys import OwnIdentity, Rotation, revoke_earlier_keys
from talos.core.capability import issue
from talos.core.identity import Identity
from talos.core.keylog import IssuerKeys
from talos.core.revocation import RevocationList
from talos.errors import ConfigurationError
from talos.storage.tokens import TokenStore
from talos.testing import FakeClock, SeededRng


@pytest.fixture
def identity(rng: SeededRng, clock: FakeClock) -> Identity:
    return Identity.create("alice", rng=rng, clock=clock)


def test_the_holder_only_moves_forward_on_the_same_agent(
    identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    own = OwnIdentity(identity)
    rotated = identity.rotate(rng=rng, clock=clock)
    own.replace(rotated)
    assert own.current is rotated
    assert own.agent_id == identity.agent_id
    with pytest.raises(ConfigurationError, match="advance"):
        own.replace(identity)
    with pytest.raises(ConfigurationError, match="agent id"):
        own.replace(Identity.create("mallory", rng=rng, clock=clock).rotate(rng=rng, clock=clock))
    assert own.current is rotated


@pytest.mark.parametrize(
    "rotation",
    [
        Rotation(reason=""),
        Rotation(reason="   "),
        Rotation(reason="x" * 257),
        Rotation(reason="tab\there"),
        Rotation(emergency=True),  # an emergency says why
        Rotation(reason="r", revoke_old=True),  # only an emergency revokes
    ],
)
def test_bad_rotations_are_refused(rotation: Rotation) -> None:
    with pytest.raises(ConfigurationError):
        rotation.check()


def test_good_rotations_carry_their_reason_and_flags(
    identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    assert Rotation().kind == "routine"
    emergency = Rotation(reason="x" * 256, emergency=True, revoke_old=True)
    assert emergency.kind == "emergency"
    rotated = emergency.apply(identity, clock=clock, rng=rng)
    event = rotated.keylog.events[-1]
    assert (event.reason, event.emergency, event.revokes_prior) == ("x" * 256, True, True)
    assert rotated.storage_secret == identity.storage_secret


def test_revoking_earlier_keys_covers_recorded_grants_and_unrecorded_ones(
    tmp_path: Path, identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    now = clock.time()
    bob = Identity.create("bob", rng=rng, clock=clock)
    old_grant = issue(
        identity.signing_key, issuer=identity.agent_id, key_sequence=0, subject=bob.agent_id,
        audience=identity.agent_id, actions=["message.send"], resources=["*"],
        expires=now + 3600, now=now, rng=rng,
    )  # fmt: skip
    rotated = identity.rotate(
        rng=rng, clock=clock, reason="stolen", emergency=True, revoke_old=True
    )
    with TokenStore.open(tmp_path / "capabilities") as tokens:
        tokens.add_granted(old_grant.token_id, old_grant.to_bytes())
        signed = revoke_earlier_keys(tokens, rotated, now=now)
        stored = tokens.revocation_list(identity.agent_id)
        reason = tokens.reason(old_grant.token_id)
    assert stored is not None
    assert RevocationList.from_bytes(stored[0]) == signed
    signed.verify_signature(IssuerKeys([rotated.keylog]))  # by the new key
    assert signed.key_sequence == 1
    assert old_grant.token_id in signed.revoked_ids
    assert signed.revocation_of(b"\x01" * 16, 0, 0) is not None  # a token a thief minted
    assert signed.revocation_of(b"\x01" * 16, int(now * 1000), 1) is None  # new key's grants
    assert reason is not None
    assert "emergency rotation" in reason
