"""The X3DH handshake itself: :func:`initiate` and :func:`respond` (spec §3.3, §3.4).

Owns the derivation of the shared key ``SK`` and the associated data ``AD``
(rules 2 and 3 of :mod:`talos.core.x3dh`), the check that a bundle or header
names exactly the peer's verified identity, and the two results
(:class:`Initiation`, :class:`Response`). The ``_from_parts`` and
``_shared_key`` functions are private seams that vector and oracle tests drive
with fixed key material.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from talos.core.crypto import DHKey, constant_time_equal, hkdf_sha256, sha256
from talos.core.rng import Rng
from talos.core.x3dh.records import InitialHeader, PrekeyBundle
from talos.core.x3dh.store import PrekeyStore
from talos.errors import KeyAgreementFailed, SignatureInvalid

__all__ = ["Initiation", "Response", "initiate", "respond"]

_AD_DOMAIN = b"talos/x3dh/ad/v1\x00"
_INFO = b"talos/x3dh/v1"
_SALT = b"\x00" * 32
_PAD = b"\xff" * 32


@dataclass(frozen=True)
class Initiation:
    """The initiator's result: seed for the ratchet plus the header to send."""

    shared_key: bytes = field(repr=False)
    associated_data: bytes
    header: InitialHeader
    #: The responder's signed prekey: the initial ratchet key per spec §3.3.
    their_ratchet_key: bytes


@dataclass(frozen=True)
class Response:
    """The responder's result; ``store`` replaces the store it was computed from."""

    shared_key: bytes = field(repr=False)
    associated_data: bytes
    #: The signed prekey pair, our initial ratchet key pair.
    our_ratchet_key: DHKey
    #: The store with the used one-time prekey removed; commit it with the session.
    store: PrekeyStore
    header: InitialHeader


# -- key agreement --------------------------------------------------------------


def _derive_shared_key(dh1: bytes, dh2: bytes, dh3: bytes, dh4: bytes | None) -> bytes:
    """Spec §2.2/§3.3: ``SK = KDF(F || DH1 || DH2 || DH3 [|| DH4])``."""
    ikm = _PAD + dh1 + dh2 + dh3 + (dh4 or b"")
    return hkdf_sha256(ikm, salt=_SALT, info=_INFO, length=32)


def _associated_data(
    initiator: tuple[str, bytes, bytes], responder: tuple[str, bytes, bytes]
) -> bytes:
    """``SHA-256(domain || lp(id_A) || isk_A || idh_A || lp(id_B) || isk_B || idh_B)``."""
    parts = [_AD_DOMAIN]
    for agent_id, signing, dh in (initiator, responder):
        encoded = agent_id.encode()
        parts += [len(encoded).to_bytes(2, "big"), encoded, signing, dh]
    return sha256(b"".join(parts))


def _initiator_shared_key(
    identity_dh: DHKey,
    ephemeral: DHKey,
    their_identity_dh: bytes,
    their_signed_prekey: bytes,
    their_one_time_prekey: bytes | None,
) -> bytes:
    """Private seam: SK from raw key material, initiator side (for vector/oracle tests).

    Raises:
        KeyAgreementFailed: a peer key is malformed or of low order.
    """
    dh1 = identity_dh.exchange(their_signed_prekey)
    dh2 = ephemeral.exchange(their_identity_dh)
    dh3 = ephemeral.exchange(their_signed_prekey)
    dh4 = None if their_one_time_prekey is None else ephemeral.exchange(their_one_time_prekey)
    return _derive_shared_key(dh1, dh2, dh3, dh4)


def _responder_shared_key(
    identity_dh: DHKey,
    signed_prekey: DHKey,
    one_time_prekey: DHKey | None,
    their_identity_dh: bytes,
    their_ephemeral: bytes,
) -> bytes:
    """Private seam: SK from raw key material, responder side.

    Raises:
        KeyAgreementFailed: a peer key is malformed or of low order.
    """
    dh1 = signed_prekey.exchange(their_identity_dh)
    dh2 = identity_dh.exchange(their_ephemeral)
    dh3 = signed_prekey.exchange(their_ephemeral)
    dh4 = None if one_time_prekey is None else one_time_prekey.exchange(their_ephemeral)
    return _derive_shared_key(dh1, dh2, dh3, dh4)


def initiate(
    bundle: PrekeyBundle,
    *,
    peer_agent_id: str,
    peer_signing_key: bytes,
    peer_identity_dh: bytes,
    agent_id: str,
    identity_signing_key: bytes,
    identity_dh: DHKey,
    rng: Rng,
) -> Initiation:
    """Start a session with the owner of ``bundle`` (spec §3.3).

    ``peer_signing_key`` and ``peer_identity_dh`` are the keys the caller
    verified in the peer's key event log; the bundle must carry exactly those.

    Raises:
        SignatureInvalid: the bundle is not vouched for by the expected keys.
        KeyAgreementFailed: a bundle key is of low order.
        MalformedFrame: our own ``agent_id`` or keys are malformed.
    """
    return _initiate_from_parts(
        bundle,
        peer_agent_id=peer_agent_id,
        peer_signing_key=peer_signing_key,
        peer_identity_dh=peer_identity_dh,
        agent_id=agent_id,
        identity_signing_key=identity_signing_key,
        identity_dh=identity_dh,
        ephemeral=DHKey.generate(rng),
    )


def _initiate_from_parts(
    bundle: PrekeyBundle,
    *,
    peer_agent_id: str,
    peer_signing_key: bytes,
    peer_identity_dh: bytes,
    agent_id: str,
    identity_signing_key: bytes,
    identity_dh: DHKey,
    ephemeral: DHKey,
) -> Initiation:
    """:func:`initiate` with the ephemeral key supplied (deterministic test seam)."""
    if not _names_peer(
        (bundle.agent_id, bundle.identity_signing_key, bundle.identity_dh_key),
        (peer_agent_id, peer_signing_key, peer_identity_dh),
    ):
        raise SignatureInvalid("bundle identity differs from the peer's verified identity")
    bundle.verify()
    header = InitialHeader(
        agent_id,
        identity_signing_key,
        identity_dh.public,
        ephemeral.public,
        bundle.signed_prekey_id,
        bundle.one_time_prekey_id,
    )
    sk = _initiator_shared_key(
        identity_dh, ephemeral, bundle.identity_dh_key, bundle.signed_prekey, bundle.one_time_prekey
    )
    ad = _associated_data(
        (agent_id, identity_signing_key, identity_dh.public),
        (bundle.agent_id, bundle.identity_signing_key, bundle.identity_dh_key),
    )
    return Initiation(sk, ad, header, bundle.signed_prekey)


def _names_peer(claimed: tuple[str, bytes, bytes], verified: tuple[str, bytes, bytes]) -> bool:
    """Whether an identity claimed in a bundle or header is exactly the verified one."""
    same_keys = constant_time_equal(claimed[1], verified[1]) & constant_time_equal(
        claimed[2], verified[2]
    )
    return claimed[0] == verified[0] and same_keys


def respond(
    store: PrekeyStore,
    header: InitialHeader,
    *,
    peer_agent_id: str,
    peer_signing_key: bytes,
    peer_identity_dh: bytes,
) -> Response:
    """Complete the agreement started by ``header`` (spec §3.4).

    ``peer_agent_id`` is the authenticated sender of the envelope that carried
    ``header`` and the two keys are that agent's current keys from its
    verified key event log. The header must name exactly that identity:
    otherwise a peer could re-sign someone else's first message as its own
    and have the session (and every later message) attributed to it (an
    unknown-key-share attack).

    ``store`` is left unchanged; the returned :attr:`Response.store` lacks the
    one-time prekey used, and must replace ``store`` once the first message
    has decrypted (persist both in one transaction).

    Raises:
        KeyAgreementFailed: the header does not name the authenticated sender
            and its verified keys, the signed prekey or one-time prekey is
            unknown or already used, or a header key is of low order.
    """
    if not _names_peer(
        (header.agent_id, header.identity_signing_key, header.identity_dh_key),
        (peer_agent_id, peer_signing_key, peer_identity_dh),
    ):
        raise KeyAgreementFailed("initial header does not name the authenticated sender")
    spk = store.signed_prekey(header.signed_prekey_id)
    opk = None
    new_store = store
    if header.one_time_prekey_id is not None:
        opk = store.one_time_prekey(header.one_time_prekey_id)
        new_store = store.without_one_time_prekey(header.one_time_prekey_id)
    sk = _responder_shared_key(
        store.identity_dh, spk.key, opk, header.identity_dh_key, header.ephemeral_key
    )
    ad = _associated_data(
        (header.agent_id, header.identity_signing_key, header.identity_dh_key),
        (store.agent_id, store.identity_signing_key, store.identity_dh.public),
    )
    return Response(sk, ad, spk.key, new_store, header)
