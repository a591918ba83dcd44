"""The crypto wrappers: every failure leaves as a Talos exception."""

from __future__ import annotations

import pytest

from talos.core.crypto import (
    DHKey,
    SigningKey,
    VerifyKey,
    aead_decrypt,
    aead_encrypt,
    hkdf_sha256,
)
from talos.errors import CryptoError, DecryptionFailed, KeyAgreementFailed, SignatureInvalid
from talos.testing import SeededRng


def test_sign_verify_and_tamper(rng: SeededRng) -> None:
    key = SigningKey.generate(rng)
    sig = key.sign(b"hello")
    key.public_key.verify(sig, b"hello")
    with pytest.raises(SignatureInvalid):
        key.public_key.verify(sig, b"hellp")
    with pytest.raises(SignatureInvalid):
        key.public_key.verify(sig[:-1], b"hello")
    assert SigningKey(key.seed()).public_key == key.public_key


def test_rfc8032_test_vector_1() -> None:
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = SigningKey(seed)
    assert key.public_key.raw.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert key.sign(b"").hex().startswith("e5564300c360ac729086e2cc806e828a")


def test_small_order_key_signs_nothing() -> None:
    # The identity point as a public key, with R = identity and S = 0, satisfies the
    # cofactorless equation for every message; OpenSSL accepts it, libsodium does not.
    # Such a key would "sign" anything, so no identity may be built on one.
    identity_point = bytes([1]) + bytes(31)
    trivial = identity_point + bytes(32)
    for message in (b"", b"any message"):
        with pytest.raises(SignatureInvalid):
            VerifyKey(identity_point).verify(trivial, message)


def test_non_canonical_s_is_refused(rng: SeededRng) -> None:
    # S + L verifies the same equation as S; a malleable copy must not pass as a
    # second valid signature (replay sets key on ids, audit entries on bytes).
    key = SigningKey.generate(rng)
    sig = key.sign(b"m")
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(sig[32:], "little") + order
    with pytest.raises(SignatureInvalid):
        key.public_key.verify(sig[:32] + s.to_bytes(32, "little"), b"m")


def test_x25519_agreement_and_low_order_points(rng: SeededRng) -> None:
    a, b = DHKey.generate(rng), DHKey.generate(rng)
    assert a.exchange(b.public) == b.exchange(a.public)
    with pytest.raises(KeyAgreementFailed):
        a.exchange(b"\0" * 32)
    with pytest.raises(KeyAgreementFailed):
        a.exchange(b"\1" + b"\0" * 31)
    with pytest.raises(KeyAgreementFailed):
        a.exchange(b"short")


def test_aead(rng: SeededRng) -> None:
    key, nonce = rng.bytes(32), rng.bytes(12)
    ct = aead_encrypt(key, nonce, b"pt", b"ad")
    assert aead_decrypt(key, nonce, ct, b"ad") == b"pt"
    for bad_ct, bad_ad in ((ct[:-1] + bytes([ct[-1] ^ 1]), b"ad"), (ct, b"ae"), (ct[:5], b"ad")):
        with pytest.raises(DecryptionFailed):
            aead_decrypt(key, nonce, bad_ct, bad_ad)
    with pytest.raises(CryptoError):
        aead_encrypt(key[:16], nonce, b"pt", b"")


def test_key_sizes_are_checked() -> None:
    with pytest.raises(CryptoError):
        VerifyKey(b"\0" * 31)
    with pytest.raises(CryptoError):
        SigningKey(b"\0" * 33)


def test_hkdf_rfc5869_case_1() -> None:
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_reprs_hide_secrets(rng: SeededRng) -> None:
    sk, dh = SigningKey.generate(rng), DHKey.generate(rng)
    assert sk.seed().hex()[:16] not in repr(sk)
    assert dh.private_bytes().hex()[:16] not in repr(dh)


def test_a_signing_key_is_not_pickled_or_copied(rng: SeededRng) -> None:
    import copy
    import pickle

    key = SigningKey.generate(rng)
    for leak in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled"):
            leak(key)
