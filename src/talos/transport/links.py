"""WebSocket links: the listener and outgoing connections (each a :class:`Link`).

:class:`Transport` acts on the admission decisions of
:class:`~talos.transport.admission.AdmissionPolicy`: it feeds the policy the
facts of its open incoming links and the time on its injected clock, and
refuses, displaces or closes the links the policy names. Every line a remote
party can cause is written through a :class:`~talos.logs.LimitedLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Final

from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import InvalidHandshake, InvalidURI, WebSocketException

from talos.core.clock import Clock
from talos.core.ratelimit import RateLimiter
from talos.core.wire import MAX_FRAME_SIZE
from talos.errors import PeerUnreachable
from talos.logs import LimitedLog
from talos.system import SYSTEM_CLOCK
from talos.transport.admission import (
    EVICTABLE_AFTER,
    MALFORMED_BURST,
    MALFORMED_REFILL,
    MAX_INCOMING,
    MAX_INCOMING_PER_HOST,
    MAX_VERIFIED_PER_PEER,
    THROTTLE_SECONDS,
    VERIFY_WITHIN,
    AdmissionPolicy,
    Admit,
    Displace,
    HostThrottle,
    LinkFacts,
    Refuse,
)
from talos.transport.link import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_UNSUPPORTED_DATA,
    FrameHandler,
    Link,
)

__all__ = [
    "EVICTABLE_AFTER",
    "HELLO_HEADER",
    "MAX_INCOMING",
    "MAX_INCOMING_PER_HOST",
    "MAX_VERIFIED_PER_PEER",
    "VERIFY_WITHIN",
    "FrameHandler",
    "Link",
    "Transport",
]

_log = logging.getLogger("talos.transport")

#: The handshake header in which a connecting agent names itself (a hint only).
HELLO_HEADER: Final = "Talos-Agent"
#: Longest value of it taken (an agent id is far shorter).
MAX_HELLO: Final = 128


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

    A link that keeps sending frames that cannot be decoded (the client tells
    it: :meth:`Link.reject_malformed`) is closed once it has sent more than
    ``malformed_burst`` of them (refilled at ``malformed_refill`` per second;
    a text frame closes it at once), with close code 1008 (1003 for text),
    and newcomers from its address are answered HTTP 429 for
    ``throttle_seconds``.
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
        malformed_burst: int = MALFORMED_BURST,
        malformed_refill: float = MALFORMED_REFILL,
        throttle_seconds: float = THROTTLE_SECONDS,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """Raises:
        ConfigurationError: a limit is not positive (``evictable_after`` may be 0).
        """
        self._malformed = RateLimiter(rate=malformed_refill, burst=malformed_burst)
        self._throttle = HostThrottle(throttle_seconds)
        self._logs = LimitedLog(_log, clock)
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
        #: Links closed for frames that cannot be decoded (rule 5).
        self.closed_malformed = 0
        #: Handshakes refused because their address was throttled for that.
        self.throttled = 0
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
        #: Called with (the agent an incoming request names in :data:`HELLO_HEADER`,
        #: the remote host) when the request passes admission, before the upgrade
        #: is validated and before any link exists. The name is unauthenticated:
        #: a hint to start looking its key log up, nothing more.
        self.on_hello: Callable[[str, str], None] | None = None

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
        address: Any = connection.remote_address
        host = str(address[0]) if address else "?"
        now = self._clock.monotonic()
        if self._throttle.holds(host, now):
            self.throttled += 1
            self._logs.warning(
                "link_throttled",
                "refused an incoming connection from %s: its link was closed for "
                "malformed frames less than %g s ago; %d refused so far",
                host,
                self._throttle.seconds,
                self.throttled,
                source=host,
                remote=host,
                throttled=self.throttled,
            )
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "throttled\n")
        decision = self._policy.decide(host, self._incoming(), now)
        if not isinstance(decision, Refuse):
            claimed = _claimed(request)
            if claimed is not None and self.on_hello is not None:
                self.on_hello(claimed, host)
            return None
        self.refused += 1
        self._logs.warning(
            "connection_limit",
            "refused an incoming connection from %s: %d links open (limit %d), "
            "%d from that address (limit %d); %d refused so far",
            host,
            decision.incoming,
            self._policy.max_incoming,
            decision.from_host,
            self._policy.max_per_host,
            self.refused,
            source=host,
            refused=self.refused,
            remote=host,
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
                pass  # it took a free place
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
        self._logs.warning(
            "unverified_link",
            "closed an incoming link from %s (%s); %d closed so far",
            link.remote_host,
            why,
            self.unverified_closed,
            source=link.remote_host,
            remote=link.remote_host,
            closed=self.unverified_closed,
        )

    def _on_malformed(self, link: Link, fatal: bool) -> bool:
        """Rule 5: close a link past its budget of undecodable frames (at once when
        ``fatal``) and throttle its address (if it is an incoming link)."""
        now = self._clock.monotonic()
        if not fatal and self._malformed.allow(link.serial, now):
            return False
        self._malformed.forget(link.serial)
        self.closed_malformed += 1
        if not link.outgoing:
            self._throttle.add(link.remote_host, now)
        self._links.discard(link)
        if fatal:
            link.condemn(CLOSE_UNSUPPORTED_DATA, "text frame")
        else:
            link.condemn(CLOSE_POLICY_VIOLATION, "too many malformed frames")
        task = asyncio.ensure_future(link.close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._logs.warning(
            "link_closed_malformed",
            "closed the link from %s: frames that cannot be decoded; new connections "
            "from %s are refused for %g s; %d links closed so far",
            link.remote,
            link.remote_host,
            self._throttle.seconds,
            self.closed_malformed,
            source=link.remote_host,
            remote=link.remote,
            peer_id=link.peer,
            closed=self.closed_malformed,
        )
        return True

    async def _accept(self, socket: ServerConnection) -> None:
        link = Link(socket, outgoing=False, clock=self._clock, logs=self._logs)
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

    async def connect(self, endpoint: str, *, hello: str | None = None) -> Link:
        """Open a link to ``endpoint`` (``ws://host:port``) and start pumping its frames.

        ``hello`` (our agent id) goes in the handshake's :data:`HELLO_HEADER`, so
        that the peer can start looking our key log up before our first frame
        arrives (:attr:`on_hello`).

        Raises:
            PeerUnreachable: refused, unreachable, timed out, or not a WebSocket peer.
        """
        headers = None if hello is None else {HELLO_HEADER: hello}
        try:
            socket = await connect(
                endpoint,
                open_timeout=self._open_timeout,
                proxy=None,
                additional_headers=headers,
                **self._options,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, WebSocketException) as exc:
            raise PeerUnreachable(f"cannot connect to {endpoint}: {exc}") from exc
        link = Link(socket, outgoing=True, clock=self._clock, logs=self._logs)
        self._track(link)
        task = asyncio.create_task(link.pump(self._on_frame), name=f"talos-link-{endpoint}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return link

    def _track(self, link: Link) -> None:
        self._links.add(link)
        link.on_malformed = self._on_malformed
        if self.on_link is not None:
            self.on_link(link)

        async def forget() -> None:
            await link.closed.wait()
            self._links.discard(link)
            self._malformed.forget(link.serial)

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


def _claimed(request: Any) -> str | None:
    """The :data:`HELLO_HEADER` of an incoming handshake request, if it is one short
    printable value (unauthenticated: see :attr:`Transport.on_hello`)."""
    headers = getattr(request, "headers", None)
    if headers is None:
        return None
    values = headers.get_all(HELLO_HEADER)
    if len(values) != 1:
        return None
    value = values[0]
    if type(value) is not str or not 0 < len(value) <= MAX_HELLO or not value.isprintable():
        return None
    return value
