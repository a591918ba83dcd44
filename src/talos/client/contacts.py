"""Contact cards: introducing two agents without a registry.

A card is ``{"v": 1, "log": key log, "rec": peer record}`` in canonical
CBOR: the agent's self-certifying key log and a signed record of where it
listens. :func:`learn` checks both before the peer directory keeps them.
In ``offline_mode`` a session needs the peer's prekey bundle passed too
(:func:`require_bundle`): nothing is fetched from the network.
"""

from __future__ import annotations

from typing import Final

from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.x3dh import PrekeyBundle
from talos.errors import MalformedFrame, PeerNotFound
from talos.peers import PeerDirectory

__all__ = ["card", "learn", "require_bundle"]

_FIELDS: Final = frozenset({"v", "log", "rec"})
_MAX_SIZE: Final = 1 << 20


def card(keylog: KeyLog, record: PeerRecord) -> bytes:
    """The contact card of the agent with ``keylog``, reachable as ``record`` says."""
    return canonical_dumps({"v": 1, "log": keylog.to_bytes(), "rec": record.to_bytes()})


def learn(peers: PeerDirectory, contact: bytes) -> str:
    """Learn a peer from its contact card; returns its agent id.

    Raises:
        MalformedFrame, UnsupportedVersion: not a contact card.
        KeyLogInvalid: its key log is invalid or forks what we know.
        SignatureInvalid, StaleMessage: its record does not verify now.
    """
    raw = strict_versioned_map(
        contact, max_size=_MAX_SIZE, fields=_FIELDS, version=1, what="contact card"
    )
    if type(raw["log"]) is not bytes or type(raw["rec"]) is not bytes:
        raise MalformedFrame("contact card fields must be bytes")
    log = peers.learn_log(KeyLog.from_bytes(raw["log"]))
    record = PeerRecord.from_bytes(raw["rec"])
    if record.agent_id != log.agent_id:
        raise MalformedFrame("contact card record names another agent")
    peers.learn_record(record)
    return log.agent_id


def require_bundle(peer: str, bundle: PrekeyBundle | None, *, offline: bool) -> None:
    """With ``offline_mode`` nothing is fetched: ``TalosClient.establish_session`` needs a bundle.

    Raises:
        PeerNotFound: no ``bundle`` was given in offline mode.
    """
    if bundle is None and offline:
        raise PeerNotFound(
            f"offline_mode: no prekey bundle for {peer} is fetched from the network; "
            "pass the peer's get_prekey_bundle() (and add_contact its contact_card())"
        )
