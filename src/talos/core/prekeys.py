"""Signed prekey publications: what an agent uploads so the registry can hand out bundles.

A :class:`PrekeyUpload` carries the agent's current signed prekey (id, public
key and the X3DH signature over the identity DH key, as in
:class:`~talos.core.x3dh.PrekeyBundle`) and a pool of one-time prekey public
keys. Rules:

1. The upload is signed by the agent's key at ``key_sequence`` in its
   verified key event log, over :data:`DOMAIN_PREFIX` followed by the
   canonical CBOR of every field but the signature. A store accepts it only
   when ``key_sequence`` names the agent's *current* key.
2. ``sequence`` grows with every upload of the agent; a store keeps the
   highest it has accepted and refuses anything not higher, so an old pool
   cannot be replayed over a newer one (its one-time prekeys may already have
   been used).
3. At most :data:`MAX_UPLOAD_PREKEYS` one-time prekeys, listed by strictly
   increasing id, so one upload has exactly one encoding and a bounded size.
4. The signed prekey signature is *not* checked by :meth:`PrekeyUpload.verify`
   (it needs the identity DH key from the key log): :meth:`PrekeyUpload.bundle`
   builds the bundle from a verified :class:`~talos.core.keylog.KeyState`, and
   ``bundle.verify()`` checks it.

Decoding untrusted bytes raises only :class:`~talos.errors.MalformedFrame` or
:class:`~talos.errors.UnsupportedVersion`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.crypto import KEY_SIZE, SIGNATURE_SIZE, SigningKey
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.keylog import KeyLookup, KeyState, resolve_key
from talos.core.x3dh import PrekeyBundle, PrekeyStore
from talos.errors import LocalProtocolError, MalformedFrame, SignatureInvalid

__all__ = [
    "DOMAIN_PREFIX",
    "MAX_UPLOAD_PREKEYS",
    "MAX_UPLOAD_SIZE",
    "UPLOAD_VERSION",
    "PrekeyUpload",
]

UPLOAD_VERSION: Final = 1
#: Domain separation: an upload signature can never pass for any other signed object.
DOMAIN_PREFIX: Final = b"talos/prekey-upload/v1\x00"
#: Bound on the one-time prekeys of one upload (and so on the registry's pool).
MAX_UPLOAD_PREKEYS: Final = 200
#: Bound on an encoded upload: 200 prekeys take about 8 KiB.
MAX_UPLOAD_SIZE: Final = 16 * 1024
_MAX_ID: Final = 2**32 - 1
_MAX_U64: Final = 2**64 - 1
_FIELDS: Final = frozenset({"v", "id", "ks", "seq", "spk_id", "spk", "spk_sig", "opks", "sig"})


@dataclass(frozen=True, slots=True)
class PrekeyUpload:
    """One signed publication of an agent's signed prekey and one-time prekey pool."""

    agent_id: str
    key_sequence: int
    sequence: int
    signed_prekey_id: int
    signed_prekey: bytes
    signed_prekey_signature: bytes
    #: (id, public key) pairs, strictly increasing by id.
    one_time_prekeys: tuple[tuple[int, bytes], ...]
    signature: bytes = b""

    @classmethod
    def create(
        cls,
        signing_key: SigningKey,
        *,
        agent_id: str,
        key_sequence: int,
        sequence: int,
        signed_prekey_id: int,
        signed_prekey: bytes,
        signed_prekey_signature: bytes,
        one_time_prekeys: Iterable[tuple[int, bytes]] = (),
    ) -> PrekeyUpload:
        """Build and sign an upload (one-time prekeys are sorted by id).

        Raises:
            LocalProtocolError: a field is out of range, an id repeats, or
                there are more than :data:`MAX_UPLOAD_PREKEYS` one-time prekeys.
        """
        upload = cls(
            agent_id,
            key_sequence,
            sequence,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_signature,
            tuple(sorted(one_time_prekeys)),
        )
        try:
            _check(upload.body() | {"sig": bytes(SIGNATURE_SIZE)})
        except MalformedFrame as exc:
            raise LocalProtocolError(f"invalid prekey upload: {exc}") from exc
        return replace(upload, signature=signing_key.sign(upload.signed_bytes()))

    @classmethod
    def from_store(
        cls,
        store: PrekeyStore,
        signing_key: SigningKey,
        *,
        key_sequence: int,
        sequence: int,
        limit: int = MAX_UPLOAD_PREKEYS,
    ) -> PrekeyUpload:
        """Publish ``store``'s current signed prekey and up to ``limit`` unused one-time prekeys.

        The lowest ids go first, so the registry hands out the oldest keys
        first. ``signing_key`` must be the key at ``key_sequence``, the agent's
        current one.

        Raises:
            LocalProtocolError: ``limit`` is outside 0..MAX_UPLOAD_PREKEYS or a
                field is out of range.
        """
        if not 0 <= limit <= MAX_UPLOAD_PREKEYS:
            raise LocalProtocolError(f"limit must be in 0..{MAX_UPLOAD_PREKEYS}")
        spk = store.current_signed_prekey
        opks = list(store.one_time_prekey_publics().items())[:limit]
        return cls.create(
            signing_key,
            agent_id=store.agent_id,
            key_sequence=key_sequence,
            sequence=sequence,
            signed_prekey_id=spk.prekey_id,
            signed_prekey=spk.key.public,
            signed_prekey_signature=spk.signature,
            one_time_prekeys=opks,
        )

    # -- encoding -------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        """The signed fields as a CBOR map (everything but the signature)."""
        return {
            "v": UPLOAD_VERSION,
            "id": self.agent_id,
            "ks": self.key_sequence,
            "seq": self.sequence,
            "spk_id": self.signed_prekey_id,
            "spk": self.signed_prekey,
            "spk_sig": self.signed_prekey_signature,
            "opks": [[pid, key] for pid, key in self.one_time_prekeys],
        }

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        return DOMAIN_PREFIX + canonical_dumps(self.body())

    def to_bytes(self) -> bytes:
        """Versioned canonical CBOR, for the network and for storage."""
        return canonical_dumps({**self.body(), "sig": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> PrekeyUpload:
        """Decode an upload from untrusted bytes (structure only; see :meth:`verify`).

        Raises:
            MalformedFrame: too large, not canonical CBOR, wrong fields, types
                or ranges, too many one-time prekeys, ids not strictly increasing.
            UnsupportedVersion: an upload format this build does not know.
        """
        raw = strict_versioned_map(
            data,
            max_size=MAX_UPLOAD_SIZE,
            fields=_FIELDS,
            version=UPLOAD_VERSION,
            what="prekey upload",
        )
        opks = _check(raw)
        return cls(
            raw["id"],
            raw["ks"],
            raw["seq"],
            raw["spk_id"],
            raw["spk"],
            raw["spk_sig"],
            opks,
            raw["sig"],
        )

    # -- verification -----------------------------------------------------------------

    def verify(self, keys: KeyLookup) -> None:
        """Check the agent's signature at ``key_sequence``.

        Whether that key is the agent's *current* one is the store's policy
        (rule 1); this only checks the signature.

        Raises:
            SignatureInvalid: no verified key at ``key_sequence``, or the
                signature does not verify.
        """
        key = resolve_key(keys, self.agent_id, self.key_sequence)
        try:
            key.verify(self.signature, self.signed_bytes())
        except SignatureInvalid:
            raise SignatureInvalid(
                f"prekey upload of {self.agent_id} is not signed by it"
            ) from None

    def bundle(
        self, state: KeyState, one_time_prekey: tuple[int, bytes] | None = None
    ) -> PrekeyBundle:
        """The X3DH bundle this upload publishes, with the identity keys of ``state``.

        ``state`` is the agent's verified key state (its signing and DH keys
        go into the bundle); call ``.verify()`` on the result to check the
        signed prekey signature against them.

        Raises:
            LocalProtocolError: ``state`` is another agent's.
        """
        if state.agent_id != self.agent_id:
            raise LocalProtocolError("key state and prekey upload name different agents")
        opk_id, opk = one_time_prekey if one_time_prekey is not None else (None, None)
        return PrekeyBundle(
            self.agent_id,
            state.signing_key.raw,
            state.dh_key,
            self.signed_prekey_id,
            self.signed_prekey,
            self.signed_prekey_signature,
            opk_id,
            opk,
        )


def _check(raw: dict[str, Any]) -> tuple[tuple[int, bytes], ...]:
    """Check every field of a decoded (or about to be encoded) upload; return the OPK pairs."""
    if type(raw["id"]) is not str:
        raise MalformedFrame("prekey upload agent id must be text")
    check_agent_id(raw["id"])
    for name, maximum in (("ks", _MAX_ID), ("seq", _MAX_U64), ("spk_id", _MAX_ID)):
        value = raw[name]
        if type(value) is not int or not 0 <= value <= maximum:
            raise MalformedFrame(f"prekey upload field {name!r} must be an integer in 0..{maximum}")
    _check_bytes("signed prekey", raw["spk"], KEY_SIZE)
    _check_bytes("signed prekey signature", raw["spk_sig"], SIGNATURE_SIZE)
    _check_bytes("signature", raw["sig"], SIGNATURE_SIZE)
    items = raw["opks"]
    if type(items) is not list or len(items) > MAX_UPLOAD_PREKEYS:
        raise MalformedFrame(f"one-time prekeys must be a list of at most {MAX_UPLOAD_PREKEYS}")
    pairs = tuple(_opk(item) for item in items)
    if any(a[0] >= b[0] for a, b in zip(pairs, pairs[1:], strict=False)):
        raise MalformedFrame("one-time prekey ids must be strictly increasing")
    return pairs


def _opk(item: Any) -> tuple[int, bytes]:
    if type(item) not in (list, tuple) or len(item) != 2:
        raise MalformedFrame("one-time prekey entry must be [id, key]")
    prekey_id, key = item
    if type(prekey_id) is not int or not 0 <= prekey_id <= _MAX_ID:
        raise MalformedFrame("one-time prekey id must be an integer in [0, 2**32)")
    _check_bytes("one-time prekey", key, KEY_SIZE)
    return prekey_id, key


def _check_bytes(name: str, value: Any, size: int) -> None:
    if type(value) is not bytes or len(value) != size:
        raise MalformedFrame(f"prekey upload {name} must be {size} bytes")
