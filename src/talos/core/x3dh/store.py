"""The prekey store: an agent's private X3DH material and its encoding at rest.

Owns the signed prekeys (the current one and its predecessor), the one-time
prekeys and their ids, and the bundles built from them. The store is
immutable: every change, including using up a one-time prekey, returns a new
store, so callers commit it together with whatever depended on it (rule 4 of
:mod:`talos.core.x3dh`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Final

from talos.core.crypto import SIGNATURE_SIZE, DHKey, SigningKey
from talos.core.encoding import canonical_dumps
from talos.core.rng import Rng
from talos.core.x3dh.records import (
    FORMAT_VERSION,
    MAX_ID,
    PrekeyBundle,
    check_agent,
    check_id,
    check_key,
    decode_map,
    spk_message,
)
from talos.errors import KeyAgreementFailed, MalformedFrame

__all__ = ["MAX_ONE_TIME_PREKEYS", "SIGNED_PREKEYS_KEPT", "PrekeyStore", "SignedPrekey"]

#: How many signed prekeys a store keeps (the current one and its predecessor).
SIGNED_PREKEYS_KEPT: Final = 2
#: Upper bound on one-time prekeys held by one store.
MAX_ONE_TIME_PREKEYS: Final = 10_000

_MAX_STORE_SIZE = 1 << 20
_STORE_FIELDS = frozenset({"v", "id", "isk", "idh", "spks", "opks", "next_opk"})


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
        check_agent(agent_id)
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
        signature = signing_key.sign(spk_message(self.identity_dh.public, new_id, key.public))
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
        if first + count > MAX_ID + 1:
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
            opk = self.one_time_prekey(one_time_prekey_id).public
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
        self.one_time_prekey(prekey_id)
        keys = {k: v for k, v in self.one_time_prekeys.items() if k != prekey_id}
        return replace(self, one_time_prekeys=MappingProxyType(keys))

    def one_time_prekey(self, prekey_id: int) -> DHKey:
        """The unused one-time prekey pair with this id.

        Raises:
            KeyAgreementFailed: the prekey was already used or never existed.
        """
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
        v = decode_map(data, max_size=_MAX_STORE_SIZE, fields=_STORE_FIELDS, what="prekey store")
        check_agent(v["id"])
        check_key("identity signing key", v["isk"])
        check_key("identity DH key", v["idh"])
        next_opk = v["next_opk"]
        if type(next_opk) is not int or not 0 <= next_opk <= MAX_ID + 1:
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
    check_id("signed prekey id", prekey_id)
    check_key("signed prekey", key)
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        raise MalformedFrame("signed prekey signature must be 64 bytes")
    return SignedPrekey(prekey_id, DHKey(key), signature)


def _decode_opk(item: object) -> tuple[int, DHKey]:
    if type(item) is not list or len(item) != 2:
        raise MalformedFrame("one-time prekey entry must be [id, key]")
    prekey_id, key = item
    check_id("one-time prekey id", prekey_id)
    check_key("one-time prekey", key)
    return prekey_id, DHKey(key)
