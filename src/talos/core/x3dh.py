"""X3DH key agreement (Signal's "Extended Triple Diffie-Hellman", revision 1).

An agent publishes a :class:`PrekeyBundle`; a peer who wants to talk calls
:func:`initiate` on it and sends the resulting :class:`InitialHeader` with its
first ratchet message; the agent calls :func:`respond` with its private
:class:`PrekeyStore`. Both ends obtain the same 32-byte shared key ``SK`` and
the same associated data ``AD``, which seed :mod:`talos.core.ratchet`.

Rules:

1. An identity has two keys: Ed25519 for signatures and a separate X25519 key
   for DH (no XEdDSA). The signed prekey signature covers the identity DH key,
   the prekey id and the prekey, under a domain-separation prefix, so the DH
   identity key is vouched for by the signing key (spec §3.2).
2. ``SK = HKDF-SHA256(salt = 32 zero bytes, ikm = 0xFF*32 || DH1 || DH2 || DH3
   [|| DH4], info = "talos/x3dh/v1", 32 bytes)`` (spec §2.2, §3.3).
3. ``AD`` is a fixed-length SHA-256 over both agent ids and both identity key
   pairs, initiator first, each id length-prefixed (spec §3.3 leaves the
   encoding to the application).
4. A one-time prekey is used once: :func:`respond` returns a *new* store
   without it and leaves the given one untouched, so the caller can decrypt
   the first message and persist the new store in one transaction
   (clone-then-commit, persist-then-release). Responding twice from the
   committed store raises :class:`~talos.errors.KeyAgreementFailed`.
5. Decoding untrusted bytes raises only ``MalformedFrame`` or
   ``UnsupportedVersion``.

The initial message carries no signature of its own (as in the spec): the
responder must check that the header's agent id and identity keys are those of
a verified key event log, which the envelope layer does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.crypto import (
    KEY_SIZE,
    SIGNATURE_SIZE,
    DHKey,
    SigningKey,
    VerifyKey,
    constant_time_equal,
    hkdf_sha256,
    sha256,
)
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.rng import Rng
from talos.errors import (
    CryptoError,
    KeyAgreementFailed,
    MalformedFrame,
    SignatureInvalid,
)

__all__ = [
    "FORMAT_VERSION",
    "InitialHeader",
    "Initiation",
    "PrekeyBundle",
    "PrekeyStore",
    "Response",
    "SignedPrekey",
    "initiate",
    "respond",
]

#: Version of every encoding in this module (bundle, header, store).
FORMAT_VERSION: Final = 1
#: How many signed prekeys a store keeps (the current one and its predecessor).
SIGNED_PREKEYS_KEPT: Final = 2
#: Upper bound on one-time prekeys held by one store.
MAX_ONE_TIME_PREKEYS: Final = 10_000

_SPK_DOMAIN = b"talos/x3dh/spk/v1\x00"
_AD_DOMAIN = b"talos/x3dh/ad/v1\x00"
_INFO = b"talos/x3dh/v1"
_SALT = b"\x00" * 32
_PAD = b"\xff" * 32
_MAX_ID = 2**32 - 1
_MAX_BUNDLE_SIZE = 1024
_MAX_HEADER_SIZE = 1024
_MAX_STORE_SIZE = 1 << 20

_BUNDLE_FIELDS = frozenset({"v", "id", "isk", "idh", "spk_id", "spk", "spk_sig", "opk_id", "opk"})
_HEADER_FIELDS = frozenset({"v", "id", "isk", "idh", "ek", "spk_id", "opk_id"})
_STORE_FIELDS = frozenset({"v", "id", "isk", "idh", "spks", "opks", "next_opk"})


# -- field checks -------------------------------------------------------------


def _check_key(name: str, value: object) -> None:
    if type(value) is not bytes or len(value) != KEY_SIZE:
        raise MalformedFrame(f"{name} must be {KEY_SIZE} bytes")


def _check_id(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= _MAX_ID:
        raise MalformedFrame(f"{name} must be an integer in [0, 2**32)")


def _check_agent(value: object) -> None:
    if type(value) is not str:
        raise MalformedFrame("agent id must be a string")
    check_agent_id(value)


def _decode_map(data: bytes, *, max_size: int, fields: frozenset[str], what: str) -> dict[str, Any]:
    """Decode a versioned CBOR map with exactly ``fields`` (see strict_versioned_map)."""
    return strict_versioned_map(
        data, max_size=max_size, fields=fields, version=FORMAT_VERSION, what=what
    )


def _spk_message(identity_dh: bytes, prekey_id: int, prekey: bytes) -> bytes:
    return _SPK_DOMAIN + identity_dh + prekey_id.to_bytes(4, "big") + prekey


# -- public records -------------------------------------------------------------


@dataclass(frozen=True)
class PrekeyBundle:
    """What an agent publishes so that others can start sessions with it offline.

    Raises (on construction):
        MalformedFrame: a field has the wrong type, size or range.
    """

    agent_id: str
    identity_signing_key: bytes
    identity_dh_key: bytes
    signed_prekey_id: int
    signed_prekey: bytes
    signed_prekey_signature: bytes
    one_time_prekey_id: int | None = None
    one_time_prekey: bytes | None = None

    def __post_init__(self) -> None:
        _check_agent(self.agent_id)
        _check_key("identity signing key", self.identity_signing_key)
        _check_key("identity DH key", self.identity_dh_key)
        _check_id("signed prekey id", self.signed_prekey_id)
        _check_key("signed prekey", self.signed_prekey)
        sig = self.signed_prekey_signature
        if type(sig) is not bytes or len(sig) != SIGNATURE_SIZE:
            raise MalformedFrame(f"signed prekey signature must be {SIGNATURE_SIZE} bytes")
        if (self.one_time_prekey_id is None) != (self.one_time_prekey is None):
            raise MalformedFrame("one-time prekey id and key come together or not at all")
        if self.one_time_prekey_id is not None:
            _check_id("one-time prekey id", self.one_time_prekey_id)
            _check_key("one-time prekey", self.one_time_prekey)

    def verify(self) -> None:
        """Check the signed prekey signature under the bundle's signing key.

        Raises:
            SignatureInvalid: the signature does not verify.
        """
        message = _spk_message(self.identity_dh_key, self.signed_prekey_id, self.signed_prekey)
        try:
            key = VerifyKey(self.identity_signing_key)
        except (CryptoError, ValueError):
            raise SignatureInvalid("bundle signing key is not a valid Ed25519 key") from None
        key.verify(self.signed_prekey_signature, message)

    def to_dict(self) -> dict[str, Any]:
        """The CBOR data model of this bundle (with its format version)."""
        return {
            "v": FORMAT_VERSION,
            "id": self.agent_id,
            "isk": self.identity_signing_key,
            "idh": self.identity_dh_key,
            "spk_id": self.signed_prekey_id,
            "spk": self.signed_prekey,
            "spk_sig": self.signed_prekey_signature,
            "opk_id": self.one_time_prekey_id,
            "opk": self.one_time_prekey,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> PrekeyBundle:
        """Inverse of :meth:`to_dict` (the caller checked version and fields).

        Raises:
            MalformedFrame: a field is invalid.
        """
        return cls(
            agent_id=value["id"],
            identity_signing_key=value["isk"],
            identity_dh_key=value["idh"],
            signed_prekey_id=value["spk_id"],
            signed_prekey=value["spk"],
            signed_prekey_signature=value["spk_sig"],
            one_time_prekey_id=value["opk_id"],
            one_time_prekey=value["opk"],
        )

    def to_bytes(self) -> bytes:
        """Canonical CBOR encoding."""
        return canonical_dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> PrekeyBundle:
        """Decode an untrusted bundle (the signature is *not* checked here).

        Raises:
            MalformedFrame: the bytes are not a well-formed bundle.
            UnsupportedVersion: the bundle uses an unknown format version.
        """
        value = _decode_map(data, max_size=_MAX_BUNDLE_SIZE, fields=_BUNDLE_FIELDS, what="bundle")
        return cls.from_dict(value)


@dataclass(frozen=True)
class InitialHeader:
    """What the initiator sends with its first message so the responder can derive SK.

    Raises (on construction):
        MalformedFrame: a field has the wrong type, size or range.
    """

    agent_id: str
    identity_signing_key: bytes
    identity_dh_key: bytes
    ephemeral_key: bytes
    signed_prekey_id: int
    one_time_prekey_id: int | None

    def __post_init__(self) -> None:
        _check_agent(self.agent_id)
        _check_key("identity signing key", self.identity_signing_key)
        _check_key("identity DH key", self.identity_dh_key)
        _check_key("ephemeral key", self.ephemeral_key)
        _check_id("signed prekey id", self.signed_prekey_id)
        if self.one_time_prekey_id is not None:
            _check_id("one-time prekey id", self.one_time_prekey_id)

    def to_dict(self) -> dict[str, Any]:
        """The CBOR data model of this header (with its format version)."""
        return {
            "v": FORMAT_VERSION,
            "id": self.agent_id,
            "isk": self.identity_signing_key,
            "idh": self.identity_dh_key,
            "ek": self.ephemeral_key,
            "spk_id": self.signed_prekey_id,
            "opk_id": self.one_time_prekey_id,
        }

    def to_bytes(self) -> bytes:
        """Canonical CBOR encoding."""
        return canonical_dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> InitialHeader:
        """Decode an untrusted initial header.

        Raises:
            MalformedFrame: the bytes are not a well-formed header.
            UnsupportedVersion: the header uses an unknown format version.
        """
        v = _decode_map(data, max_size=_MAX_HEADER_SIZE, fields=_HEADER_FIELDS, what="header")
        return cls(v["id"], v["isk"], v["idh"], v["ek"], v["spk_id"], v["opk_id"])


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


# -- private store --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SignedPrekey:
    """A signed prekey pair and the signature published with it."""

    prekey_id: int
    key: DHKey
    signature: bytes


@dataclass(frozen=True, eq=False)
class PrekeyStore:
    """An agent's private X3DH material. Immutable: every change returns a new store.

    Keep it encrypted at rest; its ``repr`` shows no secrets.
    """

    agent_id: str
    identity_signing_key: bytes
    identity_dh: DHKey
    #: Oldest first; the last one is current and goes into bundles.
    signed_prekeys: tuple[SignedPrekey, ...]
    one_time_prekeys: Mapping[int, DHKey]
    next_one_time_prekey_id: int = 0

    @classmethod
    def create(
        cls, *, agent_id: str, signing_key: SigningKey, identity_dh: DHKey, rng: Rng
    ) -> PrekeyStore:
        """A store with one fresh signed prekey (id 0) and no one-time prekeys.

        Raises:
            MalformedFrame: ``agent_id`` is not a well-formed agent id.
        """
        _check_agent(agent_id)
        empty = cls(agent_id, signing_key.public_key.raw, identity_dh, (), MappingProxyType({}))
        return empty.rotate_signed_prekey(signing_key, rng)

    @property
    def current_signed_prekey(self) -> SignedPrekey:
        """The signed prekey that goes into bundles."""
        return self.signed_prekeys[-1]

    def rotate_signed_prekey(self, signing_key: SigningKey, rng: Rng) -> PrekeyStore:
        """Add a new signed prekey, keeping the previous one for in-flight initiations.

        The store adopts ``signing_key``'s public key, so after a key-log rotation
        this re-signs the bundle with the new key.
        """
        new_id = self.signed_prekeys[-1].prekey_id + 1 if self.signed_prekeys else 0
        key = DHKey.generate(rng)
        signature = signing_key.sign(_spk_message(self.identity_dh.public, new_id, key.public))
        kept = (*self.signed_prekeys, SignedPrekey(new_id, key, signature))[-SIGNED_PREKEYS_KEPT:]
        return replace(self, identity_signing_key=signing_key.public_key.raw, signed_prekeys=kept)

    def add_one_time_prekeys(self, count: int, rng: Rng) -> PrekeyStore:
        """Generate ``count`` one-time prekeys with fresh, increasing ids.

        Raises:
            KeyAgreementFailed: the store would exceed :data:`MAX_ONE_TIME_PREKEYS`
                or run out of 32-bit ids.
        """
        first = self.next_one_time_prekey_id
        if count < 0 or len(self.one_time_prekeys) + count > MAX_ONE_TIME_PREKEYS:
            raise KeyAgreementFailed("too many one-time prekeys")
        if first + count > _MAX_ID + 1:
            raise KeyAgreementFailed("one-time prekey ids exhausted; create a new store")
        added = {first + i: DHKey.generate(rng) for i in range(count)}
        keys = MappingProxyType({**self.one_time_prekeys, **added})
        return replace(self, one_time_prekeys=keys, next_one_time_prekey_id=first + count)

    def one_time_prekey_publics(self) -> dict[int, bytes]:
        """Public halves of the unused one-time prekeys, by id (for the registry)."""
        return {pid: key.public for pid, key in sorted(self.one_time_prekeys.items())}

    def bundle(self, one_time_prekey_id: int | None = None) -> PrekeyBundle:
        """The public bundle with the current signed prekey and optionally one OPK.

        Raises:
            KeyAgreementFailed: ``one_time_prekey_id`` is not in the store.
        """
        spk = self.current_signed_prekey
        opk = None
        if one_time_prekey_id is not None:
            opk = self._one_time_prekey(one_time_prekey_id).public
        return PrekeyBundle(
            self.agent_id,
            self.identity_signing_key,
            self.identity_dh.public,
            spk.prekey_id,
            spk.key.public,
            spk.signature,
            one_time_prekey_id,
            opk,
        )

    def signed_prekey(self, prekey_id: int) -> SignedPrekey:
        """The kept signed prekey with this id.

        Raises:
            KeyAgreementFailed: no such signed prekey (never existed or rotated out).
        """
        for spk in self.signed_prekeys:
            if spk.prekey_id == prekey_id:
                return spk
        raise KeyAgreementFailed("the signed prekey is not available")

    def without_one_time_prekey(self, prekey_id: int) -> PrekeyStore:
        """This store minus one one-time prekey.

        Raises:
            KeyAgreementFailed: the prekey was already used or never existed.
        """
        self._one_time_prekey(prekey_id)
        keys = {k: v for k, v in self.one_time_prekeys.items() if k != prekey_id}
        return replace(self, one_time_prekeys=MappingProxyType(keys))

    def _one_time_prekey(self, prekey_id: int) -> DHKey:
        key = self.one_time_prekeys.get(prekey_id)
        if key is None:
            raise KeyAgreementFailed("the one-time prekey was already used or never existed")
        return key

    def to_bytes(self) -> bytes:
        """Versioned canonical CBOR holding every secret. Encrypt before storing."""
        return canonical_dumps(
            {
                "v": FORMAT_VERSION,
                "id": self.agent_id,
                "isk": self.identity_signing_key,
                "idh": self.identity_dh.private_bytes(),
                "spks": [
                    [s.prekey_id, s.key.private_bytes(), s.signature] for s in self.signed_prekeys
                ],
                "opks": [
                    [pid, k.private_bytes()] for pid, k in sorted(self.one_time_prekeys.items())
                ],
                "next_opk": self.next_one_time_prekey_id,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PrekeyStore:
        """Load a store written by :meth:`to_bytes`.

        Raises:
            MalformedFrame: the bytes are not a well-formed store.
            UnsupportedVersion: the store uses an unknown format version.
        """
        v = _decode_map(data, max_size=_MAX_STORE_SIZE, fields=_STORE_FIELDS, what="prekey store")
        _check_agent(v["id"])
        _check_key("identity signing key", v["isk"])
        _check_key("identity DH key", v["idh"])
        next_opk = v["next_opk"]
        if type(next_opk) is not int or not 0 <= next_opk <= _MAX_ID + 1:
            raise MalformedFrame("next one-time prekey id out of range")
        spks = tuple(_decode_spk(item) for item in _list(v["spks"], SIGNED_PREKEYS_KEPT))
        if not spks:
            raise MalformedFrame("prekey store has no signed prekey")
        opks = dict(_decode_opk(item) for item in _list(v["opks"], MAX_ONE_TIME_PREKEYS))
        if len(opks) != len(v["opks"]):
            raise MalformedFrame("duplicate one-time prekey id")
        return cls(v["id"], v["isk"], DHKey(v["idh"]), spks, MappingProxyType(opks), v["next_opk"])

    def __repr__(self) -> str:
        return (
            f"PrekeyStore(agent_id={self.agent_id!r}, signed_prekeys="
            f"{[s.prekey_id for s in self.signed_prekeys]}, "
            f"one_time_prekeys={len(self.one_time_prekeys)})"
        )


def _list(value: object, limit: int) -> list[Any]:
    if type(value) is not list or len(value) > limit:
        raise MalformedFrame(f"expected a list of at most {limit} items")
    return value


def _decode_spk(item: object) -> SignedPrekey:
    if type(item) is not list or len(item) != 3:
        raise MalformedFrame("signed prekey entry must be [id, key, signature]")
    prekey_id, key, signature = item
    _check_id("signed prekey id", prekey_id)
    _check_key("signed prekey", key)
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        raise MalformedFrame("signed prekey signature must be 64 bytes")
    return SignedPrekey(prekey_id, DHKey(key), signature)


def _decode_opk(item: object) -> tuple[int, DHKey]:
    if type(item) is not list or len(item) != 2:
        raise MalformedFrame("one-time prekey entry must be [id, key]")
    prekey_id, key = item
    _check_id("one-time prekey id", prekey_id)
    _check_key("one-time prekey", key)
    return prekey_id, DHKey(key)


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
        opk = store._one_time_prekey(header.one_time_prekey_id)
        new_store = store.without_one_time_prekey(header.one_time_prekey_id)
    sk = _responder_shared_key(
        store.identity_dh, spk.key, opk, header.identity_dh_key, header.ephemeral_key
    )
    ad = _associated_data(
        (header.agent_id, header.identity_signing_key, header.identity_dh_key),
        (store.agent_id, store.identity_signing_key, store.identity_dh.public),
    )
    return Response(sk, ad, spk.key, new_store, header)
