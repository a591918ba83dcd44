"""One WebSocket link to a peer, whichever side opened it, and its frame pump.

:class:`Link` hands every binary frame to the client's handler; what the
transport decides about a link (its place, whether it is closed for
undecodable frames) is :mod:`talos.transport.links`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, WebSocketException

from talos.core.clock import Clock
from talos.errors import PeerUnreachable
from talos.logs import LimitedLog
from talos.system import SYSTEM_CLOCK
from talos.transport.admission import LinkFacts

__all__ = [
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_UNSUPPORTED_DATA",
    "FRAMES_PER_WRITE",
    "FrameHandler",
    "Link",
    "MalformedHook",
]

_log = logging.getLogger("talos.transport")

#: Called for every binary frame received on any link.
FrameHandler = Callable[["Link", bytes], Awaitable[None]]

#: Opening order of links in this process (:attr:`LinkFacts.serial`).
_serials = itertools.count()

#: WebSocket close codes (RFC 6455 §7.4.1).
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_POLICY_VIOLATION: Final = 1008

#: Frames of a batch written to the socket at once by :meth:`Link.send_many`.
#: One write per frame costs a system call each on both ends; one write for a
#: whole window (up to 256 frames) makes the receiver wait for all of it before it
#: starts. Of 1, 4, 8, 16, 32 and 256 in alternated runs of ``benchmarks.network``,
#: four and eight were the fastest, eight by a little (docs/design/performance.md,
#: twelfth session).
FRAMES_PER_WRITE: Final = 8

#: Seconds a condemned link's closing handshake may take before the TCP
#: connection is dropped.
CONDEMNED_CLOSE_TIMEOUT: Final = 1.0

#: For links made without a transport (tests); a transport hands its links its own.
_DEFAULT_LOGS = LimitedLog(_log, SYSTEM_CLOCK)

#: Told that a link sent a frame that cannot be decoded (``fatal``: close it at
#: once); answers whether the link is being closed for it.
MalformedHook = Callable[["Link", bool], bool]


class Link:
    """One open WebSocket to a peer, whichever side opened it."""

    def __init__(
        self,
        socket: ClientConnection | ServerConnection,
        *,
        outgoing: bool,
        clock: Clock = SYSTEM_CLOCK,
        logs: LimitedLog = _DEFAULT_LOGS,
    ) -> None:
        self._socket = socket
        self._clock, self._logs = clock, logs
        #: Set by the transport: what to do with undecodable frames (:meth:`reject_malformed`).
        self.on_malformed: MalformedHook | None = None
        self._close_as: tuple[int, str] | None = None
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

    async def send_many(self, frames: Sequence[bytes]) -> None:
        """Send frames in order, :data:`FRAMES_PER_WRITE` of them per socket write.

        Each is its own WebSocket message, exactly as :meth:`send` sends it; only
        the writes are fewer. A failure part way leaves the frames before it sent.

        Raises:
            PeerUnreachable: the connection is closed or broke while sending.
        """
        if len(frames) <= 1:
            for frame in frames:
                await self.send(frame)
            return
        if self.closed.is_set():
            raise PeerUnreachable(f"connection to {self.peer or self.remote} is closed")
        socket = self._socket
        try:
            for start in range(0, len(frames), FRAMES_PER_WRITE):
                if self.closed.is_set():  # closed while the last group drained
                    raise PeerUnreachable(f"connection to {self.peer or self.remote} closed")
                # websockets' own send() path, with its state check, flow control and
                # error handling on the way out, around several frames instead of one.
                # (Talos never sends a fragmented message, which send() would wait for.)
                async with socket.send_context():
                    for frame in frames[start : start + FRAMES_PER_WRITE]:
                        socket.protocol.send_binary(frame)
                    _write_together(socket, socket.protocol.data_to_send())
        except (ConnectionClosed, OSError) as exc:
            self.closed.set()
            raise PeerUnreachable(f"connection to {self.peer or self.remote} broke: {exc}") from exc

    def reject_malformed(self, *, fatal: bool = False) -> bool:
        """Note that a frame on this link could not be decoded (the client calls
        this); returns whether the link is being closed for it. The transport
        decides (rule 5 of :mod:`talos.transport.admission`); ``fatal`` closes it
        at once (a text frame)."""
        hook = self.on_malformed
        return hook(self, fatal) if hook is not None else False

    def condemn(self, code: int, reason: str) -> None:
        """Mark the link closed now and say which close code :meth:`close` will send
        (the first one given is kept)."""
        self.closed.set()
        if self._close_as is None:
            self._close_as = (code, reason)
            # A flooder need not read our close frame: wait for its answer only
            # briefly, then drop the connection (the default wait is 10 s).
            self._socket.close_timeout = CONDEMNED_CLOSE_TIMEOUT

    async def close(self) -> None:
        """Close with the code given to :meth:`condemn`, else 1000 (normal closure)."""
        self.closed.set()
        code, reason = self._close_as or (1000, "")
        with contextlib.suppress(WebSocketException, OSError):
            await self._socket.close(code, reason)

    async def pump(self, on_frame: FrameHandler) -> None:
        """Hand every binary frame to ``on_frame`` until the connection ends.

        Text frames are a protocol violation: the link is closed (through
        :meth:`reject_malformed`, so the transport throttles the address). A
        handler error is logged and does not end the link (one bad frame must
        not cut a peer off). Once the link is closed no further frame is handed on.
        """
        try:
            async for message in self._socket:
                if self.closed.is_set():
                    break
                if not isinstance(message, bytes):
                    self._logs.warning(
                        "malformed_frame",
                        "closing link from %s: text frame",
                        self.remote,
                        source=self.remote_host,
                        peer_id=self.peer,
                        remote=self.remote,
                    )
                    self.reject_malformed(fatal=True)
                    break
                try:
                    await on_frame(self, message)
                except Exception:
                    self._logs.log(
                        logging.ERROR,
                        "frame_handler_failed",
                        "frame handler failed for a frame from %s",
                        self.remote,
                        source=self.remote_host,
                        exc_info=True,
                        peer_id=self.peer,
                    )
        except (ConnectionClosed, OSError):
            _log.debug("link from %s ended", self.remote)
        finally:
            await self.close()


def _write_together(socket: ClientConnection | ServerConnection, data: list[bytes]) -> None:
    """Write the protocol's output in one call; an empty chunk (end of stream, which
    sending frames does not produce) ends the connection as websockets does.

    One ``write`` of the joined bytes rather than ``writelines``: some asyncio
    versions' ``writelines`` skip the transport's flow control."""
    if all(data):
        socket.transport.write(b"".join(data))
        return
    for chunk in data:
        if chunk:
            socket.transport.write(chunk)
        elif socket.transport.can_write_eof():
            socket.transport.write_eof()
        else:
            socket.transport.close()
