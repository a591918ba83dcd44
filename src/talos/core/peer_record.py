"""Signed peer records: where an agent can be reached, and by which running instance.

An agent announces itself (to the registry, the DHT and the peers it talks
to) with a :class:`PeerRecord`, signed by its current key. Rules:

1. The record names the agent, the announcing process (a random 16-byte
   instance id, fresh per process: two instance ids live at once for one
   agent means a split brain), the endpoint, and the key sequence it is
   signed with. It is valid from ``issued_ms`` to ``expires_ms``.
2. ``sequence`` grows with every announcement of the agent. A store keeps the
   highest sequence it has verified and refuses anything not higher, so an
   old record cannot be replayed over a newer one.
3. The signature is Ed25519 by the key at ``key_sequence`` in the agent's
   verified key event log, over ``b"talos/peer-record/v1\\0"`` followed by the
   canonical CBOR of every field but the signature.

Decoding untrusted bytes raises only :class:`~talos.errors.MalformedFrame`
or :class:`~talos.errors.UnsupportedVersion`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Final

from talos.core.agent_id import check_agent_id
from talos.core.crypto import SIGNATURE_SIZE, SigningKey
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.keylog import KeyLookup, resolve_key
from talos.errors import MalformedFrame, SignatureInvalid, StaleMessage

__all__ = ["DOMAIN_PREFIX", "RECORD_VERSION", "PeerRecord"]

RECORD_VERSION: Final = 1
DOMAIN_PREFIX: Final = b"talos/peer-record/v1\x00"
INSTANCE_ID_SIZE: Final = 16
MAX_RECORD_SIZE: Final = 2048
MAX_ENDPOINT_LENGTH: Final = 256
_FIELDS: Final = frozenset({"v", "id", "inst", "ep", "seq", "iat", "exp", "ks", "sig"})
_MAX_U64: Final = 2**64 - 1
#: ws:// or wss://, a host (name, IPv4 or [IPv6]) and a port, an optional path.
_ENDPOINT: Final = re.compile(r"wss?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})(/[!-~]*)?")


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """One signed announcement of where an agent instance listens."""

    agent_id: str
    instance_id: bytes
    endpoint: str
    sequence: int
    issued_ms: int
    expires_ms: int
    key_sequence: int
    signature: bytes = b""

    @classmethod
    def create(
        cls,
        signing_key: SigningKey,
        *,
        agent_id: str,
        key_sequence: int,
        instance_id: bytes,
        endpoint: str,
        sequence: int,
        now: float,
        lifetime: float,
    ) -> PeerRecord:
        """Build and sign a record valid for ``lifetime`` seconds from ``now``.

        Raises:
            MalformedFrame: a field is out of range (agent id, endpoint, sizes).
        """
        issued = int(now * 1000)
        record = cls(
            agent_id,
            instance_id,
            endpoint,
            sequence,
            issued,
            issued + int(lifetime * 1000),
            key_sequence,
        )
        _check(record.to_dict() | {"sig": bytes(SIGNATURE_SIZE)})
        return replace(record, signature=signing_key.sign(record.signed_bytes()))

    def body(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "id": self.agent_id,
            "inst": self.instance_id,
            "ep": self.endpoint,
            "seq": self.sequence,
            "iat": self.issued_ms,
            "exp": self.expires_ms,
            "ks": self.key_sequence,
        }

    def signed_bytes(self) -> bytes:
        return DOMAIN_PREFIX + canonical_dumps(self.body())

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "sig": self.signature}

    def to_bytes(self) -> bytes:
        return canonical_dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerRecord:
        """Decode a record from untrusted bytes (structure only; see :meth:`verify`).

        Raises:
            MalformedFrame: not a well-formed record.
            UnsupportedVersion: a record format this build does not know.
        """
        raw = strict_versioned_map(
            data,
            max_size=MAX_RECORD_SIZE,
            fields=_FIELDS,
            version=RECORD_VERSION,
            what="peer record",
        )
        _check(raw)
        return cls(
            raw["id"],
            raw["inst"],
            raw["ep"],
            raw["seq"],
            raw["iat"],
            raw["exp"],
            raw["ks"],
            raw["sig"],
        )

    def verify(self, keys: KeyLookup, *, now: float, clock_skew: float = 60.0) -> None:
        """Check the signature and that the record is current at ``now``.

        Raises:
            SignatureInvalid: not signed by the agent's key at ``key_sequence``.
            StaleMessage: expired, or issued further in the future than the
                clock-skew tolerance allows (the message names clock skew).
        """
        key = resolve_key(keys, self.agent_id, self.key_sequence)
        try:
            key.verify(self.signature, self.signed_bytes())
        except SignatureInvalid:
            raise SignatureInvalid(f"peer record of {self.agent_id} is not signed by it") from None
        now_ms, skew_ms = now * 1000, clock_skew * 1000
        if self.expires_ms + skew_ms < now_ms:
            raise StaleMessage(f"peer record of {self.agent_id} expired")
        if self.issued_ms - skew_ms > now_ms:
            raise StaleMessage(
                f"peer record of {self.agent_id} is issued in the future: clock skew "
                f"beyond {clock_skew:g} s"
            )


def _check(raw: dict[str, Any]) -> None:
    if type(raw["id"]) is not str:
        raise MalformedFrame("peer record agent id must be text")
    check_agent_id(raw["id"])
    if type(raw["inst"]) is not bytes or len(raw["inst"]) != INSTANCE_ID_SIZE:
        raise MalformedFrame(f"instance id must be {INSTANCE_ID_SIZE} bytes")
    endpoint = raw["ep"]
    match = None
    if type(endpoint) is str and len(endpoint) <= MAX_ENDPOINT_LENGTH:
        match = _ENDPOINT.fullmatch(endpoint)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise MalformedFrame("endpoint must be ws://host:port or wss://host:port[/path]")
    for key in ("seq", "iat", "exp", "ks"):
        if type(raw[key]) is not int or not 0 <= raw[key] <= _MAX_U64:
            raise MalformedFrame(f"peer record field {key!r} must be a non-negative integer")
    if raw["exp"] < raw["iat"]:
        raise MalformedFrame("peer record expires before it is issued")
    if type(raw["sig"]) is not bytes or len(raw["sig"]) != SIGNATURE_SIZE:
        raise MalformedFrame(f"signature must be {SIGNATURE_SIZE} bytes")
