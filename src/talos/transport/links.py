"""WebSocket links: the listener, outgoing connections, and the frame pump.

:class:`Transport` acts on the admission decisions of
:class:`~talos.transport.admission.AdmissionPolicy`: it feeds the policy the
facts of its open incoming links and the time on its injected clock, and
refuses, displaces or closes the links the policy names.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI, WebSocketException

from talos.core.clock import Clock
from talos.core.wire import MAX_FRAME_SIZE
from talos.errors import PeerUnreachable
from talos.system import SYSTEM_CLOCK
from talos.transport.admission import (
    EVICTABLE_AFTER,
    MAX_INCOMING,
    MAX_INCOMING_PER_HOST,
    MAX_VERIFIED_PER_PEER,
    VERIFY_WITHIN,
    AdmissionPolicy,
    Admit,
    Displace,
    LinkFacts,
    Refuse,
)

__all__ = [
    "EVICTABLE_AFTER",
    "MAX_INCOMING",
    "MAX_INCOMING_PER_HOST",
    "MAX_VERIFIED_PER_PEER",
    "VERIFY_WITHIN",
    "FrameHandler",
    "Link",
    "Transport",
]

_log = logging.getLogger("talos.transport")

#: Called for every binary frame received on any link.
FrameHandler = Callable[["Link", bytes], Awaitable[None]]

#: Opening order of links in this process (:attr:`LinkFacts.serial`).
_serials = itertools.count()


class Link:
    """One open WebSocket to a peer, whichever side opened it."""

    def __init__(
        self,
        socket: ClientConnection | ServerConnection,
        *,
        outgoing: bool,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._socket = socket
        self._clock = clock
        self.outgoing = outgoing
        #: Its place in the opening order (:attr:`LinkFacts.serial`).
        self.serial = next(_serials)
        #: The agent at the other end, once an authenticated envelope named it.
        self.peer: str | None = None
        #: The agent whose accepted message arrived here (:meth:`mark_verified`).
        self.verified_by: str | None = None
        #: When its first one did, and when the link opened, on ``clock.monotonic()``.
        self.verified_at: float | None = None
        self.opened_at = clock.monotonic()
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
            self.verified_at = self._clock.monotonic()

    @property
    def facts(self) -> LinkFacts:
        """What the admission policy knows of this link, as of now."""
        return LinkFacts(
            serial=self.serial,
            host=self.remote_host,
            opened_at=self.opened_at,
            verified_by=self.verified_by,
            verified_at=self.verified_at,
        )

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
    links this agent opened itself are never displaced. The rules are
    :class:`~talos.transport.admission.AdmissionPolicy`'s; every time they
    read comes from ``clock.monotonic()``.
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
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """Raises:
        ConfigurationError: a limit is not positive (``evictable_after`` may be 0).
        """
        self._policy = AdmissionPolicy(
            max_incoming=max_incoming,
            max_per_host=max_per_host,
            verify_within=verify_within,
            evictable_after=evictable_after,
            max_verified_per_peer=max_verified_per_peer,
        )
        self._clock = clock
        self._on_frame = on_frame
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
        #: The one timer that wakes when the first unverified link falls due.
        self._expiry: asyncio.TimerHandle | None = None
        self._closing = False
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
        decision = self._policy.decide(host, self._incoming(), self._clock.monotonic())
        if not isinstance(decision, Refuse):
            return None
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th, 8th...: no log flood
            _log.warning(
                "refused an incoming connection from %s: %d links open (limit %d), "
                "%d from that address (limit %d); %d refused so far",
                host,
                decision.incoming,
                self._policy.max_incoming,
                decision.from_host,
                self._policy.max_per_host,
                self.refused,
                extra={"event": "connection_limit", "refused": self.refused, "remote": host},
            )
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")

    def _incoming(self, *, exclude: Link | None = None) -> list[LinkFacts]:
        """The facts of the open incoming links (but ``exclude``)."""
        return [link.facts for link in self._incoming_links() if link is not exclude]

    def _incoming_links(self) -> list[Link]:
        return [link for link in self._links if not link.outgoing and link.is_open]

    def _drop_each(self, chosen: Iterable[LinkFacts], why: str) -> None:
        """Close the incoming links the policy chose (by their facts)."""
        serials = {facts.serial for facts in chosen}
        for link in self._incoming_links():
            if link.serial in serials:
                self._drop(link, why)

    def _make_room(self, link: Link) -> None:
        """After ``link``'s handshake: if it took a place that was not free,
        displace the oldest displaceable link, or close ``link`` itself when
        another newcomer took that one first."""
        now = self._clock.monotonic()
        match self._policy.decide(link.remote_host, self._incoming(exclude=link), now):
            case Admit():
                pass
            case Displace(victim=victim):
                self._drop_each([victim], f"displaced by a connection from {link.remote_host}")
            case Refuse():
                self.refused += 1
                self._drop(link, "no place left for it")

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
        link = Link(socket, outgoing=False, clock=self._clock)
        self._track(link)
        self._make_room(link)
        if self._expiry is None and link.is_open:
            self._arm_expiry()
        await link.pump(self._on_frame)

    def close_overdue(self) -> int:
        """Close every incoming link that is unverified ``verify_within`` seconds
        after it opened, by the transport's clock; returns how many.

        The transport's own timer calls this when the first such link falls due,
        so callers need not; one that moves an injected clock forward may call it
        to apply the rule at once instead of waiting for that timer.
        """
        overdue = self._policy.overdue(self._incoming(), self._clock.monotonic())
        self._drop_each(overdue, f"no accepted message within {self._policy.verify_within:g} s")
        self._arm_expiry()
        return len(overdue)

    def _arm_expiry(self) -> None:
        """Set the timer for the first unverified link to fall due (none: no timer).

        It waits on the event loop, in real seconds, for as long as the clock says
        is left; what is due when it fires is decided by the clock again, so under a
        clock that has not moved that far it only sets itself again."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        deadline = self._policy.next_deadline(self._incoming())
        if deadline is not None and not self._closing:
            delay = max(0.0, deadline - self._clock.monotonic())
            self._expiry = asyncio.get_running_loop().call_later(delay, self.close_overdue)

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
        link = Link(socket, outgoing=True, clock=self._clock)
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
        self._closing = True
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            await link.close()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
