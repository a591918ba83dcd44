"""A small HTTP/1.1 client for the registry: kept-alive connections over asyncio streams.

httpx costs an agent about 0.75 ms of CPU for a registry request that does
nothing (`docs/design/performance.md`, "What a registry request costs"),
and a first contact makes one on each side, on the path of its first
message. For the requests :class:`~talos.discovery.registry_http.RegistryHttp`
makes (small CBOR or JSON bodies, one registry per pool) this client does
the same work in about a third of that: h11 speaks the protocol (the same
parser httpx's transport uses), asyncio streams carry it, and finished
connections wait for the next request.

Rules it keeps:

* **Only where it behaves as httpx would.** :func:`usable` says whether a
  URL may use it: ``http`` or ``https``, no credentials in the URL, and no
  proxy configured in the environment (httpx honours ``HTTP_PROXY`` and
  friends; the registry client then keeps using httpx). TLS uses the
  context httpx builds (``httpx.create_ssl_context()``: certifi, or
  ``SSL_CERT_FILE``/``SSL_CERT_DIR``), with the host name checked.
* **Bounded.** An answer body larger than the caller's limit raises
  :class:`AnswerTooLarge` before more is read; a connection, each write and
  each read wait at most ``timeout`` seconds.
* **A connection is reused only when it is clean**: the answer was read to
  its end, both sides may keep the connection alive (h11 says so), nothing
  came after the answer (a proxy's ``408`` on an idle connection must never
  be taken for the next request's answer), the server has not closed it,
  and it has been idle for less than :data:`IDLE_LIMIT` seconds (uvicorn
  closes idle connections after five). Anything else (an error, a
  cancelled request, ``Connection: close``) closes it.
* **Failures are named, not mapped.** ``OSError`` (connection, TLS),
  ``TimeoutError`` and :class:`h11.ProtocolError` (a malformed answer)
  escape; :mod:`talos.discovery.registry_http` turns them into
  :class:`~talos.errors.RegistryUnavailable` as it does httpx's.

Imported by :mod:`talos.discovery.registry_http` only.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Final

import h11
import httpx

__all__ = ["IDLE_LIMIT", "MAX_IDLE", "AnswerTooLarge", "Http1Pool", "usable"]

#: Seconds a finished connection may wait for the next request.
IDLE_LIMIT: Final = 2.0
#: Finished connections kept per pool.
MAX_IDLE: Final = 4
_READ: Final = 65536


def _buffered(reader: asyncio.StreamReader) -> bool:
    """Whether bytes arrived on an idle connection (read into the stream's buffer by
    the event loop, unasked for). The stream has no public way to say so; if its
    buffer cannot be seen, the connection counts as unclean and is not reused."""
    return bool(getattr(reader, "_buffer", b"unknown"))


class AnswerTooLarge(Exception):
    """The answer's body exceeds the limit the caller gave (the connection is closed)."""


def usable(url: str) -> bool:
    """Whether requests to ``url`` may use this client (see the module's rules)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.username is not None or parts.password is not None:
        return False
    return not urllib.request.getproxies()


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


class Http1Pool:
    """Requests to one base URL (``scheme://host[:port][/prefix]``), on kept-alive connections."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"no host in {url!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        default = (self._tls and self._port == 443) or (not self._tls and self._port == 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = (host if default else f"{host}:{self._port}").encode("ascii")
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._ssl = httpx.create_ssl_context() if self._tls else None
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: list[tuple[str, str]],
        body: bytes | None,
        limit: int,
    ) -> tuple[int, bytes]:
        """Send ``method path`` (below the base URL's prefix); the answer's status and body.

        Raises:
            OSError: no connection, or it broke (TLS failures included).
            TimeoutError: connecting, a write or a read took longer than the timeout.
            h11.ProtocolError: the answer is not HTTP/1.1.
            AnswerTooLarge: the body is longer than ``limit`` bytes.
        """
        connection = self._reuse() or await self._connect()
        try:
            answer = await self._exchange(connection, method, path, headers, body, limit)
        except BaseException:
            connection.close()
            raise
        self._finished(connection)
        return answer

    async def aclose(self) -> None:
        """Close the waiting connections; later requests are refused."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        for connection in idle:
            try:
                await connection.writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass  # closing: what the peer does with the end of it is not ours

    # -- connections ---------------------------------------------------------------

    def _reuse(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            reader = connection.reader
            if reader.at_eof() or _buffered(reader) or now - connection.idle_since > IDLE_LIMIT:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ConnectionError("the registry client is closed")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
                limit=_READ,
            ),
            self._timeout,
        )
        return _Connection(reader, writer, h11.Connection(h11.CLIENT))

    def _finished(self, connection: _Connection) -> None:
        protocol = connection.protocol
        if (
            self._closed
            or len(self._idle) >= MAX_IDLE
            or protocol.our_state is not h11.DONE
            or protocol.their_state is not h11.DONE
            or protocol.trailing_data[0]  # bytes after the answer: not ours to guess at
        ):
            connection.close()
            return
        protocol.start_next_cycle()
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    # -- one exchange ----------------------------------------------------------------

    async def _exchange(
        self,
        connection: _Connection,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        limit: int,
    ) -> tuple[int, bytes]:
        protocol, writer = connection.protocol, connection.writer
        sent = [("Host", self._host_header.decode("ascii")), *headers]
        if body is not None:
            sent.append(("Content-Length", str(len(body))))
        request = h11.Request(method=method, target=self._prefix + path, headers=sent)
        data = protocol.send(request)
        if body:
            data += protocol.send(h11.Data(data=body))
        data += protocol.send(h11.EndOfMessage())
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self._timeout)
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = protocol.next_event()
            if event is h11.NEED_DATA:
                received = await asyncio.wait_for(connection.reader.read(_READ), self._timeout)
                protocol.receive_data(received)  # b"": the server closed (h11 then says so)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise AnswerTooLarge(f"answer exceeds {limit} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the registry closed the connection mid-answer")
            # InformationalResponse (1xx): wait for the final one
