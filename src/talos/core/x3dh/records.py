"""The public X3DH records: the prekey bundle and the initial header.

Owns their fields, checks and canonical CBOR encodings, and the format rules
every X3DH encoding shares (:data:`FORMAT_VERSION`, the field checks, the
signed prekey message of rule 1 in :mod:`talos.core.x3dh`). Decoding untrusted
bytes raises only :class:`~talos.errors.MalformedFrame` or
:class:`~talos.errors.UnsupportedVersion`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.crypto import KEY_SIZE, SIGNATURE_SIZE, VerifyKey
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.errors import CryptoError, MalformedFrame, SignatureInvalid

__all__ = [
    "FORMAT_VERSION",
    "MAX_ID",
    "InitialHeader",
    "PrekeyBundle",
    "check_agent",
    "check_id",
    "check_key",
    "decode_map",
    "spk_message",
]

#: Version of every X3DH encoding (bundle, header and the private store).
FORMAT_VERSION: Final = 1
#: Largest prekey id (ids are unsigned 32-bit).
MAX_ID: Final = 2**32 - 1

_SPK_DOMAIN = b"talos/x3dh/spk/v1\x00"
_MAX_BUNDLE_SIZE = 1024
_MAX_HEADER_SIZE = 1024

_BUNDLE_FIELDS = frozenset({"v", "id", "isk", "idh", "spk_id", "spk", "spk_sig", "opk_id", "opk"})
_HEADER_FIELDS = frozenset({"v", "id", "isk", "idh", "ek", "spk_id", "opk_id"})

# -- field checks -------------------------------------------------------------


def check_key(name: str, value: object) -> None:
    """Raises: MalformedFrame: ``value`` is not a 32-byte public or private key."""
    if type(value) is not bytes or len(value) != KEY_SIZE:
        raise MalformedFrame(f"{name} must be {KEY_SIZE} bytes")


def check_id(name: str, value: object) -> None:
    """Raises: MalformedFrame: ``value`` is not a prekey id in ``0..MAX_ID``."""
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise MalformedFrame(f"{name} must be an integer in [0, 2**32)")


def check_agent(value: object) -> None:
    """Raises: MalformedFrame: ``value`` is not a well-formed agent id."""
    if type(value) is not str:
        raise MalformedFrame("agent id must be a string")
    check_agent_id(value)


def decode_map(data: bytes, *, max_size: int, fields: frozenset[str], what: str) -> dict[str, Any]:
    """Decode a versioned CBOR map with exactly ``fields`` (see strict_versioned_map)."""
    return strict_versioned_map(
        data, max_size=max_size, fields=fields, version=FORMAT_VERSION, what=what
    )


def spk_message(identity_dh: bytes, prekey_id: int, prekey: bytes) -> bytes:
    """The bytes a signed prekey signature covers (rule 1 of :mod:`talos.core.x3dh`)."""
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
        check_agent(self.agent_id)
        check_key("identity signing key", self.identity_signing_key)
        check_key("identity DH key", self.identity_dh_key)
        check_id("signed prekey id", self.signed_prekey_id)
        check_key("signed prekey", self.signed_prekey)
        sig = self.signed_prekey_signature
        if type(sig) is not bytes or len(sig) != SIGNATURE_SIZE:
            raise MalformedFrame(f"signed prekey signature must be {SIGNATURE_SIZE} bytes")
        if (self.one_time_prekey_id is None) != (self.one_time_prekey is None):
            raise MalformedFrame("one-time prekey id and key come together or not at all")
        if self.one_time_prekey_id is not None:
            check_id("one-time prekey id", self.one_time_prekey_id)
            check_key("one-time prekey", self.one_time_prekey)

    def verify(self) -> None:
        """Check the signed prekey signature under the bundle's signing key.

        Raises:
            SignatureInvalid: the signature does not verify.
        """
        message = spk_message(self.identity_dh_key, self.signed_prekey_id, self.signed_prekey)
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
        value = decode_map(data, max_size=_MAX_BUNDLE_SIZE, fields=_BUNDLE_FIELDS, what="bundle")
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
        check_agent(self.agent_id)
        check_key("identity signing key", self.identity_signing_key)
        check_key("identity DH key", self.identity_dh_key)
        check_key("ephemeral key", self.ephemeral_key)
        check_id("signed prekey id", self.signed_prekey_id)
        if self.one_time_prekey_id is not None:
            check_id("one-time prekey id", self.one_time_prekey_id)

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
        v = decode_map(data, max_size=_MAX_HEADER_SIZE, fields=_HEADER_FIELDS, what="header")
        return cls(v["id"], v["isk"], v["idh"], v["ek"], v["spk_id"], v["opk_id"])
