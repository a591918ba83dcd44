"""Identity creation, rotation and the secret serialization."""

from __future__ import annotations

import pytest

from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.identity import Identity
from talos.errors import ConfigurationError, KeyLogInvalid, MalformedFrame, UnsupportedVersion
from talos.testing import FakeClock, SeededRng


def test_create_is_deterministic_with_seeded_rng(clock: FakeClock) -> None:
    a = Identity.create("alice", rng=SeededRng(7), clock=clock)
    b = Identity.create("alice", rng=SeededRng(7), clock=clock)
    assert a.agent_id == b.agent_id
    assert Identity.create("alice", rng=SeededRng(8), clock=clock).agent_id != a.agent_id


def test_rotation_keeps_id_and_promotes_next_key(rng: SeededRng, clock: FakeClock) -> None:
    a = Identity.create("alice", rng=rng, clock=clock)
    b = a.rotate(rng=rng, clock=clock)
    assert b.agent_id == a.agent_id
    assert b.sequence == 1
    assert b.signing_key.public_key == a.next_signing_key.public_key
    assert b.fingerprint != a.fingerprint
    assert b.dh_key.public != a.dh_key.public


def test_secret_round_trip(rng: SeededRng, clock: FakeClock) -> None:
    a = Identity.create("alice", rng=rng, clock=clock).rotate(rng=rng, clock=clock)
    b = Identity.from_secret_bytes(a.to_secret_bytes())
    assert b.public_summary() == a.public_summary()
    assert b.next_signing_key.public_key == a.next_signing_key.public_key


@pytest.mark.parametrize("field", ["sk", "dh", "next"])
def test_secrets_that_do_not_match_the_log_are_rejected(
    rng: SeededRng, clock: FakeClock, field: str
) -> None:
    a = Identity.create("alice", rng=rng, clock=clock)
    raw = strict_loads(a.to_secret_bytes(), max_size=1 << 20)
    raw[field] = rng.bytes(32)
    with pytest.raises(KeyLogInvalid):
        Identity.from_secret_bytes(canonical_dumps(raw))


def test_secret_record_rejects_bad_shapes(rng: SeededRng, clock: FakeClock) -> None:
    raw = strict_loads(
        Identity.create("alice", rng=rng, clock=clock).to_secret_bytes(), max_size=1 << 20
    )
    with pytest.raises(MalformedFrame):
        Identity.from_secret_bytes(canonical_dumps({**raw, "extra": 1}))
    with pytest.raises(MalformedFrame):
        Identity.from_secret_bytes(canonical_dumps({**raw, "sk": b"short"}))
    with pytest.raises(UnsupportedVersion):
        Identity.from_secret_bytes(canonical_dumps({**raw, "v": 99}))


@pytest.mark.parametrize("name", ["", "x" * 129, "tab\there"])
def test_bad_names_are_refused(rng: SeededRng, clock: FakeClock, name: str) -> None:
    with pytest.raises(ConfigurationError):
        Identity.create(name, rng=rng, clock=clock)


def test_repr_never_shows_secrets(rng: SeededRng, clock: FakeClock) -> None:
    a = Identity.create("alice", rng=rng, clock=clock)
    text = repr(a)
    for secret in (a.signing_key.seed(), a.dh_key.private_bytes(), a.next_signing_key.seed()):
        assert secret.hex() not in text
        assert secret.hex()[:16] not in text


def test_no_identity_or_key_log_exists_unverified(rng: SeededRng, clock: FakeClock) -> None:
    """The constructors cannot be used to skip verification."""
    import dataclasses

    from talos.core.crypto import SigningKey
    from talos.core.keylog import KeyLog

    identity = Identity.create("alice", rng=rng, clock=clock)
    log = identity.keylog
    with pytest.raises(TypeError, match="KeyLog.verify"):
        KeyLog(log.events, log.state, _verified=object())
    assert KeyLog.verify(log.events).state == log.state  # the way in
    stranger = SigningKey.generate(rng)
    with pytest.raises(KeyLogInvalid, match="signing key"):
        dataclasses.replace(identity, signing_key=stranger)
    with pytest.raises(KeyLogInvalid, match="pre-rotated"):
        dataclasses.replace(identity, next_signing_key=stranger)
    other = Identity.create("bob", rng=rng, clock=clock)
    with pytest.raises(KeyLogInvalid):
        dataclasses.replace(identity, keylog=other.keylog)


def test_rotation_keeps_the_storage_secret(rng: SeededRng, clock: FakeClock) -> None:
    a = Identity.create("alice", rng=rng, clock=clock)
    b = a.rotate(rng=rng, clock=clock).rotate(rng=rng, clock=clock, emergency=True)
    assert b.storage_secret == a.storage_secret
    assert a.storage_secret not in (a.signing_key.seed(), b.signing_key.seed())
    assert Identity.from_secret_bytes(b.to_secret_bytes()).storage_secret == a.storage_secret


def test_version_1_record_takes_its_signing_seed_as_storage_secret(
    rng: SeededRng, clock: FakeClock
) -> None:
    """What an agent state written before version 2 was sealed under."""
    a = Identity.create("alice", rng=rng, clock=clock)
    raw = strict_loads(a.to_secret_bytes(), max_size=1 << 20)
    del raw["st"]
    old = Identity.from_secret_bytes(canonical_dumps({**raw, "v": 1}))
    assert old.storage_secret == a.signing_key.seed()
    rotated = old.rotate(rng=rng, clock=clock)
    again = Identity.from_secret_bytes(rotated.to_secret_bytes())
    assert again.storage_secret == a.signing_key.seed()
    with pytest.raises(MalformedFrame):  # a version 1 record has no storage secret
        Identity.from_secret_bytes(canonical_dumps({**raw, "v": 1, "st": rng.bytes(32)}))
    with pytest.raises(MalformedFrame):  # a version 2 record must have one
        Identity.from_secret_bytes(canonical_dumps(raw))


def test_repr_never_shows_the_storage_secret(rng: SeededRng, clock: FakeClock) -> None:
    a = Identity.create("alice", rng=rng, clock=clock)
    assert a.storage_secret.hex() not in repr(a)


def test_emergency_rotation_records_reason_and_revocation(rng: SeededRng, clock: FakeClock) -> None:
    a = Identity.create("alice", rng=rng, clock=clock).rotate(rng=rng, clock=clock)
    b = a.rotate(
        rng=rng, clock=clock, reason="compromise detected", emergency=True, revoke_old=True
    )
    event = b.keylog.events[-1]
    assert (event.reason, event.emergency, event.revokes_prior) == (
        "compromise detected",
        True,
        True,
    )
    assert [b.keylog.revoked(n) for n in range(3)] == [True, True, False]
    with pytest.raises(ValueError, match="printable"):
        a.rotate(rng=rng, clock=clock, reason="   ", emergency=True)
    with pytest.raises(ValueError, match="emergency"):
        a.rotate(rng=rng, clock=clock, revoke_old=True)
