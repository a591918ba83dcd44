"""The registry's first-contact answer: a peer's key log, a prekey bundle and its
live record in one map.

An agent meeting a peer for the first time needs three things from the
registry: the peer's key log (to know its keys), a prekey bundle (for X3DH)
and its peer record (to connect). Asked for separately that is three HTTP
requests, each costing more CPU on both ends than the key agreement itself;
``GET /v1/agents/{id}/contact`` answers all three at once. Rules:

1. The answer is a canonical CBOR map ``{"v": 1, "log": bytes, "bundle":
   bytes | null, "record": bytes | null}``, schema :data:`FIELDS`. The key log
   is always there (no key log is a 404); a bundle or a record the registry
   does not have is ``null``.
2. The three parts are the exact bytes ``/keylog``, ``/bundle`` and ``/record``
   serve, and are decoded and checked exactly as those are: the registry is
   trusted for availability only. The bundle was taken like one from
   ``/bundle`` (its one-time prekey is handed out once).
3. Decoding checks the shape only; :class:`Contact` holds the three parts as
   bytes, for the caller to decode and verify with the usual decoders.

Decoding untrusted bytes raises only :class:`~talos.errors.MalformedFrame`
or :class:`~talos.errors.UnsupportedVersion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.errors import MalformedFrame

__all__ = ["CONTACT_VERSION", "FIELDS", "MAX_CONTACT_SIZE", "Contact"]

CONTACT_VERSION: Final = 1
#: Field name -> may it be null.
FIELDS: Final = {"log": False, "bundle": True, "record": True}
#: A key log of at most 1 MiB, a bundle and a record, and the map around them.
MAX_CONTACT_SIZE: Final = (1 << 20) + 4096
_KEYS: Final = frozenset({"v", *FIELDS})


@dataclass(frozen=True, slots=True)
class Contact:
    """The three parts of a first-contact answer, still undecoded and unverified."""

    log: bytes
    bundle: bytes | None
    record: bytes | None

    def to_bytes(self) -> bytes:
        return canonical_dumps(
            {"v": CONTACT_VERSION, "log": self.log, "bundle": self.bundle, "record": self.record}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Contact:
        """Raises: MalformedFrame, UnsupportedVersion: not such a map."""
        raw = strict_versioned_map(
            data,
            max_size=MAX_CONTACT_SIZE,
            fields=_KEYS,
            version=CONTACT_VERSION,
            what="first-contact answer",
        )
        for name, nullable in FIELDS.items():
            value = raw[name]
            if type(value) is bytes and value:
                continue
            if value is None and nullable:
                continue
            kind = "bytes or null" if nullable else "bytes"
            raise MalformedFrame(f"first-contact answer: {name!r} must be non-empty {kind}")
        return cls(log=raw["log"], bundle=raw["bundle"], record=raw["record"])
