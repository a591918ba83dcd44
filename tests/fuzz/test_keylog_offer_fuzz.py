"""Fuzz what a KEYLOG envelope offers: mutated frames and mutated key logs.

A receiver decodes the frame, reads the attached log before the signature
(talos.client.keylogs), parses it and checks it extends the log it holds.
Only documented exceptions may escape: MalformedFrame or UnsupportedVersion
(not a frame or log), KeyLogInvalid (a log, but not an extension of ours).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talos.client.keylogs import _disagreement
from talos.core import wire
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.errors import KeyLogInvalid, MalformedFrame, SignatureInvalid, UnsupportedVersion
from talos.testing import FakeClock, SeededRng

REJECTED = (MalformedFrame, UnsupportedVersion, KeyLogInvalid)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_RNG, _CLOCK = SeededRng(61), FakeClock(start=1_700_000_000)
OLD = Identity.create("alice", rng=_RNG, clock=_CLOCK)
NEW = OLD.rotate(rng=_RNG, clock=_CLOCK, reason="fuzz", emergency=True, revoke_old=True)
BOB = Identity.create("bob", rng=_RNG, clock=_CLOCK)
LOG_SEED = NEW.keylog.to_bytes()
FRAME_SEED = wire.seal(
    wire.Envelope(
        type=wire.EnvelopeType.KEYLOG,
        message_id=b"m" * 16,
        sender=NEW.agent_id,
        sender_instance=b"i" * 16,
        recipient=BOB.agent_id,
        timestamp_ms=1_700_000_000_000,
        key_log=LOG_SEED,
    ),
    NEW.signing_key,
)


def _offered(data: bytes, held: KeyLog) -> None:
    """What a receiver does with an offered log's bytes."""
    try:
        offered = KeyLog.from_bytes(data)
    except REJECTED:
        return
    if offered.agent_id != held.agent_id:
        return
    if _disagreement(held, offered) is None:
        try:
            held.extend(offered.events)
        except KeyLogInvalid:
            return


def _frame(data: bytes) -> None:
    try:
        unverified = wire.decode(data)
    except REJECTED:
        return
    attached = unverified.attached_key_log
    if attached is not None:
        _offered(attached, OLD.keylog)
    try:
        wire.verify(unverified, NEW.signing_key.public_key)
    except SignatureInvalid:
        return


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        else:
            del data[pos : pos + draw(st.integers(1, 8))]
        if not data:
            break
    return bytes(data)


def test_the_seeds_are_accepted() -> None:
    _frame(FRAME_SEED)
    assert OLD.keylog.extend(KeyLog.from_bytes(LOG_SEED).events).state.sequence == 1


@FUZZ
@given(data=mutated(LOG_SEED))
def test_mutated_offered_logs(data: bytes) -> None:
    _offered(data, OLD.keylog)
    _offered(data, NEW.keylog)


@FUZZ
@given(data=mutated(FRAME_SEED))
def test_mutated_keylog_frames(data: bytes) -> None:
    _frame(data)


@pytest.mark.parametrize("data", [b"", b"\xa0", LOG_SEED[:-1], LOG_SEED + b"\x00"])
def test_edge_cases(data: bytes) -> None:
    _offered(data, OLD.keylog)
