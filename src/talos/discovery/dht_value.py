"""The signed DHT value: its encoding, its key, and its verification (pure).

A DHT value is a canonical CBOR bundle ``{"v": 1, "rec": peer record bytes,
"log": key event log bytes}`` (plus ``"pre"``, an optional prekey bundle
without one-time prekey) of at most :data:`MAX_VALUE_SIZE` bytes, stored
under :func:`dht_key` of the record's agent id. The key log is
self-certifying (the agent id is the digest of its inception event), so
anyone can verify the record without knowing the agent beforehand
(see ``docs/design/dht.md``).

This module owns the format and the rules a value must meet; it does no I/O
and imports only :mod:`talos.core`, :mod:`talos.errors` and the standard
library. Storage (:mod:`talos.discovery.dht_storage`) and the node
(:mod:`talos.discovery.dht`) apply these rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from talos.core.crypto import sha256
from talos.core.encoding import canonical_dumps, check_versioned_map, strict_loads
from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.x3dh import PrekeyBundle
from talos.errors import LocalProtocolError, MalformedFrame, SignatureInvalid

__all__ = [
    "DHT_KEY_DOMAIN",
    "ID_SIZE",
    "MAX_VALUE_SIZE",
    "VALUE_VERSION",
    "DhtEntry",
    "dht_key",
    "encode_value",
    "is_node_id",
    "verify_value",
]

DHT_KEY_DOMAIN: Final = b"talos/dht/v1\x00"
VALUE_VERSION: Final = 1
#: rpcudp refuses requests over 8 KiB; this leaves room for the STORE framing.
#: A key log of about 25 events still fits beside a peer record.
MAX_VALUE_SIZE: Final = 7168
#: Size of a DHT key and of a node id (160 bits, as in Kademlia).
ID_SIZE: Final = 20
_FIELDS: Final = frozenset({"v", "rec", "log"})
#: With the optional prekey bundle (signed prekey only, never a one-time key).
_FIELDS_WITH_BUNDLE: Final = _FIELDS | {"pre"}


def dht_key(agent_id: str) -> bytes:
    """The 160-bit DHT key of an agent: SHA-256(``talos/dht/v1\\0`` + agent id)[:20]."""
    return sha256(DHT_KEY_DOMAIN + agent_id.encode())[:ID_SIZE]


def is_node_id(value: object) -> bool:
    """Whether ``value`` is a 160-bit key or node id."""
    return type(value) is bytes and len(value) == ID_SIZE


@dataclass(frozen=True, slots=True)
class DhtEntry:
    """A verified DHT value: the peer record, the key log that vouches for it, and
    (optionally) a prekey bundle to start a session without the registry."""

    record: PeerRecord
    log: KeyLog
    bundle: PrekeyBundle | None = None

    def to_bytes(self) -> bytes:
        return encode_value(
            self.record.to_bytes(),
            self.log.to_bytes(),
            None if self.bundle is None else self.bundle.to_bytes(),
        )


def encode_value(
    record_bytes: bytes, keylog_bytes: bytes, bundle_bytes: bytes | None = None
) -> bytes:
    """Bundle a serialized peer record, key log and (optional) prekey bundle into one
    DHT value.

    The prekey bundle carries the signed prekey only: a DHT value is read by
    anyone, so a one-time prekey in it would be handed out many times.

    Raises:
        MalformedFrame: the bundle would exceed :data:`MAX_VALUE_SIZE`.
    """
    fields: dict[str, object] = {"v": VALUE_VERSION, "rec": record_bytes, "log": keylog_bytes}
    if bundle_bytes is not None:
        fields["pre"] = bundle_bytes
    value = canonical_dumps(fields)
    if len(value) > MAX_VALUE_SIZE:
        raise MalformedFrame(
            f"DHT value of {len(value)} bytes exceeds the {MAX_VALUE_SIZE}-byte limit "
            "(key log too long for the DHT)"
        )
    return value


def verify_value(
    value: object,
    *,
    now: float,
    key: bytes | None = None,
    known_log: KeyLog | None = None,
    clock_skew: float = 60.0,
) -> DhtEntry:
    """Decode and verify an untrusted DHT value.

    ``key``, when given, is the DHT key the value is stored under; it must be
    the record's :func:`dht_key`. ``known_log`` is a log of the same agent
    the verifier already trusts: the carried log must equal or extend it.
    The returned entry holds the longer of the two logs.

    Raises:
        MalformedFrame: not a well-formed bundle, record or log, or stored
            under another agent's key.
        UnsupportedVersion: a bundle, record or log format this build does not know.
        KeyLogInvalid: the carried log is invalid, or forks or rolls back ``known_log``.
        SignatureInvalid: the record is not signed by the latest key of the log.
        StaleMessage: the record is expired (or issued in the future).
    """
    if type(value) is not bytes:
        raise MalformedFrame("DHT value must be bytes")
    decoded = strict_loads(value, max_size=MAX_VALUE_SIZE)
    fields = _FIELDS_WITH_BUNDLE if type(decoded) is dict and "pre" in decoded else _FIELDS
    raw = check_versioned_map(decoded, fields=fields, version=VALUE_VERSION, what="DHT value")
    if any(type(raw[name]) is not bytes for name in fields - {"v"}):
        raise MalformedFrame("DHT value fields must be byte strings")
    record = PeerRecord.from_bytes(raw["rec"])
    keylog = KeyLog.from_bytes(raw["log"])
    if key is not None and dht_key(record.agent_id) != key:
        raise MalformedFrame("DHT value is stored under another agent's key")
    keylog = _merge_logs(known_log, keylog, record.agent_id)
    if record.key_sequence != keylog.state.sequence:
        raise SignatureInvalid(
            f"peer record of {record.agent_id} is signed with key {record.key_sequence}, "
            f"not the current key {keylog.state.sequence}"
        )
    record.verify(IssuerKeys([keylog]), now=now, clock_skew=clock_skew)
    bundle = None if "pre" not in raw else _verified_bundle(raw["pre"], keylog)
    return DhtEntry(record, keylog, bundle)


def _verified_bundle(data: bytes, keylog: KeyLog) -> PrekeyBundle:
    """A carried prekey bundle, checked against the agent's current keys.

    Raises:
        MalformedFrame: not a bundle, another agent's, or with a one-time prekey.
        UnsupportedVersion: a bundle format this build does not know.
        SignatureInvalid: not the current keys, or the signed prekey does not verify.
    """
    bundle = PrekeyBundle.from_bytes(data)
    if bundle.agent_id != keylog.agent_id:
        raise MalformedFrame("DHT value carries another agent's prekey bundle")
    if bundle.one_time_prekey is not None:
        raise MalformedFrame("a DHT prekey bundle must not carry a one-time prekey")
    state = keylog.state
    if bundle.identity_signing_key != state.signing_key.raw or bundle.identity_dh_key != (
        state.dh_key
    ):
        raise SignatureInvalid("DHT prekey bundle is not made with the agent's current keys")
    bundle.verify()
    return bundle


def _merge_logs(known: KeyLog | None, carried: KeyLog, agent_id: str) -> KeyLog:
    if carried.agent_id != agent_id:
        raise SignatureInvalid(f"DHT value carries the key log of another agent than {agent_id}")
    if known is None:
        return carried
    if known.agent_id != agent_id:
        raise LocalProtocolError("known_log belongs to another agent")
    return known.extend(carried.events)
