"""X3DH: agreement with and without one-time prekeys, single use, signatures, encodings."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from talos.core import x3dh
from talos.core.agent_id import agent_id_from_digest
from talos.core.crypto import DHKey, SigningKey, hkdf_sha256, sha256
from talos.core.encoding import canonical_dumps
from talos.errors import (
    KeyAgreementFailed,
    MalformedFrame,
    SignatureInvalid,
    UnsupportedVersion,
)
from talos.testing import SeededRng

# Points of small order on Curve25519 (RFC 7748 §6.1 / libsodium blocklist): X25519
# with any of them yields the all-zero shared secret.
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
]


@dataclass(frozen=True)
class Agent:
    agent_id: str
    signing: SigningKey
    dh: DHKey

    def initiate(self, peer: Agent, bundle: x3dh.PrekeyBundle, rng: SeededRng) -> x3dh.Initiation:
        return x3dh.initiate(
            bundle,
            peer_agent_id=peer.agent_id,
            peer_signing_key=peer.signing.public_key.raw,
            peer_identity_dh=peer.dh.public,
            agent_id=self.agent_id,
            identity_signing_key=self.signing.public_key.raw,
            identity_dh=self.dh,
            rng=rng,
        )

    def as_sender(self) -> dict[str, object]:
        """The verified identity a responder checks the initial header against."""
        return {
            "peer_agent_id": self.agent_id,
            "peer_signing_key": self.signing.public_key.raw,
            "peer_identity_dh": self.dh.public,
        }


def respond(store: x3dh.PrekeyStore, header: x3dh.InitialHeader, sender: Agent) -> x3dh.Response:
    return x3dh.respond(store, header, **sender.as_sender())  # type: ignore[arg-type]


def make_agent(rng: SeededRng, name: bytes) -> Agent:
    return Agent(agent_id_from_digest(sha256(name)), SigningKey.generate(rng), DHKey.generate(rng))


@pytest.fixture
def alice(rng: SeededRng) -> Agent:
    return make_agent(rng, b"alice")


@pytest.fixture
def bob(rng: SeededRng) -> Agent:
    return make_agent(rng, b"bob")


@pytest.fixture
def store(bob: Agent, rng: SeededRng) -> x3dh.PrekeyStore:
    created = x3dh.PrekeyStore.create(
        agent_id=bob.agent_id, signing_key=bob.signing, identity_dh=bob.dh, rng=rng
    )
    return created.add_one_time_prekeys(3, rng)


# -- agreement ---------------------------------------------------------------


@pytest.mark.parametrize("opk_id", [None, 1])
def test_both_sides_derive_the_same_key_and_ad(alice, bob, store, rng, opk_id):
    start = alice.initiate(bob, store.bundle(opk_id), rng)
    reply = respond(store, start.header, alice)
    assert reply.shared_key == start.shared_key
    assert len(start.shared_key) == 32
    assert reply.associated_data == start.associated_data
    assert len(start.associated_data) == 32
    assert start.their_ratchet_key == store.current_signed_prekey.key.public
    assert reply.our_ratchet_key.public == start.their_ratchet_key
    assert start.header.one_time_prekey_id == opk_id


def test_one_time_prekey_changes_the_key(alice, bob, store):
    with_opk = alice.initiate(bob, store.bundle(0), SeededRng(9))
    without = alice.initiate(bob, store.bundle(None), SeededRng(9))
    assert with_opk.header.ephemeral_key == without.header.ephemeral_key
    assert with_opk.shared_key != without.shared_key


def test_shared_key_follows_the_spec_formula(alice, bob, store):
    ephemeral = DHKey(bytes(range(32)))
    bundle = store.bundle(2)
    start = x3dh._initiate_from_parts(
        bundle,
        peer_agent_id=bob.agent_id,
        peer_signing_key=bob.signing.public_key.raw,
        peer_identity_dh=bob.dh.public,
        agent_id=alice.agent_id,
        identity_signing_key=alice.signing.public_key.raw,
        identity_dh=alice.dh,
        ephemeral=ephemeral,
    )
    spk = store.current_signed_prekey.key
    opk = store.one_time_prekeys[2]
    ikm = (
        b"\xff" * 32
        + alice.dh.exchange(spk.public)
        + ephemeral.exchange(bob.dh.public)
        + ephemeral.exchange(spk.public)
        + ephemeral.exchange(opk.public)
    )
    expected = hkdf_sha256(ikm, salt=bytes(32), info=b"talos/x3dh/v1", length=32)
    assert start.shared_key == expected


def test_ad_binds_both_identities_in_order(alice, bob, store, rng):
    start = alice.initiate(bob, store.bundle(), rng)
    mallory = make_agent(SeededRng(77), b"mallory")
    forged = replace(
        start.header,
        agent_id=mallory.agent_id,
        identity_signing_key=mallory.signing.public_key.raw,
        identity_dh_key=mallory.dh.public,
    )
    assert respond(store, forged, mallory).associated_data != start.associated_data
    swapped = x3dh._associated_data(
        (bob.agent_id, bob.signing.public_key.raw, bob.dh.public),
        (alice.agent_id, alice.signing.public_key.raw, alice.dh.public),
    )
    assert swapped != start.associated_data


# -- one-time prekeys ------------------------------------------------------------


def test_one_time_prekey_is_single_use(alice, bob, store, rng):
    start = alice.initiate(bob, store.bundle(1), rng)
    reply = respond(store, start.header, alice)
    assert 1 not in reply.store.one_time_prekeys
    assert 1 in store.one_time_prekeys  # the original store is untouched
    with pytest.raises(KeyAgreementFailed):
        respond(reply.store, start.header, alice)
    with pytest.raises(KeyAgreementFailed):
        reply.store.without_one_time_prekey(1)


def test_unknown_prekeys_are_refused(alice, bob, store, rng):
    start = alice.initiate(bob, store.bundle(0), rng)
    with pytest.raises(KeyAgreementFailed):
        respond(store, replace(start.header, one_time_prekey_id=99), alice)
    with pytest.raises(KeyAgreementFailed):
        respond(store, replace(start.header, signed_prekey_id=7), alice)
    with pytest.raises(KeyAgreementFailed):
        store.bundle(99)


def test_add_one_time_prekeys_uses_fresh_ids(store, rng):
    more = store.without_one_time_prekey(2).add_one_time_prekeys(2, rng)
    assert sorted(more.one_time_prekey_publics()) == [0, 1, 3, 4]
    assert more.next_one_time_prekey_id == 5
    with pytest.raises(KeyAgreementFailed):
        store.add_one_time_prekeys(x3dh.MAX_ONE_TIME_PREKEYS, rng)


def test_rotation_keeps_the_previous_signed_prekey(alice, bob, store, rng):
    old = alice.initiate(bob, store.bundle(), rng)
    rotated = store.rotate_signed_prekey(bob.signing, rng)
    assert rotated.current_signed_prekey.prekey_id == 1
    assert respond(rotated, old.header, alice).shared_key == old.shared_key
    twice = rotated.rotate_signed_prekey(bob.signing, rng)
    assert [s.prekey_id for s in twice.signed_prekeys] == [1, 2]
    with pytest.raises(KeyAgreementFailed):
        respond(twice, old.header, alice)


# -- signatures and bad keys -------------------------------------------------------


def test_bundle_signature_verifies(store):
    store.bundle(0).verify()


@pytest.mark.parametrize(
    "change",
    [
        {"signed_prekey_signature": bytes(64)},
        {"signed_prekey_id": 5},
        {"signed_prekey": DHKey(bytes([7] * 32)).public},
        {"identity_dh_key": DHKey(bytes([8] * 32)).public},
    ],
)
def test_bad_spk_signature_is_refused(alice, bob, store, rng, change):
    bundle = replace(store.bundle(), **change)
    peer_dh = bundle.identity_dh_key  # the attacker also swapped what we "verified"
    with pytest.raises(SignatureInvalid):
        x3dh.initiate(
            bundle,
            peer_agent_id=bob.agent_id,
            peer_signing_key=bob.signing.public_key.raw,
            peer_identity_dh=peer_dh,
            agent_id=alice.agent_id,
            identity_signing_key=alice.signing.public_key.raw,
            identity_dh=alice.dh,
            rng=rng,
        )


def test_bundle_from_another_identity_is_refused(alice, bob, store, rng):
    mallory = make_agent(SeededRng(5), b"mallory")
    with pytest.raises(SignatureInvalid):
        alice.initiate(mallory, store.bundle(), rng)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
def test_low_order_keys_fail_key_agreement(alice, bob, store, rng, point):
    # An unsigned one-time prekey swapped in transit.
    with pytest.raises(KeyAgreementFailed):
        alice.initiate(bob, replace(store.bundle(0), one_time_prekey=point), rng)
    # A signed prekey the (malicious) owner signed itself.
    signature = bob.signing.sign(x3dh._spk_message(bob.dh.public, 9, point))
    signed = replace(
        store.bundle(), signed_prekey_id=9, signed_prekey=point, signed_prekey_signature=signature
    )
    with pytest.raises(KeyAgreementFailed):
        alice.initiate(bob, signed, rng)
    # The peer identity key, through the private seam.
    with pytest.raises(KeyAgreementFailed):
        x3dh._initiator_shared_key(
            alice.dh, DHKey.generate(rng), point, store.current_signed_prekey.key.public, None
        )
    # Header keys on the responder side.
    start = alice.initiate(bob, store.bundle(0), rng)
    for field in ("ephemeral_key", "identity_dh_key"):
        with pytest.raises(KeyAgreementFailed):
            respond(store, replace(start.header, **{field: point}), alice)


# -- encodings -------------------------------------------------------------------


def test_bundle_header_and_store_round_trip(alice, bob, store, rng):
    for bundle in (store.bundle(), store.bundle(2)):
        assert x3dh.PrekeyBundle.from_bytes(bundle.to_bytes()) == bundle
    start = alice.initiate(bob, store.bundle(1), rng)
    assert x3dh.InitialHeader.from_bytes(start.header.to_bytes()) == start.header
    loaded = x3dh.PrekeyStore.from_bytes(store.to_bytes())
    assert loaded.to_bytes() == store.to_bytes()
    assert respond(loaded, start.header, alice).shared_key == start.shared_key


def test_store_repr_hides_secrets(store):
    text = repr(store)
    assert store.identity_dh.private_bytes().hex() not in text
    assert "one_time_prekeys=3" in text


def test_unknown_versions_are_refused(store):
    data = store.bundle().to_dict()
    data["v"] = 2
    with pytest.raises(UnsupportedVersion):
        x3dh.PrekeyBundle.from_bytes(canonical_dumps(data))


@pytest.mark.parametrize(
    "cls", [x3dh.PrekeyBundle, x3dh.InitialHeader, x3dh.PrekeyStore], ids=lambda c: c.__name__
)
def test_garbage_is_malformed(cls, store):
    good = {
        x3dh.PrekeyBundle: store.bundle(0).to_bytes(),
        x3dh.InitialHeader: x3dh.InitialHeader(
            store.agent_id, bytes(32), bytes(32), bytes(32), 0, None
        ).to_bytes(),
        x3dh.PrekeyStore: store.to_bytes(),
    }[cls]
    samples = [b"", b"\xff", good[:-1], good + b"\x00", canonical_dumps([1, 2])]
    samples += [canonical_dumps({"v": 1}), canonical_dumps({"v": "1"})]
    for i in range(0, len(good), max(1, len(good) // 40)):
        flipped = bytearray(good)
        flipped[i] ^= 0x40
        samples.append(bytes(flipped))
    for sample in samples:
        try:
            cls.from_bytes(sample)
        except (MalformedFrame, UnsupportedVersion):
            continue


def test_wrong_field_types_are_malformed(store):
    data = store.bundle().to_dict()
    for key, bad in [("spk", b"short"), ("spk_id", -1), ("id", "did:web:x"), ("opk", bytes(32))]:
        broken = dict(data, **{key: bad})
        with pytest.raises(MalformedFrame):
            x3dh.PrekeyBundle.from_bytes(canonical_dumps(broken))


# -- the initial header is bound to the authenticated sender ---------------------


def test_header_resigned_by_another_peer_is_refused(alice, bob, store, rng):
    """Unknown-key share: Mallory re-wraps Alice's first message as her own."""
    start = alice.initiate(bob, store.bundle(0), rng)
    mallory = make_agent(SeededRng(77), b"mallory")
    with pytest.raises(KeyAgreementFailed, match="authenticated sender"):
        respond(store, start.header, mallory)


@pytest.mark.parametrize("field", ["identity_signing_key", "identity_dh_key"])
def test_header_with_keys_other_than_the_verified_ones_is_refused(alice, bob, store, rng, field):
    start = alice.initiate(bob, store.bundle(0), rng)
    stale = replace(start.header, **{field: DHKey(bytes([9] * 32)).public})
    with pytest.raises(KeyAgreementFailed, match="authenticated sender"):
        respond(store, stale, alice)


def test_bundle_for_another_agent_id_is_refused(alice, bob, store, rng):
    mallory = make_agent(SeededRng(77), b"mallory")
    with pytest.raises(SignatureInvalid, match="identity"):
        x3dh.initiate(
            store.bundle(0),
            peer_agent_id=mallory.agent_id,
            peer_signing_key=bob.signing.public_key.raw,
            peer_identity_dh=bob.dh.public,
            agent_id=alice.agent_id,
            identity_signing_key=alice.signing.public_key.raw,
            identity_dh=alice.dh,
            rng=rng,
        )
