"""Sealing values at rest under the agent's storage key (docs/design/agent-state.md).

A sealed value is ``0x01 ‖ N ‖ AES-256-GCM(K', N[12:24], plaintext, AD)``
with ``N`` 24 random bytes and ``K' = HMAC-SHA256(storage_key, label ‖ N[0:12])``
(an extended nonce: random nonces never repeat in practice). ``AD`` is the
canonical CBOR of ``["talos/agent-state/v1", kind, row identity...]``, so a
sealed value cannot be moved to another row.
"""

from __future__ import annotations

from typing import Any, Final

from talos.core.crypto import aead_decrypt, aead_encrypt, hkdf_sha256, hmac_sha256
from talos.core.encoding import canonical_dumps
from talos.core.rng import Rng
from talos.errors import ConfigurationError, DecryptionFailed, MalformedFrame
from talos.storage.state.rows import corrupt

#: The plaintext of the key-check row, sealed with associated data ``("key-check",)``.
KEY_CHECK: Final = b"talos agent state key check"

_SEAL_VERSION = 1
_SEAL_LABEL = b"talos/agent-state/seal/v1\x00"
_SEAL_NONCE = 24
_SEAL_OVERHEAD = 1 + _SEAL_NONCE + 16


def derive_storage_key(secret: bytes) -> bytes:
    """A 32-byte storage key from an agent secret (e.g. its identity seed), by HKDF-SHA256.

    Raises:
        ConfigurationError: ``secret`` is shorter than 32 bytes.
    """
    if type(secret) is not bytes or len(secret) < 32:
        raise ConfigurationError("the secret for a storage key must be at least 32 bytes")
    return hkdf_sha256(secret, salt=None, info=b"talos/agent-state/storage-key/v1", length=32)


class Sealer:
    """Seals and opens values under one storage key, with nonces from ``rng``."""

    def __init__(self, storage_key: bytes, rng: Rng) -> None:
        """Raises: ConfigurationError: ``storage_key`` is not 32 bytes."""
        if type(storage_key) is not bytes or len(storage_key) != 32:
            raise ConfigurationError("storage_key must be 32 bytes")
        self._key = storage_key
        self._rng = rng

    def seal(self, plaintext: bytes, ad: tuple[Any, ...]) -> bytes:
        """``plaintext`` sealed for the row that ``ad`` names."""
        nonce = self._rng.bytes(_SEAL_NONCE)
        key = hmac_sha256(self._key, _SEAL_LABEL + nonce[:12])
        sealed = aead_encrypt(key, nonce[12:], plaintext, _associated(ad))
        return bytes((_SEAL_VERSION,)) + nonce + sealed

    def open(self, sealed: bytes, ad: tuple[Any, ...]) -> bytes:
        """The plaintext of ``sealed``.

        Raises:
            DecryptionFailed: wrong key, wrong row, or damaged.
            MalformedFrame: too short or of an unknown version.
        """
        if len(sealed) < _SEAL_OVERHEAD or sealed[0] != _SEAL_VERSION:
            raise MalformedFrame("sealed value is too short or of an unknown version")
        nonce = sealed[1 : 1 + _SEAL_NONCE]
        key = hmac_sha256(self._key, _SEAL_LABEL + nonce[:12])
        return aead_decrypt(key, nonce[12:], sealed[1 + _SEAL_NONCE :], _associated(ad))

    def unseal(self, db: str, key: str, sealed: bytes, ad: tuple[Any, ...]) -> bytes:
        """The plaintext of the value stored in ``db`` at ``key``.

        Raises:
            StoreCorrupted: it does not open (the key was checked when opening the state).
        """
        try:
            return self.open(sealed, ad)
        except (DecryptionFailed, MalformedFrame):
            raise corrupt(db, key, "sealed value fails authentication") from None


def _associated(parts: tuple[Any, ...]) -> bytes:
    return canonical_dumps(["talos/agent-state/v1", *parts])
