"""The pure parts of following a peer's key rotation (talos.client.keylogs).

Which earlier key a frame verifies under and the reason a failure is counted
with; the refresh rate limit; what counts as a fork or a rollback; and the
refusal of a capability signed by a revoked key, naming the rotation.
"""

from __future__ import annotations

import pytest

from talos.client.keylogs import (
    GLOBAL_REFRESH_BURST,
    MAX_EARLIER_KEYS,
    REFRESH_BURST,
    REFRESH_INTERVAL,
    RefreshLimit,
    _disagreement,
    failure_reason,
    signed_by_earlier,
)
from talos.core import wire
from talos.core.capability import CapabilityPolicy, issue, verify
from talos.core.crypto import SigningKey
from talos.core.identity import Identity
from talos.core.keylog import IssuerKeys
from talos.core.revocation import RevocationMode, RevocationPolicy, RevocationState
from talos.errors import CapabilitySignatureInvalid
from talos.testing import FakeClock, SeededRng

NOW_MS = 1_700_000_000_000


@pytest.fixture
def rng() -> SeededRng:
    return SeededRng(14)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=NOW_MS / 1000)


def frame_by(identity: Identity, key: SigningKey, rng: SeededRng) -> wire.UnverifiedEnvelope:
    bob = Identity.create("bob", rng=SeededRng(99), clock=FakeClock(start=0))
    envelope = wire.Envelope(
        type=wire.EnvelopeType.MESSAGE,
        message_id=wire.new_message_id(rng),
        sender=identity.agent_id,
        sender_instance=wire.new_instance_id(rng),
        recipient=bob.agent_id,
        timestamp_ms=NOW_MS,
        ratchet_header=b"h" * 40,
        ciphertext=b"c" * 40,
    )
    return wire.decode(wire.seal(envelope, key))


def rotations(count: int, rng: SeededRng, clock: FakeClock, **last: object) -> list[Identity]:
    """An identity and its ``count`` rotations (the last one with ``last``'s options)."""
    chain = [Identity.create("alice", rng=rng, clock=clock)]
    for n in range(count):
        options = last if n == count - 1 else {}
        chain.append(chain[-1].rotate(rng=rng, clock=clock, **options))  # type: ignore[arg-type]
    return chain


def test_a_frame_signed_by_a_revoked_key_is_named_so(rng: SeededRng, clock: FakeClock) -> None:
    old, new = rotations(1, rng, clock, reason="stolen", emergency=True, revoke_old=True)
    frame = frame_by(old, old.signing_key, rng)
    sequence = signed_by_earlier(frame, new.keylog)
    assert sequence == 0
    assert failure_reason(new.keylog, sequence) == "revoked_key"


def test_a_frame_signed_before_a_routine_rotation_is_superseded(
    rng: SeededRng, clock: FakeClock
) -> None:
    old, new = rotations(1, rng, clock)
    sequence = signed_by_earlier(frame_by(old, old.signing_key, rng), new.keylog)
    assert (sequence, failure_reason(new.keylog, sequence)) == (0, "superseded_key")


def test_a_frame_under_no_key_of_the_log_is_a_bad_signature(
    rng: SeededRng, clock: FakeClock
) -> None:
    old, new = rotations(1, rng, clock)
    stranger = SigningKey.generate(rng)
    sequence = signed_by_earlier(frame_by(old, stranger, rng), new.keylog)
    assert (sequence, failure_reason(new.keylog, sequence)) == (None, "bad_signature")
    # The current key is not an "earlier" one: a frame it signed is not classified here.
    assert signed_by_earlier(frame_by(new, new.signing_key, rng), new.keylog) is None


def test_only_the_newest_earlier_keys_are_tried(rng: SeededRng, clock: FakeClock) -> None:
    chain = rotations(MAX_EARLIER_KEYS + 1, rng, clock)
    newest = chain[-1].keylog
    first = frame_by(chain[0], chain[0].signing_key, rng)
    assert signed_by_earlier(first, newest) is None  # 9 keys back: not tried
    second = frame_by(chain[1], chain[1].signing_key, rng)
    assert signed_by_earlier(second, newest) == 1
    assert signed_by_earlier(first, newest, limit=MAX_EARLIER_KEYS + 1) == 0


def test_refresh_is_limited_per_sender_and_overall() -> None:
    limit = RefreshLimit()
    assert [limit.allow("a", "h", 0.0) for _ in range(REFRESH_BURST + 1)] == [
        True
    ] * REFRESH_BURST + [False]
    assert limit.allow("a", "h", REFRESH_INTERVAL / 2) is False
    assert limit.allow("a", "h", REFRESH_INTERVAL + 0.1) is True
    # Forged frames naming ever new senders cannot go past the overall rate.
    limit = RefreshLimit()
    allowed = sum(limit.allow(f"sender-{n}", "h", 0.0) for n in range(100))
    assert allowed == GLOBAL_REFRESH_BURST
    assert limit.allow("sender-new", "h", 1.0) is True


def test_a_forger_elsewhere_cannot_spend_the_real_senders_refreshes() -> None:
    limit = RefreshLimit()
    for _ in range(10):
        limit.allow("alice", "203.0.113.9", 0.0)  # forged frames naming alice
    assert limit.allow("alice", "203.0.113.9", 0.0) is False
    assert limit.allow("alice", "198.51.100.7", 0.0) is True  # alice's own address


def test_a_refusal_by_the_overall_limit_spends_no_sender_allowance() -> None:
    limit = RefreshLimit()
    for n in range(GLOBAL_REFRESH_BURST):
        assert limit.allow(f"flood-{n}", "h", 0.0)
    assert limit.allow("alice", "a", 0.0) is False  # overall spent
    # One second later the overall bucket has one token: alice still has her
    # whole burst, since the refusal above took nothing from her bucket.
    assert limit.allow("alice", "a", 1.0) is True
    assert limit.allow("alice", "a", 2.0) is True
    assert limit.allow("alice", "a", 3.0) is False


def test_forks_and_rollbacks(rng: SeededRng, clock: FakeClock) -> None:
    zero, one, two = rotations(2, rng, clock)
    assert _disagreement(one.keylog, two.keylog) is None
    assert _disagreement(one.keylog, one.keylog) is None
    assert _disagreement(two.keylog, one.keylog) == "rollback"
    other = zero.rotate(rng=rng, clock=clock, reason="a different history")
    assert _disagreement(one.keylog, other.keylog) == "fork"
    assert _disagreement(two.keylog, other.keylog) == "fork"


def test_a_token_under_a_revoked_key_is_refused_naming_the_rotation(
    rng: SeededRng, clock: FakeClock
) -> None:
    old, new = rotations(
        1, rng, clock, reason="compromise detected", emergency=True, revoke_old=True
    )
    bob = Identity.create("bob", rng=rng, clock=clock)
    token = issue(
        old.signing_key,
        issuer=old.agent_id,
        key_sequence=0,
        subject=bob.agent_id,
        audience=old.agent_id,
        actions=["message.send"],
        resources=[f"inbox/{old.agent_id}"],
        expires=clock.time() + 3600,
        now=clock.time(),
        rng=rng,
    )

    def check(keys: IssuerKeys) -> None:
        verify(
            token,
            action="message.send",
            resource=f"inbox/{old.agent_id}",
            now=clock.time(),
            revocations=RevocationState(),
            policy=CapabilityPolicy(
                audience=old.agent_id, revocation=RevocationPolicy(mode=RevocationMode.OFFLINE)
            ),
            keys=keys,
            holder=bob.agent_id,
        )

    check(IssuerKeys([old.keylog]))  # before the rotation is known: valid
    with pytest.raises(CapabilitySignatureInvalid) as denied:
        check(IssuerKeys([new.keylog]))
    assert str(denied.value) == (
        "capability at depth 1: issuer key sequence 0 was revoked by the emergency rotation "
        "to key sequence 1 (compromise detected); it needs a fresh grant from the issuer"
    )
    # A routine rotation leaves tokens issued under earlier keys valid.
    routine = old.rotate(rng=rng, clock=clock)
    check(IssuerKeys([routine.keylog]))
