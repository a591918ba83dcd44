"""Sealing values at rest (talos.storage.state.sealing), without LMDB."""

from __future__ import annotations

import pytest

from talos.errors import ConfigurationError, DecryptionFailed, MalformedFrame, StoreCorrupted
from talos.storage.agent_state import derive_storage_key
from talos.storage.state.sealing import Sealer
from talos.testing import SeededRng

KEY = bytes(range(32))


def test_derive_storage_key() -> None:
    key = derive_storage_key(bytes(32))
    assert len(key) == 32
    assert key != derive_storage_key(b"\x01" * 32)
    with pytest.raises(ConfigurationError):
        derive_storage_key(b"short")


def test_sealed_value_opens_under_its_key_and_row_only() -> None:
    sealer = Sealer(KEY, SeededRng(1))
    sealed = sealer.seal(b"ratchet state", ("session", "alice"))
    assert sealed[0] == 1
    assert len(sealed) == 1 + 24 + len(b"ratchet state") + 16
    assert b"ratchet state" not in sealed
    assert sealer.open(sealed, ("session", "alice")) == b"ratchet state"
    with pytest.raises(DecryptionFailed):
        sealer.open(sealed, ("session", "bob"))
    with pytest.raises(DecryptionFailed):
        Sealer(bytes(32), SeededRng(1)).open(sealed, ("session", "alice"))


def test_nonces_are_fresh_for_each_seal() -> None:
    sealer = Sealer(KEY, SeededRng(1))
    assert sealer.seal(b"x", ("prekeys",)) != sealer.seal(b"x", ("prekeys",))


@pytest.mark.parametrize("mutate", ["flip", "truncate", "version"])
def test_damaged_value_names_its_row(mutate: str) -> None:
    sealer = Sealer(KEY, SeededRng(1))
    sealed = bytearray(sealer.seal(b"payload", ("outbox", "bob", b"id")))
    if mutate == "flip":
        sealed[-1] ^= 1
    elif mutate == "truncate":
        del sealed[30:]
    else:
        sealed[0] = 2
    with pytest.raises((DecryptionFailed, MalformedFrame)):
        sealer.open(bytes(sealed), ("outbox", "bob", b"id"))
    with pytest.raises(StoreCorrupted, match="'outbox', key 7: sealed value fails"):
        sealer.unseal("outbox", "7", bytes(sealed), ("outbox", "bob", b"id"))


@pytest.mark.parametrize("key", [b"short", bytes(33), bytearray(32)])
def test_storage_key_must_be_32_bytes(key: bytes) -> None:
    with pytest.raises(ConfigurationError, match="storage_key must be 32 bytes"):
        Sealer(key, SeededRng(1))
