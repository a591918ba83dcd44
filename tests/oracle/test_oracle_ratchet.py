"""Cross-check our Double Ratchet against Syndace's ``doubleratchet`` 1.x.

Their library is configured with exactly our profile (see docs/design/sessions.md):

* root chain: their HKDF KDF (salt = root key, ikm = DH output) with SHA-256 and
  our info string, 64 bytes out, first half the new root key;
* message chains: their "separate HMACs" KDF with SHA-256 and the constant
  ``b"\\x02\\x01"``; it outputs ``HMAC(ck, 0x02) || HMAC(ck, 0x01)`` and their
  KDF chain keeps the first half as the next chain key and returns the second
  half as the message key, which is our KDF_CK;
* AEAD: a subclass written here from the profile (HKDF-SHA256 via their own
  crypto provider, AES-256-GCM straight from ``cryptography``), deliberately
  not reusing :mod:`talos.core.crypto`, so a mistake there cannot hide here;
* associated data: ``AD || ratchet key || PN (u32 BE) || N (u32 BE)``, our header.

Their Diffie-Hellman ratchet draws private keys in the same order as ours (one
at initialisation for the initiator, one per DH step), so feeding it the same
seeded stream makes both produce identical bytes, which the first test checks.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag

# Test-only: an independent AES-GCM for the oracle's AEAD (src may use only core.crypto).
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from doubleratchet import aead as dr_aead
from doubleratchet.double_ratchet import DoubleRatchet
from doubleratchet.recommended import (
    HashFunction,
    diffie_hellman_ratchet_curve25519,
    kdf_hkdf,
    kdf_separate_hmacs,
)
from doubleratchet.recommended.crypto_provider_impl import CryptoProviderImpl
from doubleratchet.types import EncryptedMessage, Header

from talos.core.crypto import DHKey
from talos.core.ratchet import Session
from talos.testing import SeededRng

NOW = 1_700_000_000.0
ROOT_INFO = b"talos/ratchet/root/v1"
MESSAGE_INFO = b"talos/ratchet/message/v1"
CHAIN_CONSTANT = b"\x02\x01"


class RootKDF(kdf_hkdf.KDF):
    info = ROOT_INFO

    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256

    @classmethod
    def _get_info(cls) -> bytes:  # type: ignore[override]
        return cls.info


class ChainKDF(kdf_separate_hmacs.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256


class GcmAEAD(dr_aead.AEAD):
    """Our ENCRYPT/DECRYPT, re-implemented from the profile text."""

    info = MESSAGE_INFO

    @classmethod
    async def _keys(cls, key: bytes) -> tuple[bytes, bytes]:
        okm = await CryptoProviderImpl.hkdf_derive(
            hash_function=HashFunction.SHA_256,
            length=44,
            salt=b"\x00" * 32,
            info=cls.info,
            key_material=key,
        )
        return okm[:32], okm[32:]

    @classmethod
    async def encrypt(cls, plaintext: bytes, key: bytes, associated_data: bytes) -> bytes:  # type: ignore[override]
        aes_key, nonce = await cls._keys(key)
        return AESGCM(aes_key).encrypt(nonce, plaintext, associated_data)

    @classmethod
    async def decrypt(cls, ciphertext: bytes, key: bytes, associated_data: bytes) -> bytes:  # type: ignore[override]
        aes_key, nonce = await cls._keys(key)
        try:
            return AESGCM(aes_key).decrypt(nonce, ciphertext, associated_data)
        except InvalidTag:
            raise dr_aead.AuthenticationFailedException("tag mismatch") from None


class TalosDoubleRatchet(DoubleRatchet):
    @staticmethod
    def _build_associated_data(associated_data: bytes, header: Header) -> bytes:
        return associated_data + encode_header(header)


def encode_header(header: Header) -> bytes:
    return (
        header.ratchet_pub
        + header.previous_sending_chain_length.to_bytes(4, "big")
        + header.sending_chain_length.to_bytes(4, "big")
    )


def decode_header(data: bytes) -> Header:
    assert len(data) == 40
    return Header(data[:32], int.from_bytes(data[32:36], "big"), int.from_bytes(data[36:], "big"))


def seeded_dh_ratchet(rng: SeededRng) -> type:
    """Their X25519 ratchet, drawing private keys from ``rng`` like our Session does."""

    class Seeded(diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet):
        @staticmethod
        def _generate_priv() -> bytes:
            return rng.bytes(32)

    return Seeded


def config(
    dh_class: type = diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet,
    *,
    root: type = RootKDF,
    constant: bytes = CHAIN_CONSTANT,
    aead: type = GcmAEAD,
) -> dict[str, Any]:
    return {
        "diffie_hellman_ratchet_class": dh_class,
        "root_chain_kdf": root,
        "message_chain_kdf": ChainKDF,
        "message_chain_constant": constant,
        "dos_protection_threshold": 1000,
        "max_num_skipped_message_keys": 2000,
        "aead": aead,
    }


class Theirs:
    """Synchronous face of their async ratchet, speaking our wire format."""

    def __init__(self, ratchet: TalosDoubleRatchet, ad: bytes) -> None:
        self.ratchet, self.ad = ratchet, ad

    @classmethod
    def initiator(cls, sk: bytes, ad: bytes, bob_pub: bytes, first: bytes, **cfg: Any) -> Any:
        ratchet, message = asyncio.run(
            TalosDoubleRatchet.encrypt_initial_message(
                **config(**cfg),
                shared_secret=sk,
                recipient_ratchet_pub=bob_pub,
                message=first,
                associated_data=ad,
            )
        )
        return cls(ratchet, ad), (encode_header(message.header), message.ciphertext)

    @classmethod
    def responder(
        cls, sk: bytes, ad: bytes, bob: DHKey, message: tuple[bytes, bytes], **cfg: Any
    ) -> Any:
        ratchet, plaintext = asyncio.run(
            TalosDoubleRatchet.decrypt_initial_message(
                **config(**cfg),
                shared_secret=sk,
                own_ratchet_priv=bob.private_bytes(),
                message=EncryptedMessage(decode_header(message[0]), message[1]),
                associated_data=ad,
            )
        )
        return cls(ratchet, ad), plaintext

    def encrypt(self, plaintext: bytes) -> tuple[bytes, bytes]:
        message = asyncio.run(self.ratchet.encrypt_message(plaintext, self.ad))
        return encode_header(message.header), message.ciphertext

    def decrypt(self, header: bytes, ciphertext: bytes) -> bytes:
        message = EncryptedMessage(decode_header(header), ciphertext)
        return asyncio.run(self.ratchet.decrypt_message(message, self.ad))


def key_material(seed: int) -> tuple[bytes, bytes, DHKey]:
    rng = SeededRng(seed)
    return rng.bytes(32), rng.bytes(32), DHKey.generate(rng)


# -- byte-for-byte equality -----------------------------------------------------------


def test_identical_randomness_gives_identical_bytes():
    sk, ad, bob_spk = key_material(1)
    ours_a = Session.initiator(sk, ad, bob_spk.public, SeededRng(10))
    ours_b = Session.responder(sk, ad, bob_spk, SeededRng(20))
    theirs_a, first = Theirs.initiator(
        sk, ad, bob_spk.public, b"m0", dh_class=seeded_dh_ratchet(SeededRng(10))
    )
    assert ours_a.encrypt(b"m0", now=NOW) == first
    theirs_b, plaintext = Theirs.responder(
        sk, ad, bob_spk, first, dh_class=seeded_dh_ratchet(SeededRng(20))
    )
    assert plaintext == b"m0"
    assert ours_b.decrypt(*first, now=NOW) == b"m0"
    script = [("a", 2), ("b", 3), ("a", 1), ("b", 1), ("a", 4)]
    for who, count in script:
        for i in range(count):
            text = b"%s%d" % (who.encode(), i)
            if who == "a":
                ours, theirs, peer_ours, peer_theirs = ours_a, theirs_a, ours_b, theirs_b
            else:
                ours, theirs, peer_ours, peer_theirs = ours_b, theirs_b, ours_a, theirs_a
            mine = ours.encrypt(text, now=NOW)
            assert mine == theirs.encrypt(text)
            assert peer_ours.decrypt(*mine, now=NOW) == text
            assert peer_theirs.decrypt(*mine) == text


# -- cross decryption ------------------------------------------------------------------


def converse(alice: Any, bob: Any, seed: int) -> None:
    """Bursts both ways with shuffled delivery and held-back messages."""
    shuffle = random.Random(seed).shuffle  # noqa: S311 - test ordering, not cryptography
    held: list[tuple[Any, tuple[bytes, bytes], bytes]] = []
    for turn in range(6):
        sender, receiver = (alice, bob) if turn % 2 == 0 else (bob, alice)
        burst = []
        for i in range(turn + 2):
            text = b"turn%d-%d" % (turn, i)
            burst.append((encrypt(sender, text), text))
        shuffle(burst)
        held.append((receiver, *burst.pop()))  # delivered only at the very end
        for message, text in burst:
            assert decrypt(receiver, message) == text
    for receiver, message, text in reversed(held):
        assert decrypt(receiver, message) == text


def encrypt(party: Any, text: bytes) -> tuple[bytes, bytes]:
    if isinstance(party, Session):
        return party.encrypt(text, now=NOW)
    return party.encrypt(text)  # type: ignore[no-any-return]


def decrypt(party: Any, message: tuple[bytes, bytes]) -> bytes:
    if isinstance(party, Session):
        return party.decrypt(*message, now=NOW)
    return party.decrypt(*message)  # type: ignore[no-any-return]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ours_initiates_theirs_responds(seed):
    sk, ad, bob_spk = key_material(seed)
    alice = Session.initiator(sk, ad, bob_spk.public, SeededRng(seed + 100))
    first = alice.encrypt(b"hello", now=NOW)
    bob, plaintext = Theirs.responder(sk, ad, bob_spk, first)
    assert plaintext == b"hello"
    converse(alice, bob, seed)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_theirs_initiates_ours_responds(seed):
    sk, ad, bob_spk = key_material(seed)
    alice, first = Theirs.initiator(sk, ad, bob_spk.public, b"hello")
    bob = Session.responder(sk, ad, bob_spk, SeededRng(seed + 200))
    assert bob.decrypt(*first, now=NOW) == b"hello"
    converse(alice, bob, seed)


def test_first_messages_out_of_order():
    sk, ad, bob_spk = key_material(4)
    alice = Session.initiator(sk, ad, bob_spk.public, SeededRng(5))
    msgs = [alice.encrypt(b"%d" % i, now=NOW) for i in range(4)]
    bob, plaintext = Theirs.responder(sk, ad, bob_spk, msgs[2])
    assert plaintext == b"2"
    assert [bob.decrypt(*msgs[i]) for i in (0, 3, 1)] == [b"0", b"3", b"1"]
    theirs_alice, first = Theirs.initiator(sk, ad, bob_spk.public, b"0")
    later = [theirs_alice.encrypt(b"%d" % i) for i in range(1, 4)]
    ours_bob = Session.responder(sk, ad, bob_spk, SeededRng(6))
    assert ours_bob.decrypt(*later[1], now=NOW) == b"2"
    assert ours_bob.decrypt(*first, now=NOW) == b"0"
    assert [ours_bob.decrypt(*m, now=NOW) for m in (later[2], later[0])] == [b"3", b"1"]


# -- the oracle can fail ----------------------------------------------------------------


class WrongRootKDF(RootKDF):
    info = b"talos/ratchet/root/v2"


class WrongAEAD(GcmAEAD):
    info = b"talos/ratchet/message/v2"


@pytest.mark.parametrize(
    "cfg",
    [{"root": WrongRootKDF}, {"constant": b"\x01\x02"}, {"aead": WrongAEAD}],
    ids=["root-info", "chain-constant", "message-info"],
)
def test_a_profile_mismatch_is_detected(cfg):
    sk, ad, bob_spk = key_material(9)
    alice = Session.initiator(sk, ad, bob_spk.public, SeededRng(9))
    with pytest.raises(dr_aead.AuthenticationFailedException):
        Theirs.responder(sk, ad, bob_spk, alice.encrypt(b"x", now=NOW), **cfg)
