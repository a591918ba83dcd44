"""Key event log: pre-rotation rules and every way a log can be invalid."""

from __future__ import annotations

import dataclasses

import pytest

from talos.core.crypto import DHKey, SigningKey
from talos.core.keylog import KeyEvent, KeyLog, next_key_digest
from talos.errors import KeyLogInvalid, MalformedFrame, UnsupportedVersion
from talos.testing import SeededRng


def _keys(rng: SeededRng, n: int) -> list[SigningKey]:
    return [SigningKey.generate(rng) for _ in range(n)]


def _log(rng: SeededRng, rotations: int) -> tuple[KeyLog, list[SigningKey]]:
    keys = _keys(rng, rotations + 2)
    log = KeyLog.incept(keys[0], DHKey.generate(rng).public, keys[1].public_key, now_ms=1)
    for i in range(1, rotations + 1):
        log = log.rotate(keys[i], DHKey.generate(rng).public, keys[i + 1].public_key, now_ms=1 + i)
    return log, keys


def test_agent_id_is_stable_across_rotations(rng: SeededRng) -> None:
    rotated, _ = _log(rng, 3)
    inception_only = KeyLog.verify(rotated.events[:1])
    assert rotated.agent_id == inception_only.agent_id
    assert rotated.state.sequence == 3
    assert rotated.agent_id.startswith("did:talos:z")


def test_rotation_reveals_committed_key(rng: SeededRng) -> None:
    log, keys = _log(rng, 2)
    assert log.state.signing_key == keys[2].public_key
    assert log.state.next_digest == next_key_digest(keys[3].public_key)


def test_round_trip_bytes(rng: SeededRng) -> None:
    log, _ = _log(rng, 2)
    again = KeyLog.from_bytes(log.to_bytes())
    assert again.events == log.events
    assert again.state == log.state


def test_rotation_with_stolen_current_key_is_rejected(rng: SeededRng) -> None:
    """An attacker with only the current key cannot rotate: it was not pre-committed."""
    log, keys = _log(rng, 0)
    thief_next = SigningKey.generate(rng)
    with pytest.raises(KeyLogInvalid, match="not pre-committed"):
        log.rotate(keys[0], DHKey.generate(rng).public, thief_next.public_key, now_ms=5)


def test_rotation_signed_by_other_key_is_rejected(rng: SeededRng) -> None:
    log, keys = _log(rng, 0)
    event = KeyEvent(
        "rot", 1, log.state.last_digest, keys[1].public_key.raw, b"\1" * 32, b"\2" * 32, 5
    ).signed_by(keys[0])
    with pytest.raises(KeyLogInvalid, match="not signed by its key") as info:
        log.append(event)
    assert info.value.sequence == 1


def test_gap_is_rejected(rng: SeededRng) -> None:
    log, keys = _log(rng, 2)
    with pytest.raises(KeyLogInvalid, match="gap"):
        KeyLog.verify([log.events[0], log.events[2]])


def test_replayed_event_is_rejected(rng: SeededRng) -> None:
    log, _ = _log(rng, 2)
    with pytest.raises(KeyLogInvalid, match="replayed"):
        log.append(log.events[1])
    with pytest.raises(KeyLogInvalid, match="replayed"):
        KeyLog.verify([*log.events, log.events[2]])


def test_fork_is_rejected(rng: SeededRng) -> None:
    log, keys = _log(rng, 1)
    # The legitimate owner signs a different event 1 (e.g. a second device).
    fork = KeyEvent(
        "rot",
        1,
        log.events[0].digest(),
        keys[1].public_key.raw,
        b"\7" * 32,
        next_key_digest(SigningKey.generate(rng).public_key),
        9,
    ).signed_by(keys[1])
    with pytest.raises(KeyLogInvalid, match="fork") as info:
        log.append(fork)
    assert info.value.sequence == 1
    with pytest.raises(KeyLogInvalid, match="fork at key event sequence 1"):
        log.extend([log.events[0], fork])


def test_extend_accepts_longer_log_and_rejects_rollback(rng: SeededRng) -> None:
    long_log, _ = _log(rng, 3)
    short = KeyLog.verify(long_log.events[:2])
    assert short.extend(long_log.events).state == long_log.state
    with pytest.raises(KeyLogInvalid, match="rollback"):
        long_log.extend(long_log.events[:2])


def test_broken_link_is_rejected(rng: SeededRng) -> None:
    log, keys = _log(rng, 1)
    bad = dataclasses.replace(log.events[1], prior=b"\0" * 32).signed_by(keys[1])
    with pytest.raises(KeyLogInvalid, match="does not link"):
        KeyLog.verify([log.events[0], bad])


@pytest.mark.parametrize("field", ["kind", "sequence", "prior"])
def test_bad_inception_is_rejected(rng: SeededRng, field: str) -> None:
    log, keys = _log(rng, 0)
    changes = {"kind": "rot", "sequence": 1, "prior": b"\0" * 32}
    bad = dataclasses.replace(log.events[0], **{field: changes[field]}).signed_by(keys[0])
    with pytest.raises(KeyLogInvalid, match="inception"):
        KeyLog.verify([bad])


def test_tampered_inception_signature_is_rejected(rng: SeededRng) -> None:
    log, _ = _log(rng, 0)
    sig = bytearray(log.events[0].signature)
    sig[0] ^= 1
    with pytest.raises(KeyLogInvalid, match="not signed"):
        KeyLog.verify([dataclasses.replace(log.events[0], signature=bytes(sig))])


def test_empty_log_is_rejected() -> None:
    with pytest.raises(KeyLogInvalid, match="empty"):
        KeyLog.verify([])


def test_every_single_byte_flip_of_serialized_log_is_caught(rng: SeededRng) -> None:
    log, _ = _log(rng, 2)
    data = log.to_bytes()
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0x01
        with pytest.raises((MalformedFrame, UnsupportedVersion, KeyLogInvalid)):
            KeyLog.from_bytes(bytes(mutated))


def test_unknown_event_version_is_reported(rng: SeededRng) -> None:
    log, _ = _log(rng, 0)
    raw = log.events[0].to_dict()
    raw["v"] = 2
    with pytest.raises(UnsupportedVersion):
        KeyEvent.from_dict(raw)


def test_boolean_version_is_not_version_one(rng: SeededRng) -> None:
    """CBOR ``true`` must not pass for 1: one value, one encoding."""
    log, _ = _log(rng, 0)
    raw = log.events[0].to_dict()
    raw["v"] = True
    with pytest.raises(MalformedFrame, match="integer version"):
        KeyEvent.from_dict(raw)


def _emergency(log: KeyLog, keys: list[SigningKey], rng: SeededRng, **fields: object) -> KeyLog:
    n = log.state.sequence + 1
    return log.rotate(
        keys[n],
        DHKey.generate(rng).public,
        keys[n + 1].public_key,
        now_ms=100 + n,
        **fields,  # type: ignore[arg-type]
    )


def test_old_events_keep_their_bytes_and_digests(rng: SeededRng) -> None:
    """The optional rotation fields are encoded only when set."""
    log, _ = _log(rng, 1)
    body = log.events[1].body()
    assert not {"r", "e", "x"} & body.keys()


def test_emergency_rotation_revokes_earlier_keys(rng: SeededRng) -> None:
    from talos.core.keylog import IssuerKeys
    from talos.errors import KeyRevoked

    keys = _keys(rng, 6)
    log = KeyLog.incept(keys[0], DHKey.generate(rng).public, keys[1].public_key, now_ms=1)
    log = _emergency(log, keys, rng, reason="routine")
    assert not log.revoked(0)
    log = _emergency(log, keys, rng, reason="stolen laptop", emergency=True, revokes_prior=True)
    decoded = KeyLog.from_bytes(log.to_bytes())
    assert decoded.events == log.events
    assert [decoded.revoked(n) for n in range(3)] == [True, True, False]
    issuer = IssuerKeys([decoded])
    assert issuer(log.agent_id, 2) == keys[2].public_key
    with pytest.raises(KeyRevoked, match="stolen laptop") as caught:
        issuer(log.agent_id, 1)
    assert (caught.value.sequence, caught.value.rotation) == (1, 2)
    # A later routine rotation does not un-revoke.
    log = _emergency(decoded, keys, rng)
    assert log.revoked(1)
    assert not log.revoked(2)
    assert not log.revoked(-1)


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"r": ""}, "reason"),
        ({"r": "x" * 257}, "reason"),
        ({"r": 5}, "reason"),
        ({"e": False}, "flag"),
        ({"x": True}, "emergency"),
        ({"e": 1}, "flag"),
    ],
)
def test_malformed_rotation_fields_are_refused(
    rng: SeededRng, extra: dict[str, object], problem: str
) -> None:
    log, _ = _log(rng, 1)
    raw = {**log.events[1].to_dict(), **extra}
    with pytest.raises(MalformedFrame, match=problem):
        KeyEvent.from_dict(raw)


def test_an_inception_cannot_carry_rotation_fields(rng: SeededRng) -> None:
    log, _ = _log(rng, 0)
    with pytest.raises(MalformedFrame, match="only a rotation"):
        KeyEvent.from_dict({**log.events[0].to_dict(), "e": True})


def test_the_flags_are_signed(rng: SeededRng) -> None:
    keys = _keys(rng, 4)
    log = KeyLog.incept(keys[0], DHKey.generate(rng).public, keys[1].public_key, now_ms=1)
    log = _emergency(log, keys, rng, emergency=True, revokes_prior=True)
    stripped = dataclasses.replace(log.events[1], revokes_prior=False)
    with pytest.raises(KeyLogInvalid):
        KeyLog.verify([log.events[0], stripped])


def test_a_stranger_s_long_log_costs_no_signature_checks(
    rng: SeededRng, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a receiver does with a key log attached to a frame: decode without
    verifying, compare the held prefix, verify only the new tail."""
    from talos.core import keylog as keylog_module

    held, keys = _log(rng, 1)
    stranger, _ = _log(rng, 40)
    forged_tail = dataclasses.replace(stranger.events[2], sequence=2, prior=held.state.last_digest)
    checks = []
    real_verify = keylog_module._verify_signature
    monkeypatch.setattr(
        keylog_module, "_verify_signature", lambda event: checks.append(event) or real_verify(event)
    )
    events = KeyLog.decode_events(stranger.to_bytes())
    assert len(events) == 41
    assert events[0] != held.events[0]  # another agent's log: the receiver stops here
    assert checks == []
    with pytest.raises(KeyLogInvalid, match="not pre-committed"):
        held.extend([*held.events, forged_tail])
    assert checks == []  # refused on the commitment, before any signature check
    nxt = SigningKey.generate(rng).public_key
    rotated = held.rotate(keys[2], DHKey.generate(rng).public, nxt, now_ms=9)
    checks.clear()
    assert held.extend(KeyLog.decode_events(rotated.to_bytes())).events == rotated.events
    assert len(checks) == 1  # only the new event was verified
