"""Sealed containers: how key files and backups are encrypted at rest.

Layout (all integers big-endian)::

    magic      6  b"TALOS\\0"
    kind       2  b"KF" key file, b"BK" backup
    version    1  1
    kdf        1  0 = raw 32-byte key (kept in a 0600 file), 1 = argon2id(passphrase)
    t_cost     4  argon2 passes        (0 for kdf 0)
    memory     4  argon2 KiB           (0 for kdf 0)
    lanes      4  argon2 parallelism   (0 for kdf 0)
    salt      16
    nonce     12
    ciphertext    AES-256-GCM; associated data = every byte above
    checksum  32  SHA-256 of every byte above

Two checks answer two questions. The checksum says whether the file is
intact, so damage is reported as *corruption* rather than as a wrong
passphrase; the AEAD tag then says whether the key (passphrase) is right.
The checksum covers the public header and the ciphertext, nothing secret.

The argon2 cost in a header is attacker-controlled (anyone can hand us a
"backup"), so opening enforces :data:`MAX_OPEN_PARAMS`, far below what
:class:`~talos.core.crypto.Argon2Params` can express: a crafted file cannot
make ``talos recover`` allocate gigabytes or spin for minutes.
"""

from __future__ import annotations

import struct
from typing import Final

from talos.core.crypto import (
    AEAD_NONCE_SIZE,
    KEY_SIZE,
    Argon2Params,
    aead_decrypt,
    aead_encrypt,
    argon2id,
    constant_time_equal,
    sha256,
)
from talos.core.rng import Rng
from talos.errors import CryptoError, DecryptionFailed, StoreCorrupted, UnsupportedVersion

__all__ = ["KIND_BACKUP", "KIND_KEYFILE", "check_intact", "open_sealed", "seal", "uses_passphrase"]

KIND_KEYFILE: Final = b"KF"
KIND_BACKUP: Final = b"BK"
_MAGIC = b"TALOS\x00"
_VERSION = 1
_KDF_RAW = 0
_KDF_ARGON2ID = 1
_HEADER = struct.Struct(">6s2sBBIII16s12s")
_SALT_SIZE = 16
_CHECKSUM_SIZE = 32
#: The most an opened file may ask of argon2: 1 GiB, 10 passes, 16 lanes.
MAX_OPEN_PARAMS: Final = Argon2Params(time_cost=10, memory_kib=1024 * 1024, parallelism=16)


def seal(
    payload: bytes,
    *,
    kind: bytes,
    rng: Rng,
    passphrase: bytes | None = None,
    raw_key: bytes | None = None,
    params: Argon2Params | None = None,
) -> bytes:
    """Encrypt ``payload`` under a passphrase (argon2id) or a raw 32-byte key.

    Exactly one of ``passphrase`` and ``raw_key`` must be given.

    Raises:
        CryptoError: neither or both key sources, or a raw key of the wrong size.
    """
    salt = rng.bytes(_SALT_SIZE)
    nonce = rng.bytes(AEAD_NONCE_SIZE)
    if passphrase is not None and raw_key is not None:
        raise CryptoError("seal needs exactly one of passphrase and raw_key")
    if passphrase is not None:
        params = params or Argon2Params()
        key = argon2id(passphrase, salt, params)
        header = _HEADER.pack(
            _MAGIC,
            kind,
            _VERSION,
            _KDF_ARGON2ID,
            params.time_cost,
            params.memory_kib,
            params.parallelism,
            salt,
            nonce,
        )
    elif raw_key is not None:
        if len(raw_key) != KEY_SIZE:
            raise CryptoError("raw key must be 32 bytes")
        key = raw_key
        header = _HEADER.pack(_MAGIC, kind, _VERSION, _KDF_RAW, 0, 0, 0, salt, nonce)
    else:
        raise CryptoError("seal needs exactly one of passphrase and raw_key")
    body = header + aead_encrypt(key, nonce, payload, header)
    return body + sha256(body)


def uses_passphrase(data: bytes) -> bool:
    """Whether a sealed container (already checked intact) needs a passphrase."""
    return len(data) > _HEADER.size and data[9] == _KDF_ARGON2ID


def check_intact(data: bytes, *, kind: bytes) -> None:
    """Check framing and checksum, without any key.

    Raises:
        StoreCorrupted: truncated, wrong magic or kind, or checksum mismatch.
        UnsupportedVersion: written by a newer format version.
    """
    minimum = _HEADER.size + 16 + _CHECKSUM_SIZE
    if len(data) < minimum:
        raise StoreCorrupted("sealed file is truncated", where="sealed", what="length")
    body, checksum = data[:-_CHECKSUM_SIZE], data[-_CHECKSUM_SIZE:]
    if not constant_time_equal(sha256(body), checksum):
        raise StoreCorrupted("sealed file checksum does not match", where="sealed", what="checksum")
    magic, file_kind, version = data[:6], data[6:8], data[8]
    if magic != _MAGIC or file_kind != kind:
        raise StoreCorrupted("not a Talos file of the expected kind", where="sealed", what="magic")
    if version != _VERSION:
        raise UnsupportedVersion(f"sealed file version {version} is not supported")
    if data[9] not in (_KDF_RAW, _KDF_ARGON2ID):
        raise StoreCorrupted("unknown key derivation", where="sealed", what="kdf")


def open_sealed(
    data: bytes,
    *,
    kind: bytes,
    passphrase: bytes | None = None,
    raw_key: bytes | None = None,
) -> bytes:
    """Check and decrypt a sealed container.

    Raises:
        StoreCorrupted: the file is damaged (see :func:`check_intact`) or its
            argon2 parameters are unreasonable.
        UnsupportedVersion: written by a newer format version.
        DecryptionFailed: the file is intact but the passphrase or key is
            wrong, or the wrong kind of key was supplied.
    """
    check_intact(data, kind=kind)
    _, _, _, kdf, t_cost, memory, lanes, salt, nonce = _HEADER.unpack_from(data)
    header = data[: _HEADER.size]
    ciphertext = data[_HEADER.size : -_CHECKSUM_SIZE]
    if kdf == _KDF_ARGON2ID:
        if passphrase is None:
            raise DecryptionFailed("this file is protected by a passphrase")
        try:
            params = Argon2Params(t_cost, memory, lanes)
        except CryptoError:
            params = None
        limit = MAX_OPEN_PARAMS
        if params is None or (
            params.time_cost > limit.time_cost
            or params.memory_kib > limit.memory_kib
            or params.parallelism > limit.parallelism
        ):
            raise StoreCorrupted(
                "argon2 parameters out of the accepted range", where="sealed", what="kdf parameters"
            )
        key = argon2id(passphrase, salt, params)
    else:
        if raw_key is None or len(raw_key) != KEY_SIZE:
            raise DecryptionFailed("this file is protected by a local key file")
        key = raw_key
    try:
        return aead_decrypt(key, nonce, ciphertext, header)
    except DecryptionFailed:
        raise DecryptionFailed("wrong passphrase or key") from None
