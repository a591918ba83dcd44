"""Signed prekey uploads: signature, bundle building, strict bounded decoding."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.encoding import canonical_dumps
from talos.core.identity import Identity
from talos.core.keylog import IssuerKeys
from talos.core.prekeys import MAX_UPLOAD_PREKEYS, PrekeyUpload
from talos.core.x3dh import PrekeyStore
from talos.errors import (
    LocalProtocolError,
    MalformedFrame,
    SignatureInvalid,
    UnsupportedVersion,
)
from talos.testing import FakeClock, SeededRng

_rng = SeededRng(21)
ALICE = Identity.create("alice", rng=_rng, clock=FakeClock())
MALLORY = Identity.create("mallory", rng=_rng, clock=FakeClock())
KEYS = IssuerKeys([ALICE.keylog, MALLORY.keylog])
STORE = PrekeyStore.create(
    agent_id=ALICE.agent_id, signing_key=ALICE.signing_key, identity_dh=ALICE.dh_key, rng=_rng
).add_one_time_prekeys(250, _rng)


def upload(**changes: object) -> PrekeyUpload:
    made = PrekeyUpload.from_store(STORE, ALICE.signing_key, key_sequence=0, sequence=5, limit=3)
    return replace(made, **changes) if changes else made  # type: ignore[arg-type]


def test_round_trip_verify_and_bundle() -> None:
    signed = upload()
    again = PrekeyUpload.from_bytes(signed.to_bytes())
    assert again == signed
    again.verify(KEYS)
    assert [pid for pid, _ in again.one_time_prekeys] == [0, 1, 2]
    bundle = again.bundle(ALICE.state, again.one_time_prekeys[1])
    bundle.verify()
    assert bundle == STORE.bundle(1)
    assert again.bundle(ALICE.state).one_time_prekey is None


def test_from_store_is_bounded() -> None:
    full = PrekeyUpload.from_store(STORE, ALICE.signing_key, key_sequence=0, sequence=1)
    assert len(full.one_time_prekeys) == MAX_UPLOAD_PREKEYS
    PrekeyUpload.from_bytes(full.to_bytes()).verify(KEYS)
    with pytest.raises(LocalProtocolError):
        PrekeyUpload.from_store(STORE, ALICE.signing_key, key_sequence=0, sequence=1, limit=201)


@pytest.mark.parametrize(
    "changes",
    [
        {"sequence": 6},
        {"key_sequence": 1},
        {"signed_prekey": bytes(32)},
        {"one_time_prekeys": ((0, bytes(32)),)},
        {"signature": bytes(64)},
    ],
)
def test_any_change_breaks_the_signature(changes: dict[str, object]) -> None:
    with pytest.raises(SignatureInvalid):
        upload(**changes).verify(KEYS)


def test_signed_by_someone_else() -> None:
    forged = PrekeyUpload.create(
        MALLORY.signing_key,
        agent_id=ALICE.agent_id,
        key_sequence=0,
        sequence=1,
        signed_prekey_id=0,
        signed_prekey=bytes(32),
        signed_prekey_signature=bytes(64),
    )
    with pytest.raises(SignatureInvalid):
        forged.verify(KEYS)


def test_bundle_with_a_foreign_state_or_bad_spk() -> None:
    with pytest.raises(LocalProtocolError):
        upload().bundle(MALLORY.state)
    with pytest.raises(SignatureInvalid):
        upload(signed_prekey=bytes(32)).bundle(ALICE.state).verify()


@pytest.mark.parametrize(
    "opks",
    [
        [(1, bytes(32)), (1, bytes(32))],
        [(0, bytes(31))],
        [(-1, bytes(32))],
        [(i, bytes(32)) for i in range(MAX_UPLOAD_PREKEYS + 1)],
    ],
)
def test_create_refuses_bad_prekeys(opks: list[tuple[int, bytes]]) -> None:
    with pytest.raises(LocalProtocolError):
        PrekeyUpload.create(
            ALICE.signing_key,
            agent_id=ALICE.agent_id,
            key_sequence=0,
            sequence=1,
            signed_prekey_id=0,
            signed_prekey=bytes(32),
            signed_prekey_signature=bytes(64),
            one_time_prekeys=opks,
        )


def _encoded(**changes: object) -> bytes:
    raw = {**upload().body(), "sig": upload().signature, **changes}
    return canonical_dumps(raw)


@pytest.mark.parametrize(
    "changes",
    [
        {"opks": [[2, bytes(32)], [1, bytes(32)]]},
        {"opks": [[1, bytes(32)], [1, bytes(32)]]},
        {"opks": [[i, bytes(32)] for i in range(MAX_UPLOAD_PREKEYS + 1)]},
        {"opks": [[1]]},
        {"opks": {"a": 1}},
        {"seq": -1},
        {"ks": 2**32},
        {"spk": bytes(33)},
        {"sig": b""},
        {"id": "did:talos:zzz"},
        {"id": 5},
        {"extra": 1},
    ],
)
def test_malformed(changes: dict[str, object]) -> None:
    with pytest.raises(MalformedFrame):
        PrekeyUpload.from_bytes(_encoded(**changes))


def test_unknown_version() -> None:
    with pytest.raises(UnsupportedVersion):
        PrekeyUpload.from_bytes(_encoded(v=2))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.tuples(st.integers(0, 2000), st.integers(1, 255)).map(
            lambda flip: _flip(upload().to_bytes(), *flip)
        ),
        st.integers(0, 400).map(lambda n: upload().to_bytes()[:n]),
    )
)
def test_fuzz_from_bytes(data: bytes) -> None:
    try:
        decoded = PrekeyUpload.from_bytes(data)
    except (MalformedFrame, UnsupportedVersion):
        return
    try:
        decoded.verify(KEYS)
    except SignatureInvalid:
        return


def _flip(data: bytes, position: int, mask: int) -> bytes:
    out = bytearray(data)
    out[position % len(out)] ^= mask
    return bytes(out)
