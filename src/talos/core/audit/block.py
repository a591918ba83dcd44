"""Audit blocks: the signed, hash-chained seals over ranges of the log.

Owns the block format. A :class:`Block` seals a range of entries: height,
hash of the previous block (:data:`GENESIS_HASH` for height 0), first and
last sequence number, tree size (always ``last + 1``), Merkle root at that
size, time, and an Ed25519 signature by the agent key over a domain-separated
body (``"talos/audit/block/v1\\0" || canonical CBOR``). Blocks are chained by
:meth:`Block.block_hash`, so removing or rewriting one breaks the next.
Decoding refuses malformed input with :class:`~talos.errors.MalformedFrame` or
:class:`~talos.errors.UnsupportedVersion`; :meth:`Block.verify_signature`
raises :class:`~talos.errors.SignatureInvalid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from talos.core.audit.merkle import HASH_SIZE
from talos.core.crypto import KEY_SIZE, SIGNATURE_SIZE, SigningKey, VerifyKey, sha256
from talos.core.encoding import canonical_dumps, strict_loads
from talos.errors import CryptoError, MalformedFrame, SignatureInvalid, UnsupportedVersion

__all__ = ["BLOCK_VERSION", "GENESIS_HASH", "Block"]

BLOCK_VERSION: Final = 1

#: ``previous`` of the block at height 0.
GENESIS_HASH: Final = bytes(HASH_SIZE)

_BLOCK_DOMAIN = b"talos/audit/block/v1\x00"
_BLOCK_HASH_DOMAIN = b"talos/audit/block-hash/v1\x00"
_MAX_BLOCK_SIZE = 1024
_MAX_U64 = 2**64 - 1
_BLOCK_FIELDS = frozenset({"v", "h", "p", "f", "l", "n", "r", "t", "k", "sig"})


def _uint(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_U64:
        raise MalformedFrame(f"{name} must be a uint64")
    return int(value)


def _fixed(value: Any, name: str, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise MalformedFrame(f"{name} must be {size} bytes")
    return bytes(value)


@dataclass(frozen=True, slots=True)
class Block:
    """A sealed range ``[first_seq, last_seq]`` of the log, chained and signed."""

    height: int
    previous: bytes
    first_seq: int
    last_seq: int
    tree_size: int
    root: bytes
    time_ms: int
    public_key: bytes | None = None
    signature: bytes | None = None

    def body(self) -> dict[str, Any]:
        """Every field but the signature, as the CBOR map that is signed."""
        return {
            "v": BLOCK_VERSION,
            "h": self.height,
            "p": self.previous,
            "f": self.first_seq,
            "l": self.last_seq,
            "n": self.tree_size,
            "r": self.root,
            "t": self.time_ms,
            "k": self.public_key,
        }

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers (domain-separated)."""
        return _BLOCK_DOMAIN + canonical_dumps(self.body())

    def to_bytes(self) -> bytes:
        """Canonical CBOR of the whole block, signature included."""
        return canonical_dumps({**self.body(), "sig": self.signature})

    def block_hash(self) -> bytes:
        """What the next block's ``previous`` names: SHA-256 of the encoded block."""
        return sha256(_BLOCK_HASH_DOMAIN + self.to_bytes())

    def signed_by(self, key: SigningKey) -> Block:
        """A copy naming ``key`` and carrying its signature."""
        named = _replace(self, public_key=key.public_key.raw, signature=None)
        return _replace(named, signature=key.sign(named.signed_bytes()))

    def verify_signature(self, key: VerifyKey | None = None) -> None:
        """Check the signature, against ``key`` if given, else the key the block names.

        Raises:
            SignatureInvalid: unsigned, signed by another key than ``key``, or
                the signature does not verify.
        """
        if self.signature is None or self.public_key is None:
            raise SignatureInvalid(f"block {self.height} is not signed")
        if key is not None and key.raw != self.public_key:
            raise SignatureInvalid(f"block {self.height} is signed by another key")
        try:
            signer = key or VerifyKey(self.public_key)
        except CryptoError:
            raise SignatureInvalid(f"block {self.height} names a malformed key") from None
        signer.verify(self.signature, self.signed_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> Block:
        """Decode a block from untrusted bytes (its signature is *not* checked here).

        Raises:
            MalformedFrame: not a well-formed block.
            UnsupportedVersion: a block version this build does not know.
        """
        raw = strict_loads(data, max_size=_MAX_BLOCK_SIZE)
        if not isinstance(raw, dict) or set(raw) != _BLOCK_FIELDS:
            raise MalformedFrame("block must be a map with exactly the block fields")
        if type(raw["v"]) is not int:
            raise MalformedFrame("block version must be an integer")
        if raw["v"] != BLOCK_VERSION:
            raise UnsupportedVersion(f"block version {raw['v']} is not supported")
        first, last, size = (
            _uint(raw[k], n) for k, n in (("f", "first"), ("l", "last"), ("n", "size"))
        )
        if first > last or size != last + 1:
            raise MalformedFrame("block range is inconsistent (first <= last, size = last + 1)")
        key, sig = raw["k"], raw["sig"]
        if (key is None) != (sig is None):
            raise MalformedFrame("block key and signature must be both present or both absent")
        return cls(
            height=_uint(raw["h"], "height"),
            previous=_fixed(raw["p"], "previous", HASH_SIZE),
            first_seq=first,
            last_seq=last,
            tree_size=size,
            root=_fixed(raw["r"], "root", HASH_SIZE),
            time_ms=_uint(raw["t"], "time"),
            public_key=None if key is None else _fixed(key, "key", KEY_SIZE),
            signature=None if sig is None else _fixed(sig, "signature", SIGNATURE_SIZE),
        )


def _replace(block: Block, **changes: Any) -> Block:
    fields = {name: getattr(block, name) for name in Block.__dataclass_fields__}
    return Block(**{**fields, **changes})
