"""Sealed containers: corruption is told apart from a wrong key."""

from __future__ import annotations

import pytest

from talos.core.crypto import Argon2Params
from talos.core.sealed import KIND_BACKUP, KIND_KEYFILE, check_intact, open_sealed, seal
from talos.errors import CryptoError, DecryptionFailed, StoreCorrupted, UnsupportedVersion
from talos.testing import SeededRng

FAST = Argon2Params(time_cost=1, memory_kib=64, parallelism=1)


def test_passphrase_round_trip(rng: SeededRng) -> None:
    data = seal(b"secret", kind=KIND_BACKUP, rng=rng, passphrase=b"pw", params=FAST)
    assert open_sealed(data, kind=KIND_BACKUP, passphrase=b"pw") == b"secret"


def test_raw_key_round_trip(rng: SeededRng) -> None:
    key = rng.bytes(32)
    data = seal(b"secret", kind=KIND_KEYFILE, rng=rng, raw_key=key)
    assert open_sealed(data, kind=KIND_KEYFILE, raw_key=key) == b"secret"


def test_wrong_passphrase_is_not_corruption(rng: SeededRng) -> None:
    data = seal(b"secret", kind=KIND_BACKUP, rng=rng, passphrase=b"pw", params=FAST)
    with pytest.raises(DecryptionFailed):
        open_sealed(data, kind=KIND_BACKUP, passphrase=b"other")
    with pytest.raises(DecryptionFailed):
        open_sealed(data, kind=KIND_BACKUP)


def test_every_byte_flip_is_reported_as_corruption(rng: SeededRng) -> None:
    data = seal(b"secret", kind=KIND_BACKUP, rng=rng, passphrase=b"pw", params=FAST)
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0x80
        with pytest.raises(StoreCorrupted):
            open_sealed(bytes(mutated), kind=KIND_BACKUP, passphrase=b"pw")


@pytest.mark.parametrize("length", [0, 1, 10, 60, 101])
def test_truncation_is_corruption(rng: SeededRng, length: int) -> None:
    data = seal(b"secret", kind=KIND_BACKUP, rng=rng, passphrase=b"pw", params=FAST)
    with pytest.raises(StoreCorrupted):
        check_intact(data[:length], kind=KIND_BACKUP)


def test_kind_is_checked(rng: SeededRng) -> None:
    data = seal(b"secret", kind=KIND_BACKUP, rng=rng, passphrase=b"pw", params=FAST)
    with pytest.raises(StoreCorrupted, match="expected kind"):
        open_sealed(data, kind=KIND_KEYFILE, passphrase=b"pw")


def test_newer_version_is_reported(rng: SeededRng) -> None:
    from talos.core.crypto import sha256

    data = bytearray(seal(b"s", kind=KIND_BACKUP, rng=rng, passphrase=b"pw", params=FAST))
    data[8] = 2
    body = bytes(data[:-32])
    with pytest.raises(UnsupportedVersion):
        check_intact(body + sha256(body), kind=KIND_BACKUP)


def test_exactly_one_key_source(rng: SeededRng) -> None:
    with pytest.raises(CryptoError):
        seal(b"s", kind=KIND_BACKUP, rng=rng)
    with pytest.raises(CryptoError):
        seal(b"s", kind=KIND_BACKUP, rng=rng, passphrase=b"p", raw_key=b"k" * 32)


@pytest.mark.parametrize(
    ("t_cost", "memory", "lanes"), [(64, 64, 1), (1, 4 * 1024 * 1024, 1), (1, 1024, 64), (0, 0, 0)]
)
def test_hostile_argon2_parameters_are_refused_before_hashing(
    rng: SeededRng, t_cost: int, memory: int, lanes: int
) -> None:
    import struct

    from talos.core.crypto import sha256

    data = bytearray(seal(b"s", kind=KIND_BACKUP, rng=rng, passphrase=b"pw", params=FAST))
    struct.pack_into(">III", data, 10, t_cost, memory, lanes)
    body = bytes(data[:-32])
    with pytest.raises(StoreCorrupted, match="argon2"):
        open_sealed(body + sha256(body), kind=KIND_BACKUP, passphrase=b"pw")
