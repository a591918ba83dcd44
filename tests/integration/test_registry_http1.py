"""The registry client's HTTP/1.1 connections (talos.discovery.http1) on real sockets.

A scripted server (asyncio, in this process) stands for the registry where a
test needs it to misbehave: answer garbage, too much, nothing, or close the
connection. The real registry is used by every other test of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from talos.core.agent_id import agent_id_from_digest
from talos.discovery import http1
from talos.discovery.registry_http import MAX_RESPONSE, RegistryHttp, RegistryRejected
from talos.errors import MalformedFrame, PeerNotFound, RegistryUnavailable
from talos.testing.processes import RegistryProcess

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A server answering each request with ``answer(n)`` (n counts requests), and
    counting the connections it accepted."""

    def __init__(self, answer: Callable[[int], bytes], *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                writer.write(self.answer(len(self.requests)))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """``handler`` on a port of 127.0.0.1; its connections are ended on exit."""
    running: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        writers.append(writer)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up
        finally:
            writer.close()
            running.discard(task)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


def ok(body: bytes, *, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/cbor\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.asyncio
async def test_requests_share_one_kept_alive_connection() -> None:
    server = Scripted(lambda n: ok(b"answer %d" % n))
    async with serving(server.handle) as url:
        http = RegistryHttp(url)
        try:
            answers = [await http.get("/v1/agents/x/keylog") for _ in range(5)]
            assert await http.put("/v1/agents/x/record", b"\x01\x02") == b"answer 6"
        finally:
            await http.aclose()
    assert answers == [b"answer %d" % n for n in range(1, 6)]
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"GET /v1/agents/x/keylog HTTP/1.1\r\n")
    assert b"\r\nhost: 127.0.0.1:" in first.lower()
    assert server.requests[-1].endswith(b"\r\n\r\n\x01\x02")
    assert b"content-type: application/cbor" in server.requests[-1].lower()


@pytest.mark.asyncio
async def test_a_closed_or_closing_connection_is_not_reused() -> None:
    closing = Scripted(lambda n: ok(b"x", extra="connection: close\r\n"), close_after=True)
    async with serving(closing.handle) as url:
        http = RegistryHttp(url)
        try:
            for _ in range(3):
                assert await http.get("/v1/time") == b"x"
        finally:
            await http.aclose()
    assert closing.connections == 3

    dropping = Scripted(lambda n: ok(b"y"), close_after=True)  # no notice: it just closes
    async with serving(dropping.handle) as url:
        http = RegistryHttp(url)
        try:
            for _ in range(3):
                assert await http.get("/v1/time") == b"y"
                await asyncio.sleep(0.05)  # the close arrives before the next request
        finally:
            await http.aclose()
    assert dropping.connections == 3


@pytest.mark.asyncio
async def test_a_chunked_answer_is_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    server = Scripted(lambda n: chunked)
    async with serving(server.handle) as url:
        http = RegistryHttp(url)
        try:
            assert await http.get("/v1/time") == b"abcde"
            assert await http.get("/v1/time") == b"abcde"
        finally:
            await http.aclose()
    assert server.connections == 1


@pytest.mark.asyncio
async def test_statuses_mean_what_they_meant() -> None:
    def answer(n: int) -> bytes:
        error = json.dumps({"error": "StaleSequence", "reason": "older"}).encode()
        if n == 1:
            return b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}"
        return (
            f"HTTP/1.1 409 Conflict\r\ncontent-type: application/json\r\n"
            f"content-length: {len(error)}\r\n\r\n"
        ).encode() + error

    server = Scripted(answer)
    async with serving(server.handle) as url:
        http = RegistryHttp(url)
        try:
            with pytest.raises(PeerNotFound):
                await http.get("/v1/agents/x/keylog")
            with pytest.raises(RegistryRejected) as refused:
                await http.put("/v1/agents/x/keylog", b"log")
        finally:
            await http.aclose()
    assert (refused.value.status, refused.value.kind) == (409, "StaleSequence")


@pytest.mark.asyncio
async def test_a_failing_replica_is_replaced_by_the_next() -> None:
    failing = Scripted(lambda n: b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
    working = Scripted(lambda n: ok(b"from the second"))
    async with serving(failing.handle) as first, serving(working.handle) as second:
        http = RegistryHttp([first, second])
        try:
            assert await http.get("/v1/time") == b"from the second"
            assert http.current_url == second
        finally:
            await http.aclose()


@pytest.mark.asyncio
async def test_an_answer_too_large_is_refused_and_its_connection_closed() -> None:
    huge = MAX_RESPONSE + 1
    server = Scripted(
        lambda n: ok(b"z" * huge) if n == 1 else ok(b"small"),
    )
    async with serving(server.handle) as url:
        http = RegistryHttp(url)
        try:
            with pytest.raises(MalformedFrame, match="exceeds"):
                await http.get("/v1/agents/x/keylog")
            assert await http.get("/v1/time") == b"small"
        finally:
            await http.aclose()
    assert server.connections == 2


@pytest.mark.asyncio
async def test_silence_and_garbage_are_an_unreachable_registry() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    async with serving(silent) as url:
        http = RegistryHttp(url, timeout=0.2)
        try:
            with pytest.raises(RegistryUnavailable, match="TimeoutError"):
                await http.get("/v1/time")
        finally:
            await http.aclose()

    garbage = Scripted(lambda n: b"SMTP ready\r\n\r\n")
    async with serving(garbage.handle) as url:
        http = RegistryHttp(url)
        try:
            with pytest.raises(RegistryUnavailable, match="unreachable"):
                await http.get("/v1/time")
        finally:
            await http.aclose()

    http = RegistryHttp("http://127.0.0.1:9")  # nothing listens on the discard port
    try:
        with pytest.raises(RegistryUnavailable, match="unreachable"):
            await http.get("/v1/time")
    finally:
        await http.aclose()


@pytest.mark.asyncio
async def test_a_cancelled_request_closes_its_connection() -> None:
    """A request cancelled before its answer closes the connection (the server sees
    the end of it) and the next request opens a new one."""
    ended = asyncio.Event()
    connections = 0

    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        request = await reader.read(1 << 16)
        if connections == 1:
            if await reader.read(1) == b"":  # the client hung up
                ended.set()
            return
        assert request.startswith(b"GET ")
        writer.write(ok(b"second"))
        await writer.drain()

    async with serving(slow_first) as url:
        http = RegistryHttp(url)
        try:
            task = asyncio.ensure_future(http.get("/v1/time"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(ended.wait(), 2)
            assert await http.get("/v1/time") == b"second"
        finally:
            await http.aclose()
    assert connections == 2


@pytest.mark.asyncio
async def test_bytes_after_an_answer_are_never_the_next_answer() -> None:
    """A proxy may answer 408 on an idle kept-alive connection (or a server send more
    than asked): such a connection is closed, and the next request goes on a new one."""
    stray = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"
    connections = 0

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        mine = connections
        while await reader.readuntil(b"\r\n\r\n"):
            if mine == 1:
                writer.write(ok(b"first") + stray)  # in the same packet
            elif mine == 2:
                writer.write(ok(b"second"))
                await writer.drain()
                await asyncio.sleep(0.02)
                writer.write(stray)  # later, on the idle connection
            else:
                writer.write(ok(b"third"))
            await writer.drain()

    async with serving(chatty) as url:
        http = RegistryHttp(url)
        try:
            assert await http.get("/v1/time") == b"first"
            assert await http.get("/v1/time") == b"second"
            await asyncio.sleep(0.1)
            assert await http.get("/v1/time") == b"third"
        finally:
            await http.aclose()
    assert connections == 3


def test_only_plain_urls_without_a_proxy_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert http1.usable("http://127.0.0.1:8000")
    assert http1.usable("https://registry.example/prefix")
    assert not http1.usable("http://user:secret@registry.example")
    assert not http1.usable("ftp://registry.example")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert not http1.usable("https://registry.example")


@pytest.mark.asyncio
async def test_the_real_registry_answers_on_one_connection(registry: RegistryProcess) -> None:
    http = RegistryHttp(registry.url)
    try:
        assert http._pools[0] is not None  # this URL takes the small client
        for _ in range(3):
            assert json.loads(await http.get("/v1/time"))["time_ms"] > 0
        with pytest.raises(PeerNotFound):
            await http.get(f"/v1/agents/{agent_id_from_digest(bytes(32))}/keylog")
        assert len(http._pools[0]._idle) == 1
    finally:
        await http.aclose()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda status, head, body: b"HTTP/1.1 %d X\r\n" % status + head + b"\r\n\r\n" + body,
            st.integers(min_value=100, max_value=999),
            st.binary(max_size=80),
            st.binary(max_size=80),
        ),
    )
)
def test_any_answer_is_bytes_or_a_documented_error(answer: bytes) -> None:
    """Fuzz: whatever the server sends, the client returns a body or raises one of the
    registry client's documented errors (never h11's, asyncio's or the OS's)."""

    async def run() -> None:
        server = Scripted(lambda n: answer, close_after=True)
        async with serving(server.handle) as url:
            http = RegistryHttp(url, timeout=0.5)
            try:
                await http.get("/v1/time")
            except (RegistryUnavailable, PeerNotFound, RegistryRejected, MalformedFrame):
                pass
            finally:
                await http.aclose()

    asyncio.run(run())
