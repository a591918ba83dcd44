"""The WebSocket transport over real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from talos.errors import PeerUnreachable
from talos.testing import FakeClock
from talos.testing.processes import free_port
from talos.transport import Link, Transport
from talos.transport.link import FRAMES_PER_WRITE


class Inbox:
    """Collects frames; with ``verify`` it treats a frame ``b"v:NAME ..."`` as a message
    from NAME that passed every check (as the client does before committing it)."""

    def __init__(self, *, verify: bool = False) -> None:
        self.frames: asyncio.Queue[tuple[Link, bytes]] = asyncio.Queue()
        self._verify = verify

    async def __call__(self, link: Link, frame: bytes) -> None:
        if self._verify and frame.startswith(b"v:"):
            link.mark_verified(frame[2:].split()[0].decode())
        await self.frames.put((link, frame))

    async def next(self) -> tuple[Link, bytes]:
        return await asyncio.wait_for(self.frames.get(), 5)


@pytest.mark.asyncio
async def test_one_link_carries_frames_both_ways() -> None:
    a_in, b_in = Inbox(), Inbox()
    a, b = Transport(a_in), Transport(b_in)
    try:
        host, port = await b.listen("127.0.0.1", 0)
        link = await a.connect(f"ws://{host}:{port}")
        await link.send(b"\x00hello")
        inbound, frame = await b_in.next()
        assert frame == b"\x00hello"
        assert not inbound.outgoing
        await inbound.send(b"\x01reply")  # the same connection, the other direction
        back, frame = await a_in.next()
        assert back is link
        assert frame == b"\x01reply"
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("headers", "claimed"),
    [
        ([("Talos-Agent", "did:talos:zAlice")], "did:talos:zAlice"),
        ([], None),
        ([("Talos-Agent", "x" * 129)], None),  # longer than any agent id
        ([("Talos-Agent", "a"), ("Talos-Agent", "b")], None),  # which one?
    ],
)
async def test_an_admitted_handshake_tells_the_name_it_gives(
    headers: list[tuple[str, str]], claimed: str | None
) -> None:
    """on_hello gets the Talos-Agent handshake header (and the remote host) when there
    is exactly one short printable value, before the link exists; else nothing."""
    heard: list[tuple[str, str]] = []
    links: list[Link] = []
    server = Transport(Inbox())
    server.on_hello = lambda name, host: heard.append((name, host))
    server.on_link = links.append
    try:
        host, port = await server.listen("127.0.0.1", 0)
        async with connect(f"ws://{host}:{port}", additional_headers=headers):
            for _ in range(200):
                if links:
                    break
                await asyncio.sleep(0.01)
        assert len(links) == 1
        assert heard == ([] if claimed is None else [(claimed, "127.0.0.1")])
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_connect_names_the_connecting_agent() -> None:
    heard: list[str] = []
    a, b = Transport(Inbox()), Transport(Inbox())
    b.on_hello = lambda name, host: heard.append(name)
    a.on_hello = lambda name, host: heard.append("wrong side: " + name)
    try:
        host, port = await b.listen("127.0.0.1", 0)
        await a.listen("127.0.0.1", 0)
        link = await a.connect(f"ws://{host}:{port}", hello="did:talos:zCarol")
        await link.send(b"\x00hello")
        await asyncio.sleep(0.05)
        assert heard == ["did:talos:zCarol"]
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_unreachable_peer() -> None:
    transport = Transport(Inbox())
    try:
        with pytest.raises(PeerUnreachable, match="cannot connect"):
            await transport.connect(f"ws://127.0.0.1:{free_port()}")
    finally:
        await transport.close()


@pytest.mark.asyncio
async def test_closed_peer_makes_send_fail_cleanly() -> None:
    a, b = Transport(Inbox()), Transport(Inbox())
    host, port = await b.listen("127.0.0.1", 0)
    link = await a.connect(f"ws://{host}:{port}")
    await b.close()
    await asyncio.wait_for(link.closed.wait(), 5)
    with pytest.raises(PeerUnreachable):
        await link.send(b"x")
    with pytest.raises(PeerUnreachable):
        await link.send_many([b"x", b"y"])
    await a.close()


class _Writes:
    """Counts the writes handed to one connection's transport (the real transport
    does them; a ``writelines`` that calls ``write`` itself counts once)."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.calls = 0
        self._inside = False
        write, writelines = transport.write, transport.writelines

        def counted_write(data: bytes | bytearray | memoryview) -> None:
            self.calls += not self._inside
            write(data)

        def counted_writelines(chunks: Iterable[bytes | bytearray | memoryview]) -> None:
            self.calls += 1
            self._inside = True
            try:
                writelines(chunks)
            finally:
                self._inside = False

        transport.write = counted_write  # type: ignore[method-assign]
        transport.writelines = counted_writelines  # type: ignore[method-assign]


@pytest.mark.asyncio
async def test_a_batch_of_frames_arrives_whole_and_in_order_with_few_writes() -> None:
    inbox = Inbox()
    a, b = Transport(Inbox()), Transport(inbox)
    try:
        host, port = await b.listen("127.0.0.1", 0)
        link = await a.connect(f"ws://{host}:{port}")
        writes = _Writes(link._socket.transport)
        frames = [bytes([n]) * (n + 1) for n in range(20)]
        await link.send_many(frames)
        assert [(await inbox.next())[1] for _ in frames] == frames  # 20 messages, not 3
        assert writes.calls == -(-len(frames) // FRAMES_PER_WRITE)  # one write per group
        await link.send_many([])
        await link.send_many([b"alone"])
        assert (await inbox.next())[1] == b"alone"
        assert inbox.frames.empty()
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_oversized_frame_closes_the_link_not_the_listener() -> None:
    b_in = Inbox()
    a, b = Transport(Inbox()), Transport(b_in, max_frame=1024)
    try:
        host, port = await b.listen("127.0.0.1", 0)
        big = await a.connect(f"ws://{host}:{port}")
        await big.send(b"x" * 4096)
        await asyncio.wait_for(big.closed.wait(), 5)
        small = await a.connect(f"ws://{host}:{port}")
        await small.send(b"ok")
        _, frame = await b_in.next()
        assert frame == b"ok"
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_a_failing_handler_does_not_cut_the_peer_off() -> None:
    seen: list[bytes] = []

    async def fragile(link: Link, frame: bytes) -> None:
        seen.append(frame)
        if frame == b"boom":
            raise RuntimeError("handler bug")

    a, b = Transport(Inbox()), Transport(fragile)
    try:
        host, port = await b.listen("127.0.0.1", 0)
        link = await a.connect(f"ws://{host}:{port}")
        await link.send(b"boom")
        await link.send(b"after")
        for _ in range(100):
            if seen == [b"boom", b"after"]:
                break
            await asyncio.sleep(0.02)
        assert seen == [b"boom", b"after"]
        assert link.is_open
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_incoming_links_are_capped_and_outgoing_ones_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past max_incoming, handshakes get 503; closing one link frees a place."""
    server_in = Inbox()
    # Links here never verify, and are never old enough to be displaced.
    server = Transport(server_in, max_incoming=2, evictable_after=60.0)
    clients = [Transport(Inbox()) for _ in range(4)]
    try:
        host, port = await server.listen("127.0.0.1", 0)
        endpoint = f"ws://{host}:{port}"
        first = await clients[0].connect(endpoint)
        await clients[1].connect(endpoint)
        with caplog.at_level("WARNING", logger="talos.transport"):
            with pytest.raises(PeerUnreachable, match="503"):
                await clients[2].connect(endpoint)
        assert server.refused == 1
        assert [getattr(r, "event", None) for r in caplog.records] == ["connection_limit"]
        # The server's own outgoing link is not counted against the limit.
        other = Transport(Inbox())
        try:
            other_host, other_port = await other.listen("127.0.0.1", 0)
            await server.connect(f"ws://{other_host}:{other_port}")
        finally:
            await other.close()
        await first.close()
        for _ in range(50):
            if sum(1 for link in server._links if not link.outgoing) < 2:  # noqa: SLF001
                break
            await asyncio.sleep(0.02)
        late = await clients[3].connect(endpoint)
        await late.send(b"\x00in")
        _, frame = await server_in.next()
        assert frame == b"\x00in"
    finally:
        for transport in (server, *clients):
            await transport.close()


@pytest.mark.asyncio
async def test_one_remote_address_cannot_take_every_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past max_per_host links from one address, that address is refused (503) while
    another address still gets in."""
    server_in = Inbox()
    server = Transport(server_in, max_incoming=10, max_per_host=2, evictable_after=60.0)
    opened = []
    try:
        host, port = await server.listen("127.0.0.1", 0)
        endpoint = f"ws://{host}:{port}"
        for _ in range(2):
            opened.append(await connect(endpoint, local_addr=("127.0.0.2", 0)))
        with caplog.at_level("WARNING", logger="talos.transport"):
            with pytest.raises(InvalidStatus) as refused:
                await connect(endpoint, local_addr=("127.0.0.2", 0))
        assert refused.value.response.status_code == 503
        assert server.refused == 1
        assert [getattr(r, "remote", None) for r in caplog.records] == ["127.0.0.2"]
        other = await connect(endpoint, local_addr=("127.0.0.3", 0))  # another address
        opened.append(other)
        await other.send(b"\x00other")
        _, frame = await server_in.next()
        assert frame == b"\x00other"
    finally:
        for socket in opened:
            await socket.close()
        await server.close()


@pytest.mark.asyncio
async def test_an_unverified_incoming_link_is_closed_after_verify_within(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection that sends nothing verifiable loses its place; a verified one keeps it.
    On the real clock: the transport's own timer closes the links when they fall due."""
    server_in = Inbox(verify=True)
    server = Transport(server_in, verify_within=0.3)
    try:
        host, port = await server.listen("127.0.0.1", 0)
        endpoint = f"ws://{host}:{port}"
        with caplog.at_level("WARNING", logger="talos.transport"):
            peer = await connect(endpoint)  # opened first: it falls due first
            await peer.send(b"v:alice an accepted message")
            silent = await connect(endpoint)
            talker = await connect(endpoint)
            await talker.send(b"unverifiable")
            for _ in range(2):
                await server_in.next()
            await asyncio.wait_for(silent.wait_closed(), 5)
            await asyncio.wait_for(talker.wait_closed(), 5)
        assert server.unverified_closed == 2
        events = [getattr(r, "event", None) for r in caplog.records]
        assert events == ["unverified_link", "unverified_link"]
        # The peer opened before the two closed ones, so it is past verify_within too:
        # the verified link is still served.
        await peer.send(b"still here")
        _, frame = await server_in.next()
        assert frame == b"still here"
        await peer.close()
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_the_transports_clock_decides_when_an_unverified_link_is_due() -> None:
    """Link times come from the injected clock; moving it past verify_within makes the
    unverified link due (close_overdue applies the rule without waiting for the timer),
    never the verified one."""
    clock = FakeClock()
    clock.advance(100.0)
    server_in = Inbox(verify=True)
    server = Transport(server_in, verify_within=10.0, clock=clock)
    try:
        host, port = await server.listen("127.0.0.1", 0)
        endpoint = f"ws://{host}:{port}"
        silent = await connect(endpoint)
        peer = await connect(endpoint)
        await peer.send(b"v:alice an accepted message")
        await server_in.next()
        incoming = [link for link in server._links if not link.outgoing]  # noqa: SLF001
        assert sorted(link.opened_at for link in incoming) == [100.0, 100.0]
        assert [link.verified_at for link in incoming if link.verified] == [100.0]
        clock.advance(9.5)
        assert server.close_overdue() == 0
        clock.advance(0.5)
        assert server.close_overdue() == 1
        await asyncio.wait_for(silent.wait_closed(), 5)
        assert server.unverified_closed == 1
        clock.advance(1000.0)
        assert server.close_overdue() == 0
        await peer.send(b"still here")
        _, frame = await server_in.next()
        assert frame == b"still here"
        await peer.close()
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_a_flood_of_unverified_links_cannot_keep_a_peer_out() -> None:
    """Every place held by idle connections from one address after another: a newcomer
    displaces the oldest idle one; a verified peer is never displaced."""
    clock = FakeClock()
    server_in = Inbox(verify=True)
    server = Transport(
        server_in, max_incoming=3, evictable_after=0.1, verify_within=60.0, clock=clock
    )
    flood = []
    try:
        host, port = await server.listen("127.0.0.1", 0)
        endpoint = f"ws://{host}:{port}"
        for n in range(3):
            flood.append(await connect(endpoint, local_addr=(f"127.0.0.{10 + n}", 0)))
        clock.advance(0.15)
        peer = await connect(endpoint, local_addr=("127.0.0.3", 0))  # admitted, not 503
        await peer.send(b"v:alice hello")
        _, frame = await server_in.next()
        assert frame == b"v:alice hello"
        await asyncio.wait_for(flood[0].wait_closed(), 5)  # the oldest idle one went
        for n in range(4):  # the flood goes on: it only displaces itself
            clock.advance(0.15)
            flood.append(await connect(endpoint, local_addr=(f"127.0.0.{20 + n}", 0)))
        await peer.send(b"v:alice still here")
        _, frame = await server_in.next()
        assert frame == b"v:alice still here"
        assert server.unverified_closed == 5
        assert server.refused == 0
        # Two more peers take the last places held by the flood; with every place
        # verified, a newcomer is refused.
        clock.advance(0.15)
        peers = [peer]
        for n in range(2):
            peers.append(await connect(endpoint, local_addr=(f"127.0.0.{4 + n}", 0)))
            await peers[-1].send(f"v:peer{n} me too".encode())
            await server_in.next()
        with pytest.raises(InvalidStatus) as refused:
            await connect(endpoint, local_addr=("127.0.0.6", 0))
        assert refused.value.response.status_code == 503
        for one in peers:
            await one.close()
    finally:
        for socket in flood:
            await socket.close()
        await server.close()


@pytest.mark.asyncio
async def test_one_sender_keeps_only_its_newest_verified_links() -> None:
    """Verified links beyond max_verified_per_peer of one sender are displaceable (one
    identity cannot hold every place); another sender's link is not."""
    clock = FakeClock()
    server_in = Inbox(verify=True)
    server = Transport(
        server_in, max_incoming=3, evictable_after=0.1, max_verified_per_peer=1, clock=clock
    )
    try:
        host, port = await server.listen("127.0.0.1", 0)
        endpoint = f"ws://{host}:{port}"
        old = await connect(endpoint)
        await old.send(b"v:mallory one")
        await server_in.next()
        new = await connect(endpoint)
        await new.send(b"v:mallory two")
        await server_in.next()
        alice = await connect(endpoint)
        await alice.send(b"v:alice hi")
        await server_in.next()
        clock.advance(0.15)
        newcomer = await connect(endpoint)
        await asyncio.wait_for(old.wait_closed(), 5)  # mallory's older link went
        for socket, text in ((new, b"v:mallory three"), (alice, b"v:alice again")):
            await socket.send(text)
            _, frame = await server_in.next()
            assert frame == text
        for socket in (new, alice, newcomer):
            await socket.close()
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_a_request_that_is_no_handshake_displaces_nobody() -> None:
    """Places are only given up for a completed WebSocket handshake."""
    server = Transport(Inbox(), max_incoming=1, evictable_after=0.0)
    try:
        host, port = await server.listen("127.0.0.1", 0)
        held = await connect(f"ws://{host}:{port}")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status.split()[1] in (b"400", b"426")
        assert server.unverified_closed == 0
        await held.send(b"still open")
        await held.close()
    finally:
        await server.close()
