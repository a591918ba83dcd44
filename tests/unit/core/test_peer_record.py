"""Signed peer records: signature, freshness, strict decoding."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.identity import Identity
from talos.core.peer_record import PeerRecord
from talos.core.revocation import IssuerKeys
from talos.errors import MalformedFrame, SignatureInvalid, StaleMessage, UnsupportedVersion
from talos.testing import FakeClock, SeededRng

NOW = 1_700_000_000.0
_rng = SeededRng(5)
ALICE = Identity.create("alice", rng=_rng, clock=FakeClock(NOW))
MALLORY = Identity.create("mallory", rng=_rng, clock=FakeClock(NOW))
KEYS = IssuerKeys([ALICE.keylog, MALLORY.keylog])


def record(**changes: object) -> PeerRecord:
    args: dict[str, object] = {
        "agent_id": ALICE.agent_id,
        "key_sequence": 0,
        "instance_id": b"\x01" * 16,
        "endpoint": "ws://127.0.0.1:8765",
        "sequence": 3,
        "now": NOW,
        "lifetime": 300.0,
    }
    args.update(changes)
    key = args.pop("key", ALICE.signing_key)
    return PeerRecord.create(key, **args)  # type: ignore[arg-type]


def test_round_trip_and_verify() -> None:
    signed = record()
    again = PeerRecord.from_bytes(signed.to_bytes())
    assert again == signed
    again.verify(KEYS, now=NOW + 10)


def test_signed_by_someone_else() -> None:
    with pytest.raises(SignatureInvalid):
        record(key=MALLORY.signing_key).verify(KEYS, now=NOW)


@pytest.mark.parametrize("field", ["endpoint", "sequence", "instance_id", "expires_ms"])
def test_any_change_breaks_the_signature(field: str) -> None:
    changes = {
        "endpoint": "ws://10.0.0.1:1",
        "sequence": 4,
        "instance_id": b"\x02" * 16,
        "expires_ms": 2**40,
    }
    with pytest.raises(SignatureInvalid):
        replace(record(), **{field: changes[field]}).verify(KEYS, now=NOW)


def test_freshness_boundaries() -> None:
    signed = record()
    signed.verify(KEYS, now=NOW + 300 + 60)
    with pytest.raises(StaleMessage, match="expired"):
        signed.verify(KEYS, now=NOW + 300 + 60.001)
    signed.verify(KEYS, now=NOW - 60)
    with pytest.raises(StaleMessage, match="clock skew"):
        signed.verify(KEYS, now=NOW - 60.001)


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:1",
        "ws://127.0.0.1",
        "ws://127.0.0.1:0",
        "ws://127.0.0.1:70000",
        "ws://a b:1",
    ],
)
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(MalformedFrame):
        record(endpoint=endpoint)


def test_unknown_version() -> None:
    from talos.core.encoding import canonical_dumps

    raw = record().to_dict()
    raw["v"] = 2
    with pytest.raises(UnsupportedVersion):
        PeerRecord.from_bytes(canonical_dumps(raw))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 300), st.integers(0, 255))
def test_decoder_fuzz(noise: bytes, position: int, flip: int) -> None:
    valid = bytearray(record().to_bytes())
    valid[position % len(valid)] ^= flip
    for data in (noise, bytes(valid)):
        try:
            PeerRecord.from_bytes(data)
        except (MalformedFrame, UnsupportedVersion):
            pass
