"""Moving envelope frames between agents over WebSocket connections.

The transport knows nothing of envelopes beyond "a frame is one binary
WebSocket message of bounded size". Each agent listens; a peer that wants to
talk connects to the endpoint found through discovery; either side may send
on a connection once it exists, so one connection per peer pair serves both
directions. Which agent is at the other end is learned by the layer above
from the first authenticated envelope (:attr:`Link.peer`).

Keepalive pings detect dead connections; compression is off (ciphertext
does not compress, and compression over secrets invites length oracles).
Every failure leaves as :class:`~talos.errors.PeerUnreachable`.

Which incoming links are kept is decided, sans I/O, in
:mod:`talos.transport.admission`; :mod:`talos.transport.links` holds the
listener and acts on those decisions; :mod:`talos.transport.link` is one
connection and its frame pump.
"""

from talos.transport.admission import (
    EVICTABLE_AFTER,
    MAX_INCOMING,
    MAX_INCOMING_PER_HOST,
    MAX_VERIFIED_PER_PEER,
    VERIFY_WITHIN,
)
from talos.transport.links import Link, Transport

__all__ = [
    "EVICTABLE_AFTER",
    "MAX_INCOMING",
    "MAX_INCOMING_PER_HOST",
    "MAX_VERIFIED_PER_PEER",
    "VERIFY_WITHIN",
    "Link",
    "Transport",
]
