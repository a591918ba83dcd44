"""Cross-check our X3DH against Syndace's ``x3dh`` 1.x.

Both sides are loaded with the same key material and must derive the same SK.
Their library is configured with SHA-256, our info string and Curve25519
identity keys; salt (32 zero bytes) and the 0xFF*32 prefix are fixed in both.

Two deliberate differences, documented in docs/design/sessions.md:

* signatures: theirs is XEdDSA by the X25519 identity key over the bare prekey;
  ours is Ed25519 by a separate signing key over a domain-separated message.
  When their side must verify a bundle, we hand it an XEdDSA signature made
  here with ``xeddsa``; signature checking of ours is covered in the unit tests.
* associated data: theirs is ``IK_A || IK_B || appendix``; ours is a SHA-256
  over both agent ids and both key pairs. Only SK is compared.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import xeddsa
from x3dh.base_state import BaseState
from x3dh.crypto_provider import HashFunction
from x3dh.models import BaseStateModel, IdentityKeyPairModel, SignedPreKeyPairModel
from x3dh.types import Bundle, Header, IdentityKeyFormat, SecretType

from talos.core import x3dh
from talos.core.agent_id import agent_id_from_digest
from talos.core.crypto import DHKey, SigningKey, sha256
from talos.testing import SeededRng

INFO = b"talos/x3dh/v1"


class SyndaceState(BaseState):
    @staticmethod
    def _encode_public_key(key_format: IdentityKeyFormat, pub: bytes) -> bytes:
        return pub


def their_state(
    identity: DHKey, spk: DHKey, opks: list[DHKey], *, info: bytes = INFO
) -> SyndaceState:
    model = BaseStateModel(
        identity_key=IdentityKeyPairModel(
            secret=identity.private_bytes(), secret_type=SecretType.PRIV
        ),
        signed_pre_key=SignedPreKeyPairModel(priv=spk.private_bytes(), sig=bytes(64), timestamp=0),
        old_signed_pre_key=None,
        pre_keys=frozenset(k.private_bytes() for k in opks),
    )
    return SyndaceState.from_model(model, IdentityKeyFormat.CURVE_25519, HashFunction.SHA_256, info)


@dataclass(frozen=True)
class Agent:
    agent_id: str
    signing: SigningKey
    dh: DHKey


def make_agent(seed: int, name: bytes) -> Agent:
    rng = SeededRng(seed)
    return Agent(agent_id_from_digest(sha256(name)), SigningKey.generate(rng), DHKey.generate(rng))


@pytest.fixture
def alice() -> Agent:
    return make_agent(1, b"alice")


@pytest.fixture
def bob() -> Agent:
    return make_agent(2, b"bob")


@pytest.fixture
def store(bob: Agent) -> x3dh.PrekeyStore:
    rng = SeededRng(3)
    created = x3dh.PrekeyStore.create(
        agent_id=bob.agent_id, signing_key=bob.signing, identity_dh=bob.dh, rng=rng
    )
    return created.add_one_time_prekeys(3, rng)


def ours_initiates(alice: Agent, bob: Agent, store: x3dh.PrekeyStore, opk_id: int | None):
    return x3dh._initiate_from_parts(
        store.bundle(opk_id),
        peer_agent_id=bob.agent_id,
        peer_signing_key=bob.signing.public_key.raw,
        peer_identity_dh=bob.dh.public,
        agent_id=alice.agent_id,
        identity_signing_key=alice.signing.public_key.raw,
        identity_dh=alice.dh,
        ephemeral=DHKey(SeededRng(4).bytes(32)),
    )


@pytest.mark.parametrize("opk_id", [None, 1])
def test_ours_initiates_theirs_responds(alice, bob, store, opk_id):
    start = ours_initiates(alice, bob, store, opk_id)
    spk = store.current_signed_prekey.key
    theirs = their_state(bob.dh, spk, list(store.one_time_prekeys.values()))
    opk = None if opk_id is None else store.one_time_prekeys[opk_id].public
    header = Header(
        identity_key=start.header.identity_dh_key,
        ephemeral_key=start.header.ephemeral_key,
        signed_pre_key=spk.public,
        pre_key=opk,
    )
    sk, their_ad, used_spk = asyncio.run(
        theirs.get_shared_secret_passive(header, b"", require_pre_key=opk_id is not None)
    )
    assert sk == start.shared_key
    assert used_spk.priv == spk.private_bytes()
    assert their_ad == alice.dh.public + bob.dh.public  # theirs; ours is a hash (see docstring)


@pytest.mark.parametrize("with_opk", [False, True])
def test_theirs_initiates_ours_responds(alice, bob, store, with_opk):
    spk = store.current_signed_prekey.key
    # Their bundle check is XEdDSA under the X25519 identity key.
    signature = xeddsa.ed25519_priv_sign(
        xeddsa.priv_force_sign(bob.dh.private_bytes(), False), spk.public
    )
    opk_id = 2
    bundle = Bundle(
        identity_key=bob.dh.public,
        signed_pre_key=spk.public,
        signed_pre_key_sig=signature,
        pre_keys=frozenset({store.one_time_prekeys[opk_id].public}) if with_opk else frozenset(),
    )
    theirs = their_state(alice.dh, DHKey(SeededRng(5).bytes(32)), [])
    sk, _, header = asyncio.run(
        theirs.get_shared_secret_active(bundle, b"", require_pre_key=with_opk)
    )
    assert header.identity_key == alice.dh.public
    ours = x3dh.InitialHeader(
        agent_id=alice.agent_id,
        identity_signing_key=alice.signing.public_key.raw,
        identity_dh_key=header.identity_key,
        ephemeral_key=header.ephemeral_key,
        signed_prekey_id=store.current_signed_prekey.prekey_id,
        one_time_prekey_id=opk_id if with_opk else None,
    )
    reply = x3dh.respond(
        store,
        ours,
        peer_agent_id=alice.agent_id,
        peer_signing_key=alice.signing.public_key.raw,
        peer_identity_dh=alice.dh.public,
    )
    assert reply.shared_key == sk
    assert (opk_id in reply.store.one_time_prekeys) is not with_opk


def test_private_seam_matches_their_passive_side(alice, bob, store):
    ephemeral = DHKey(SeededRng(6).bytes(32))
    spk = store.current_signed_prekey.key
    opk = store.one_time_prekeys[0]
    ours = x3dh._initiator_shared_key(alice.dh, ephemeral, bob.dh.public, spk.public, opk.public)
    header = Header(alice.dh.public, ephemeral.public, spk.public, opk.public)
    theirs = their_state(bob.dh, spk, [opk])
    sk, _, _ = asyncio.run(theirs.get_shared_secret_passive(header, b""))
    assert sk == ours
    assert x3dh._responder_shared_key(bob.dh, spk, opk, alice.dh.public, ephemeral.public) == ours


def test_the_oracle_detects_a_different_info(alice, bob, store):
    start = ours_initiates(alice, bob, store, None)
    spk = store.current_signed_prekey.key
    theirs = their_state(bob.dh, spk, [], info=b"talos/x3dh/v2")
    header = Header(alice.dh.public, start.header.ephemeral_key, spk.public, None)
    sk, _, _ = asyncio.run(theirs.get_shared_secret_passive(header, b"", require_pre_key=False))
    assert sk != start.shared_key
