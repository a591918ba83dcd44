"""Fuzz the DHT value decoder: only its documented exceptions may escape.

:func:`talos.discovery.dht.verify_value` reads bytes from any node on the
DHT. It may refuse them with MalformedFrame, UnsupportedVersion,
KeyLogInvalid, SignatureInvalid or StaleMessage, and nothing else.
"""

from __future__ import annotations

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talos.core.identity import Identity
from talos.core.peer_record import PeerRecord
from talos.core.x3dh import PrekeyStore
from talos.discovery.dht import encode_value, verify_value
from talos.errors import (
    KeyLogInvalid,
    MalformedFrame,
    SignatureInvalid,
    StaleMessage,
    UnsupportedVersion,
)
from talos.testing import FakeClock, SeededRng

REFUSED = (MalformedFrame, UnsupportedVersion, KeyLogInvalid, SignatureInvalid, StaleMessage)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0
_rng = SeededRng(5)
ALICE = Identity.create("alice", rng=_rng, clock=FakeClock(NOW))
RECORD = PeerRecord.create(
    ALICE.signing_key,
    agent_id=ALICE.agent_id,
    key_sequence=ALICE.sequence,
    instance_id=b"\x01" * 16,
    endpoint="ws://127.0.0.1:9000",
    sequence=1,
    now=NOW,
    lifetime=300.0,
)
BUNDLE = PrekeyStore.create(
    agent_id=ALICE.agent_id, signing_key=ALICE.signing_key, identity_dh=ALICE.dh_key, rng=_rng
).bundle(None)
GOOD = encode_value(RECORD.to_bytes(), ALICE.keylog.to_bytes(), BUNDLE.to_bytes())


def _check(data: bytes) -> None:
    try:
        verify_value(data, now=NOW)
    except REFUSED:
        pass


def test_the_sample_is_valid() -> None:
    assert verify_value(GOOD, now=NOW).bundle == BUNDLE


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255), st.integers(0, len(GOOD)))
def test_flipped_and_truncated(position: int, flip: int, cut: int) -> None:
    mutated = bytearray(GOOD)
    mutated[position] ^= flip
    _check(bytes(mutated))
    _check(GOOD[:cut])


_field = st.one_of(
    st.binary(max_size=64),
    st.integers(-(2**64), 2**64),
    st.text(max_size=8),
    st.none(),
    st.sampled_from([RECORD.to_bytes(), ALICE.keylog.to_bytes(), BUNDLE.to_bytes()]),
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["v", "rec", "log", "pre", "x"]), _field, min_size=1, max_size=5
    )
)
def test_maps_with_the_value_fields(fields: dict[str, object]) -> None:
    _check(cbor2.dumps(fields, canonical=True))
