"""Fuzz the identity decoders: only documented exceptions may escape.

Inputs are arbitrary bytes and mutations (bit flips, truncations, insertions)
of valid encodings, which reach much deeper into the decoders than noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talos.core.agent_id import digest_from_agent_id
from talos.core.crypto import Argon2Params
from talos.core.identity import Identity
from talos.core.keylog import KeyEvent, KeyLog
from talos.core.sealed import KIND_BACKUP, open_sealed, seal
from talos.errors import (
    DecryptionFailed,
    KeyLogInvalid,
    MalformedFrame,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.testing import FakeClock, SeededRng

_RNG = SeededRng(99)
_CLOCK = FakeClock()
_IDENTITY = Identity.create("fuzz", rng=_RNG, clock=_CLOCK).rotate(rng=_RNG, clock=_CLOCK)
_LOG = _IDENTITY.keylog.to_bytes()
_EVENT = _IDENTITY.keylog.events[1].to_bytes()
_SECRET = _IDENTITY.to_secret_bytes()
_SEALED = seal(
    b"payload",
    kind=KIND_BACKUP,
    rng=_RNG,
    passphrase=b"pw",
    params=Argon2Params(time_cost=1, memory_kib=8, parallelism=1),
)

DECODE_ERRORS = (MalformedFrame, UnsupportedVersion, KeyLogInvalid)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos]
    return bytes(data)


def _only_documented(decode: Callable[[bytes], Any], data: bytes) -> None:
    try:
        decode(data)
    except DECODE_ERRORS:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(_LOG)))
def test_keylog_decoder(data: bytes) -> None:
    _only_documented(KeyLog.from_bytes, data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(_EVENT)))
def test_key_event_decoder(data: bytes) -> None:
    _only_documented(KeyEvent.from_bytes, data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(_SECRET)))
def test_identity_secret_decoder(data: bytes) -> None:
    _only_documented(Identity.from_secret_bytes, data)


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(_SEALED)))
def test_sealed_container(data: bytes) -> None:
    try:
        open_sealed(data, kind=KIND_BACKUP, passphrase=b"pw")
    except (StoreCorrupted, UnsupportedVersion, DecryptionFailed):
        pass


@FUZZ
@given(st.one_of(st.text(max_size=80), st.text(max_size=60).map(lambda s: "did:talos:z" + s)))
def test_agent_id_parser(text: str) -> None:
    try:
        assert len(digest_from_agent_id(text)) == 32
    except MalformedFrame:
        pass
