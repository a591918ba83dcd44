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
"""

from talos.transport.links import Link, Transport

__all__ = ["Link", "Transport"]
