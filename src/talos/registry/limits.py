"""Slow and surplus clients of the registry: header and request deadlines, a connection cap.

uvicorn has no deadline for *receiving* a request: its keep-alive timer runs
only between requests, and it is reset by every byte that arrives, so a
client sending one header byte every few seconds, or a body at one byte a
second, holds its connection (and a file descriptor) for ever. Its
``limit_concurrency`` answers 503 only once a request head is complete,
which a slow client never sends. (uvicorn issue #157 planned
``--timeout-request-start`` / ``--timeout-request-complete``; they were never
built.)

:func:`guarded_protocol` therefore gives ``uvicorn.run(http=...)`` an
:class:`~uvicorn.protocols.http.h11_impl.H11Protocol` that enforces
:class:`ClientLimits`:

- **header timeout** — the request head must be complete within
  ``header_timeout`` seconds of the connection opening, or of the first byte
  of the next request on a kept-alive connection;
- **request timeout** (the body deadline) — the whole request, head and
  body, must be received within ``request_timeout`` seconds of its first
  byte (of the connection opening for the first request);
- **connection cap** — a connection arriving when ``max_connections`` are
  open is answered ``503`` and closed at once, before reading anything.

A client past a deadline gets ``408 Request Timeout`` (unless a response
has already started) and its connection is closed; the application sees the
disconnect. Every drop and refusal is counted
(``talos_registry_clients_dropped_total{reason}``,
``talos_registry_connections_refused_total``) and logged at most
:data:`LOG_BURST` times per :data:`LOG_INTERVAL` seconds per event, each line
saying how many were not logged since the previous one
(``registry_client_dropped``, ``registry_connections_refused``). WebSocket
upgrades are not offered (the registry has no WebSocket route), so every
connection stays under these rules. See ``docs/design/registry.md``
("Slow clients").
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from talos.core.ratelimit import RateLimiter
from talos.errors import ConfigurationError
from talos.registry.metrics import RegistryMetrics

__all__ = [
    "HEADER_TIMEOUT",
    "KEEP_ALIVE_TIMEOUT",
    "LOG_BURST",
    "LOG_INTERVAL",
    "MAX_CONNECTIONS",
    "REQUEST_TIMEOUT",
    "UVICORN_FLOODABLE",
    "ClientLimits",
    "ConnectionGuard",
    "guarded_protocol",
]

#: Seconds to send a request head (``talos registry serve --header-timeout``).
HEADER_TIMEOUT: Final = 10.0
#: Seconds to send a whole request, head and body (``--request-timeout``).
REQUEST_TIMEOUT: Final = 30.0
#: Open connections at most (``--max-connections``); well under the usual 1024 descriptors.
MAX_CONNECTIONS: Final = 512
#: Seconds an idle kept-alive connection stays open (``--keep-alive-timeout``; uvicorn's).
KEEP_ALIVE_TIMEOUT: Final = 5
#: Log lines per event (drop, refusal) at most ``LOG_BURST`` per ``LOG_INTERVAL`` seconds.
LOG_BURST: Final = 3
LOG_INTERVAL: Final = 10.0
#: uvicorn's own warnings, one per request, that any client can trigger: rate-limited the same way.
UVICORN_FLOODABLE: Final = frozenset({"Invalid HTTP request received."})


def _answer(status: str, text: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection (written before h11 knows a request)."""
    body = text.encode()
    lines = [
        f"HTTP/1.1 {status}",
        "content-type: text/plain; charset=utf-8",
        *headers,
        f"content-length: {len(body)}",
        "connection: close",
    ]
    return "".join(f"{line}\r\n" for line in lines).encode() + b"\r\n" + body


_REFUSED: Final = _answer("503 Service Unavailable", "too many connections", "retry-after: 1")
_TIMED_OUT: Final = _answer("408 Request Timeout", "request too slow")

log = logging.getLogger("talos.registry")


@dataclass(frozen=True)
class ClientLimits:
    """What the registry allows a client connection; checked once here.

    Raises:
        ConfigurationError: a timeout that is not a finite number > 0, a
            ``request_timeout`` shorter than ``header_timeout``, or a
            ``max_connections`` / ``keep_alive_timeout`` below 1.
    """

    header_timeout: float = HEADER_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    keep_alive_timeout: int = KEEP_ALIVE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("header_timeout", "request_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"{name} must be a finite number of seconds > 0")
        if self.request_timeout < self.header_timeout:
            raise ConfigurationError("request_timeout must be at least header_timeout")
        if self.max_connections < 1:
            raise ConfigurationError("max_connections must be 1 or more")
        if self.keep_alive_timeout < 1:
            raise ConfigurationError("keep_alive_timeout must be 1 second or more")


class ConnectionGuard:
    """The limits, and what happens when a client meets one: the metric and a log line."""

    def __init__(self, limits: ClientLimits, metrics: RegistryMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self._lines = RateLimiter(rate=LOG_BURST / LOG_INTERVAL, burst=LOG_BURST)
        self._unlogged: dict[str, int] = {}

    def opened(self) -> None:
        self.metrics.connections.inc()

    def closed(self) -> None:
        self.metrics.connections.dec()

    def refused(self, client: str | None, open_connections: int, now: float) -> None:
        self.metrics.connection_refused()
        self._log(
            "registry_connections_refused",
            now,
            "refused a connection from %s: %d connections open (--max-connections)",
            (client or "?", open_connections),
            {"address": client, "limit": self.limits.max_connections},
        )

    def dropped(self, reason: str, client: str | None, now: float) -> None:
        self.metrics.client_dropped(reason)
        seconds = (
            self.limits.header_timeout
            if reason == "header_timeout"
            else self.limits.request_timeout
        )
        self._log(
            "registry_client_dropped",
            now,
            "dropped a slow client %s: %s of %g s passed",
            (client or "?", reason, seconds),
            {"address": client, "reason": reason, "seconds": seconds},
        )

    def admit(self, key: str, now: float) -> int | None:
        """Whether a line of kind ``key`` may be logged at ``now``: how many were not
        logged since the last one, or ``None`` (this one is not logged either)."""
        if not self._lines.allow(key, now):
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return None
        return self._unlogged.pop(key, 0)

    def _log(
        self, event: str, now: float, message: str, args: tuple[Any, ...], fields: dict[str, Any]
    ) -> None:
        suppressed = self.admit(event, now)
        if suppressed is None:
            return
        if suppressed:
            message += " (%d more not logged)"
            args = (*args, suppressed)
        log.warning(
            message,
            *args,
            extra={"event": event, "peer_id": None, "suppressed": suppressed, **fields},
        )


def guarded_protocol(guard: ConnectionGuard) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol under ``guard``'s limits, for ``uvicorn.run(http=...)``.

    Also rate-limits the warnings uvicorn logs for any client that sends
    garbage (:data:`UVICORN_FLOODABLE`), like the guard's own lines.
    """

    class GuardedH11Protocol(_GuardedH11Protocol):
        _guard: ClassVar[ConnectionGuard] = guard

    logging.getLogger("uvicorn.error").addFilter(_FloodFilter(guard))
    return GuardedH11Protocol


class _FloodFilter(logging.Filter):
    """Lets a :data:`UVICORN_FLOODABLE` line through only when the guard admits it."""

    def __init__(self, guard: ConnectionGuard) -> None:
        super().__init__()
        self._guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in UVICORN_FLOODABLE:
            return True
        suppressed = self._guard.admit(str(record.msg), time.monotonic())
        if suppressed is None:
            return False
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more not logged)"
        return True


class _GuardedH11Protocol(H11Protocol):
    """One connection: the cap at accept, then one deadline timer at a time.

    The timer is the header deadline while the request head is incomplete,
    the request deadline while its body is, and none while the response is
    written or the connection idles (uvicorn's keep-alive timer does that).
    """

    _guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_reason = ""
        self._request_began = 0.0

    # -- the cap --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self._guard
        if len(self.connections) >= guard.limits.max_connections:
            self._refused = True
            transport.write(_REFUSED)
            transport.close()
            guard.refused(_address(transport), len(self.connections), self.loop.time())
            return
        super().connection_made(transport)
        guard.opened()
        self._begin_request()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel()
        self._guard.closed()
        super().connection_lost(exc)

    # -- the deadlines --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._timer is None and self.conn.their_state is h11.IDLE:
            self._begin_request()  # the first byte of the next request on this connection
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()  # a pipelined request may have been read from the buffer

    def _should_upgrade(self) -> bool:
        return False  # no WebSocket routes: an Upgrade header is ignored, not logged

    def _begin_request(self) -> None:
        self._request_began = self.loop.time()
        self._arm("header_timeout", self._request_began + self._guard.limits.header_timeout)

    def _follow(self) -> None:
        """Move the deadline along with the request: head → body → received."""
        state = self.conn.their_state
        if state is h11.IDLE:
            return
        if state is h11.SEND_BODY:
            if self._timer_reason != "request_timeout":
                if self._timer is None:  # a pipelined request: its first byte came earlier
                    self._request_began = self.loop.time()
                deadline = self._request_began + self._guard.limits.request_timeout
                self._arm("request_timeout", deadline)
            return
        self._cancel()

    def _arm(self, reason: str, when: float) -> None:
        self._cancel()
        self._timer = self.loop.call_at(when, self._expired)
        self._timer_reason = reason

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_reason = None, ""

    def _expired(self) -> None:
        reason = self._timer_reason
        self._timer, self._timer_reason = None, ""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # A request whose answer has begun (the app answered before reading the body)
        # gets no second one; otherwise the client learns why it is cut.
        answered = reason == "request_timeout" and self.cycle is not None
        if not (answered and self.cycle.response_started):
            transport.write(_TIMED_OUT)
        transport.close()
        self._guard.dropped(reason, _address(transport), self.loop.time())


def _address(transport: asyncio.BaseTransport) -> str | None:
    """The client's IP address (without the port), for the log."""
    remote = get_remote_addr(transport)  # type: ignore[arg-type]
    return None if remote is None else remote[0]
