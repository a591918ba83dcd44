"""WebSocket links: the listener, outgoing connections, and the frame pump."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI, WebSocketException

from talos.core.wire import MAX_FRAME_SIZE
from talos.errors import ConfigurationError, PeerUnreachable

__all__ = ["FrameHandler", "Link", "Transport"]

_log = logging.getLogger("talos.transport")

#: Called for every binary frame received on any link.
FrameHandler = Callable[["Link", bytes], Awaitable[None]]


class Link:
    """One open WebSocket to a peer, whichever side opened it."""

    def __init__(self, socket: ClientConnection | ServerConnection, *, outgoing: bool) -> None:
        self._socket = socket
        self.outgoing = outgoing
        #: The agent at the other end, once an authenticated envelope named it.
        self.peer: str | None = None
        #: The agent whose accepted message arrived here (:meth:`mark_verified`).
        self.verified_by: str | None = None
        #: When its first one did, and when the link opened, on the loop's clock.
        self.verified_at: float | None = None
        self.opened_at = asyncio.get_running_loop().time()
        self.closed = asyncio.Event()

    @property
    def verified(self) -> bool:
        return self.verified_by is not None

    def mark_verified(self, sender: str) -> None:
        """Note that a message from ``sender`` arrived here and was accepted (signed,
        fresh, not a replay, authorized, decrypted): the link is a peer's, not a
        connection holding a place. The client calls this; see :class:`Transport`."""
        if self.verified_by != sender:  # called per message: only the first counts
            self.verified_by = sender
            self.verified_at = asyncio.get_running_loop().time()

    @property
    def remote(self) -> str:
        address: Any = self._socket.remote_address
        return f"{address[0]}:{address[1]}" if address else "?"

    @property
    def remote_host(self) -> str:
        """The remote IP address alone (``"?"`` if unknown)."""
        address: Any = self._socket.remote_address
        return str(address[0]) if address else "?"

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    async def send(self, frame: bytes) -> None:
        """Send one frame.

        Raises:
            PeerUnreachable: the connection is closed or broke while sending.
        """
        if self.closed.is_set():
            raise PeerUnreachable(f"connection to {self.peer or self.remote} is closed")
        try:
            await self._socket.send(frame)
        except (ConnectionClosed, OSError) as exc:
            self.closed.set()
            raise PeerUnreachable(f"connection to {self.peer or self.remote} broke: {exc}") from exc

    async def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(WebSocketException, OSError):
            await self._socket.close()

    async def pump(self, on_frame: FrameHandler) -> None:
        """Hand every binary frame to ``on_frame`` until the connection ends.

        Text frames are a protocol violation: the link is closed. A handler
        error is logged and does not end the link (one bad frame must not cut
        a peer off).
        """
        try:
            async for message in self._socket:
                if not isinstance(message, bytes):
                    _log.warning(
                        "closing link from %s: text frame",
                        self.remote,
                        extra={"event": "malformed_frame", "peer_id": self.peer},
                    )
                    break
                try:
                    await on_frame(self, message)
                except Exception:
                    _log.exception(
                        "frame handler failed for a frame from %s",
                        self.remote,
                        extra={"event": "frame_handler_failed", "peer_id": self.peer},
                    )
        except (ConnectionClosed, OSError):
            _log.debug("link from %s ended", self.remote)
        finally:
            await self.close()


#: Incoming links one agent keeps open at once; more are refused at the handshake.
MAX_INCOMING: Final = 256
#: Of those, the most from one remote address: one flooding host cannot take
#: every place (agents behind one NAT share an address, hence a generous share).
MAX_INCOMING_PER_HOST: Final = 64
#: Seconds an incoming link may stay open without an accepted message. A peer
#: connects to send one; an idle link it opened is simply opened again later.
VERIFY_WITHIN: Final = 10.0
#: An incoming link younger than this is not displaced by a newcomer, so that a
#: real peer has time for its first message (a key-log lookup may precede it).
EVICTABLE_AFTER: Final = 2.0
#: Verified incoming links kept per sending agent; its older ones are
#: displaceable like unverified ones (one identity cannot hold every place).
MAX_VERIFIED_PER_PEER: Final = 4


class Transport:
    """Listens for links and opens them; every received frame goes to ``on_frame``.

    At most ``max_incoming`` incoming links are open at once, and at most
    ``max_per_host`` from one remote address. An incoming link earns its
    place with an accepted message (:meth:`Link.mark_verified`, called by
    the client once a message passed every check): one without after
    ``verify_within`` seconds is closed. When the places are taken, a
    newcomer that completes its WebSocket handshake displaces the oldest
    displaceable link: unverified, or beyond the newest
    ``max_verified_per_peer`` of the same sender, and at least
    ``evictable_after`` seconds old. When there is none, the handshake is
    answered HTTP 503 before any frame is read. So a flood of connections,
    from however many addresses, churns among its own connections, and the
    links this agent opened itself are never displaced.
    """

    def __init__(
        self,
        on_frame: FrameHandler,
        *,
        ping_interval: float = 10.0,
        ping_timeout: float = 10.0,
        open_timeout: float = 5.0,
        max_frame: int = MAX_FRAME_SIZE,
        max_incoming: int = MAX_INCOMING,
        max_per_host: int = MAX_INCOMING_PER_HOST,
        verify_within: float = VERIFY_WITHIN,
        evictable_after: float = EVICTABLE_AFTER,
        max_verified_per_peer: int = MAX_VERIFIED_PER_PEER,
    ) -> None:
        """Raises:
        ConfigurationError: a limit is not positive (``evictable_after`` may be 0).
        """
        if min(max_incoming, max_per_host, max_verified_per_peer) < 1 or not (
            verify_within > 0 and evictable_after >= 0
        ):
            raise ConfigurationError("transport limits must be positive")
        self._max_verified_per_peer = max_verified_per_peer
        self._on_frame = on_frame
        self._max_incoming = max_incoming
        self._max_per_host = max_per_host
        self._verify_within = verify_within
        self._evictable_after = evictable_after
        #: Handshakes refused because ``max_incoming`` links were open.
        self.refused = 0
        #: Incoming links closed for their place (no accepted message in time,
        #: displaced by a newcomer, or a newcomer that found no place after all).
        self.unverified_closed = 0
        self._options: dict[str, Any] = {
            "compression": None,
            "max_size": max_frame,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
        }
        self._open_timeout = open_timeout
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[Link] = set()
        self.on_link: Callable[[Link], None] | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Start accepting links; returns the bound address (``port=0`` picks one).

        Raises:
            PeerUnreachable: the address cannot be bound.
        """
        try:
            self._server = await serve(
                self._accept, host, port, process_request=self._admit, **self._options
            )
        except OSError as exc:
            raise PeerUnreachable(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        bound = next(iter(self._server.sockets)).getsockname()
        return str(bound[0]), int(bound[1])

    def _admit(self, connection: ServerConnection, request: Any) -> Any:
        """Refuse the handshake (503) when the places are taken (``max_incoming``
        incoming links, or ``max_per_host`` from the same remote address) and none
        can be displaced. Nothing is displaced here: only a completed handshake
        does that (:meth:`_make_room`), so a malformed request cannot."""
        del request
        address: Any = connection.remote_address
        host = str(address[0]) if address else "?"
        fits, victim = self._displaceable(host, exclude=None)
        if fits or victim is not None:
            return None
        incoming, from_host = self._incoming(host)
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th, 8th...: no log flood
            _log.warning(
                "refused an incoming connection from %s: %d links open (limit %d), "
                "%d from that address (limit %d); %d refused so far",
                host,
                len(incoming),
                self._max_incoming,
                len(from_host),
                self._max_per_host,
                self.refused,
                extra={"event": "connection_limit", "refused": self.refused, "remote": host},
            )
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")

    def _incoming(self, host: str) -> tuple[list[Link], list[Link]]:
        incoming = [link for link in self._links if not link.outgoing and link.is_open]
        return incoming, [link for link in incoming if link.remote_host == host]

    def _displaceable(self, host: str, *, exclude: Link | None) -> tuple[bool, Link | None]:
        """Whether a link from ``host`` fits; if not, the link to displace for it
        (``None`` when every place is held). ``exclude`` does not count."""
        incoming, from_host = self._incoming(host)
        incoming = [link for link in incoming if link is not exclude]
        from_host = [link for link in from_host if link is not exclude]
        if len(incoming) < self._max_incoming and len(from_host) < self._max_per_host:
            return True, None
        crowded = from_host if len(from_host) >= self._max_per_host else incoming
        newest: dict[str, list[float]] = {}
        for link in incoming:
            if link.verified_by is not None and link.verified_at is not None:
                newest.setdefault(link.verified_by, []).append(link.verified_at)
        kept = {
            sender: sorted(times)[-self._max_verified_per_peer :]
            for sender, times in newest.items()
        }
        ripe = asyncio.get_running_loop().time() - self._evictable_after
        candidates = [
            link
            for link in crowded
            if link.opened_at <= ripe
            and (link.verified_by is None or link.verified_at not in kept[link.verified_by])
        ]
        return False, min(candidates, key=lambda link: link.opened_at, default=None)

    def _make_room(self, link: Link) -> None:
        """After ``link``'s handshake: if it took a place that was not free,
        displace the oldest displaceable link, or close ``link`` itself when
        another newcomer took that one first."""
        fits, victim = self._displaceable(link.remote_host, exclude=link)
        if fits:
            return
        if victim is None:
            self.refused += 1
            self._drop(link, "no place left for it")
            return
        self._drop(victim, f"displaced by a connection from {link.remote_host}")

    def _drop(self, link: Link, why: str) -> None:
        """Close an incoming link that holds a place it has not earned."""
        self._links.discard(link)  # its place is free now, not when the close completes
        link.closed.set()
        task = asyncio.ensure_future(link.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.unverified_closed += 1
        if self.unverified_closed & (self.unverified_closed - 1) == 0:  # 1st, 2nd, 4th...
            _log.warning(
                "closed an incoming link from %s (%s); %d closed so far",
                link.remote_host,
                why,
                self.unverified_closed,
                extra={
                    "event": "unverified_link",
                    "remote": link.remote_host,
                    "closed": self.unverified_closed,
                },
            )

    async def _accept(self, socket: ServerConnection) -> None:
        link = Link(socket, outgoing=False)
        self._track(link)
        self._make_room(link)
        expiry = asyncio.get_running_loop().call_later(self._verify_within, self._expire, link)
        try:
            await link.pump(self._on_frame)
        finally:
            expiry.cancel()

    def _expire(self, link: Link) -> None:
        if link.is_open and not link.verified:
            self._drop(link, f"no accepted message within {self._verify_within:g} s")

    async def connect(self, endpoint: str) -> Link:
        """Open a link to ``endpoint`` (``ws://host:port``) and start pumping its frames.

        Raises:
            PeerUnreachable: refused, unreachable, timed out, or not a WebSocket peer.
        """
        try:
            socket = await connect(
                endpoint, open_timeout=self._open_timeout, proxy=None, **self._options
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, WebSocketException) as exc:
            raise PeerUnreachable(f"cannot connect to {endpoint}: {exc}") from exc
        link = Link(socket, outgoing=True)
        self._track(link)
        task = asyncio.create_task(link.pump(self._on_frame), name=f"talos-link-{endpoint}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return link

    def _track(self, link: Link) -> None:
        self._links.add(link)
        if self.on_link is not None:
            self.on_link(link)

        async def forget() -> None:
            await link.closed.wait()
            self._links.discard(link)

        task = asyncio.create_task(forget())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop listening and close every link."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            await link.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
