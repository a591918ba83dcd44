"""Setting up a session with a new peer: what runs side by side (issue 19).

A recording TCP proxy in this process sits in front of a real registry (or a
real agent's port) and notes when each connection's first bytes arrive and
when its first answer comes back. No timing is asserted: only which
requests overlapped and which connections exist before the first message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sent_frames import record_sent
from websockets.asyncio.client import connect

from talos.client import TalosClient, delivery
from talos.client.keylogs import MAX_PREFETCHING, PREFETCH_BURST, PREFETCH_GLOBAL_BURST
from talos.core import wire
from talos.core.agent_id import agent_id_from_digest
from talos.errors import CapabilityDenied, InvalidArgument, PeerUnreachable
from talos.storage.agent_state import AgentState
from talos.testing.processes import RegistryProcess, free_port

pytestmark = pytest.mark.asyncio

_NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
    b'content-length: 22\r\n\r\n{"detail":"Not Found"}'
)


class RecordingProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; notes each connection's first
    request line (HTTP) and the order of requests and answers, and holds each
    connection's first client bytes for ``hold`` seconds (so that requests made
    in series cannot overlap by chance). A request whose first line holds
    ``missing`` is answered 404 as a server without that route would (a
    registry older than the route)."""

    def __init__(
        self,
        target_port: int,
        *,
        hold: float = 0.0,
        missing: str | None = None,
        release: asyncio.Event | None = None,
    ) -> None:
        self.target_port = target_port
        self.hold = hold
        self.missing = missing
        #: When given: a client's bytes after its first request and its answer (a
        #: WebSocket's frames after its handshake) wait for this event.
        self.release = release
        #: ("request" | "answer", first request line) in the order they happened.
        self.events: list[tuple[str, str]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: Upstream writer -> the client's writer on the same connection.
        self._pairs: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def requests(self, needle: str) -> list[int]:
        """Positions in :attr:`events` of the requests whose first line has ``needle``."""
        return [
            i for i, (kind, line) in enumerate(self.events) if kind == "request" and needle in line
        ]

    def answer_of(self, needle: str) -> int:
        return next(
            i for i, (kind, line) in enumerate(self.events) if kind == "answer" and needle in line
        )

    def _client_writer(self, upstream: asyncio.StreamWriter) -> asyncio.StreamWriter:
        return self._pairs[upstream]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.add(up_writer)
        self._pairs[up_writer] = writer
        line = [""]
        for source, sink, outbound in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pump(source, sink, outbound, line))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        outbound: bool,
        line: list[str],
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                if outbound and self.release is not None and line[0] == "done":
                    await self.release.wait()
                if outbound:
                    first = data.split(b"\r\n", 1)[0].decode("latin-1")
                    if first.split(" ")[0] in ("GET", "PUT", "POST", "DELETE"):
                        line[0] = first
                        self.events.append(("request", first))
                        await asyncio.sleep(self.hold)
                        if self.missing is not None and self.missing in first:
                            writer = self._client_writer(sink)
                            writer.write(_NOT_FOUND)
                            await writer.drain()
                            continue
                elif line[0] and line[0] != "done":
                    self.events.append(("answer", line[0]))
                    line[0] = "done" if self.release is not None else ""
                sink.write(data)
                await sink.drain()
        sink.close()


@contextlib.asynccontextmanager
async def registry_behind_proxy(
    registry: RegistryProcess, **options: Any
) -> AsyncIterator[tuple[str, RecordingProxy]]:
    """A recording proxy (``options`` as RecordingProxy's) in front of the registry:
    its URL, and the proxy."""
    proxy = RecordingProxy(int(registry.url.rsplit(":", 1)[1]), **options)
    port = free_port()
    await proxy.start(port)
    try:
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        await proxy.close()


@contextlib.asynccontextmanager
async def bob_behind_proxy(
    tmp_path: Path, registry: RegistryProcess, **options: Any
) -> AsyncIterator[tuple[TalosClient, RecordingProxy]]:
    """Bob (open to anyone), announcing a recording proxy's port (``options`` as
    RecordingProxy's) in front of his own."""
    bob_port, proxy_port = free_port(), free_port()
    async with TalosClient.create(
        "bob",
        home=tmp_path / "b",
        registry_url=registry.url,
        listen=f"127.0.0.1:{bob_port}",
        announce=f"127.0.0.1:{proxy_port}",
        accept_policy="open",
    ) as bob:
        proxy = RecordingProxy(bob_port, **options)
        await proxy.start(proxy_port)
        try:
            yield bob, proxy
        finally:
            await proxy.close()


@pytest.mark.parametrize("establish_first", [True, False])
async def test_a_first_contact_is_one_registry_request(
    tmp_path: Path, registry: RegistryProcess, establish_first: bool
) -> None:
    """On first contact the peer's key log, a bundle and its record come in one
    request (/contact), whether the session is set up first or by the first
    send(): the session and the connection that follow ask the registry nothing."""
    async with registry_behind_proxy(registry) as (url, proxy):
        async with (
            TalosClient.create(
                "bob", home=tmp_path / "b", registry_url=registry.url, accept_policy="open"
            ) as bob,
            TalosClient.create("carol", home=tmp_path / "c", registry_url=url) as carol,
        ):
            proxy.events.clear()
            if establish_first:
                await carol.establish_session(bob.agent_id)
            sent = await carol.send(bob.agent_id, "first", timeout=10)
            assert sent.status == "delivered"
            about_bob = [line for kind, line in proxy.events if bob.agent_id in line]
            assert about_bob == [
                f"GET /v1/agents/{bob.agent_id}/contact HTTP/1.1",
                f"GET /v1/agents/{bob.agent_id}/contact HTTP/1.1",  # its answer
            ], proxy.events


async def test_without_contact_the_key_log_and_the_bundle_are_asked_for_side_by_side(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """A registry older than /contact (404 for the route): the key log and a prekey
    bundle are two requests, the bundle's made before the key log's answer is back,
    and the session is set up all the same."""
    async with registry_behind_proxy(registry, hold=0.2, missing="/contact") as (url, proxy):
        async with (
            TalosClient.create(
                "bob", home=tmp_path / "b", registry_url=registry.url, accept_policy="open"
            ) as bob,
            TalosClient.create("carol", home=tmp_path / "c", registry_url=url) as carol,
        ):
            proxy.events.clear()
            await carol.establish_session(bob.agent_id)
            keylog = f"/v1/agents/{bob.agent_id}/keylog"
            bundle = f"/v1/agents/{bob.agent_id}/bundle"
            assert proxy.requests("/contact"), proxy.events
            assert proxy.requests(keylog), proxy.events
            assert proxy.requests(bundle), proxy.events
            assert proxy.requests(bundle)[0] < proxy.answer_of(keylog), proxy.events
            sent = await carol.send(bob.agent_id, "first", timeout=10)
            assert sent.status == "delivered"


async def test_establish_session_opens_the_link_before_the_first_message(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """The connection to the peer is made right after X3DH, in the background; the
    first message then goes over it (one connection, opened before send())."""
    async with (
        bob_behind_proxy(tmp_path, registry) as (bob, proxy),
        TalosClient.create("carol", home=tmp_path / "c", registry_url=registry.url) as carol,
    ):
        await carol.establish_session(bob.agent_id)
        deadline = time.monotonic() + 10
        while proxy.connections < 1:  # noqa: ASYNC110 -- counted by the proxy
            assert time.monotonic() < deadline, "carol did not connect ahead"
            await asyncio.sleep(0.01)
        sent = await carol.send(bob.agent_id, "first", timeout=10)
        assert sent.status == "delivered"
        assert proxy.connections == 1
        received = await bob.receive(timeout=5)
        assert received is not None
        assert received.data == "first"


async def test_no_connection_is_started_once_the_client_is_closing(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """A connection asked for while the client closes (a witness loop waking up late,
    say) is refused at once: nothing connects after close() has begun."""
    async with bob_behind_proxy(tmp_path, registry) as (bob, proxy):
        carol = await TalosClient.create("carol", home=tmp_path / "c", registry_url=registry.url)
        deliverer = carol._drivers.deliverer  # noqa: SLF001 -- the loop a witness would use
        closing = asyncio.create_task(carol.close())
        await asyncio.sleep(0)  # close() has begun
        with pytest.raises(PeerUnreachable, match="closing"):
            await deliverer.link(bob.agent_id)
        await closing
        assert proxy.connections == 0


async def test_the_checkpoint_offer_follows_the_first_message(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """On a link carol opens, her audit checkpoint (witness work, a durable write at
    bob) goes out after the message that was waiting for the link, not before it."""
    async with (
        TalosClient.create(
            "bob", home=tmp_path / "b", registry_url=registry.url, accept_policy="open"
        ) as bob,
        TalosClient.create("carol", home=tmp_path / "c", registry_url=registry.url) as carol,
    ):
        frames = record_sent(carol)
        sent = await carol.send(bob.agent_id, "first", timeout=10)
        assert sent.status == "delivered"
        deadline = time.monotonic() + 10
        kinds: list[wire.EnvelopeType] = []
        while wire.EnvelopeType.CHECKPOINT not in kinds:
            assert time.monotonic() < deadline, f"no checkpoint offered; sent {kinds}"
            await asyncio.sleep(0.02)
            kinds = [wire.decode(frame).type for frame in frames]
        assert kinds.index(wire.EnvelopeType.INITIAL) < kinds.index(wire.EnvelopeType.CHECKPOINT)


async def test_the_handshake_starts_the_key_log_lookup(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """Carol's handshake names her (Talos-Agent): bob fetches her key log while her
    frames are still on their way (held here by the proxy), not after the first
    one arrives; the frames then verify and the message is delivered."""
    release = asyncio.Event()
    async with (
        bob_behind_proxy(tmp_path, registry, release=release) as (bob, _),
        TalosClient.create("carol", home=tmp_path / "c", registry_url=registry.url) as carol,
    ):
        sending = asyncio.ensure_future(carol.send(bob.agent_id, "first", timeout=20))
        deadline = time.monotonic() + 10
        while bob._drivers.peers.known_log(carol.agent_id) is None:
            assert time.monotonic() < deadline, "bob did not look carol's key log up"
            await asyncio.sleep(0.01)
        assert not sending.done()  # nothing of carol's but the handshake reached bob
        release.set()
        assert (await sending).status == "delivered"
        received = await bob.receive(timeout=5)
        assert received is not None
        assert received.data == "first"


async def test_names_in_handshakes_fetch_only_their_share(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """The handshake's name is unauthenticated: one remote address makes bob look up
    at most PREFETCH_BURST unknown agents, and a name that is no agent id none."""
    async with registry_behind_proxy(registry) as (url, proxy):
        async with TalosClient.create("bob", home=tmp_path / "b", registry_url=url) as bob:
            assert bob.endpoint is not None
            proxy.events.clear()
            names = [agent_id_from_digest(bytes([n]) * 32) for n in range(PREFETCH_BURST + 5)]
            for name in ["not an agent id", *names]:
                async with connect(bob.endpoint, additional_headers={"Talos-Agent": name}):
                    pass
            deadline = time.monotonic() + 10
            while len(proxy.requests("/keylog")) < PREFETCH_BURST:
                assert time.monotonic() < deadline, proxy.events
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            asked = proxy.requests("/keylog")
            assert len(asked) == PREFETCH_BURST, proxy.events
            assert all("not%20an" not in proxy.events[i][1] for i in asked)


async def test_lookups_ahead_are_bounded_over_all_addresses(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """However many addresses name unknown agents, at most MAX_PREFETCHING lookups run
    at once and PREFETCH_GLOBAL_BURST are made before the overall allowance refills."""
    async with registry_behind_proxy(registry) as (url, proxy):
        async with TalosClient.create("bob", home=tmp_path / "b", registry_url=url) as bob:
            proxy.events.clear()
            keylogs = bob._drivers.keylogs
            names = iter(agent_id_from_digest(bytes([n]) * 32) for n in range(200))
            for n in range(40):  # forty addresses, each well within its own share
                keylogs.prefetch(next(names), f"10.0.0.{n}")
            assert len(keylogs._prefetching) == MAX_PREFETCHING
            deadline = time.monotonic() + 10
            while keylogs._prefetching:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            for n in range(40, 80):
                keylogs.prefetch(next(names), f"10.0.0.{n}")
            while keylogs._prefetching:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert len(proxy.requests("/keylog")) == PREFETCH_GLOBAL_BURST, proxy.events


async def test_a_send_beside_establish_session_shares_one_first_contact(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """establish_session() and send() to the same new peer at once: one /contact
    request (one one-time prekey), and the message is delivered."""
    async with registry_behind_proxy(registry, hold=0.1) as (url, proxy):
        async with (
            TalosClient.create(
                "bob", home=tmp_path / "b", registry_url=registry.url, accept_policy="open"
            ) as bob,
            TalosClient.create("carol", home=tmp_path / "c", registry_url=url) as carol,
        ):
            proxy.events.clear()
            sent, _ = await asyncio.gather(
                carol.send(bob.agent_id, "first", timeout=10),
                carol.establish_session(bob.agent_id),
            )
            assert sent.status == "delivered"
            assert len(proxy.requests(f"/v1/agents/{bob.agent_id}/contact")) == 1, proxy.events


async def test_a_first_contact_with_no_commit_after_it_is_written_at_close(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """A first contact's cache rows wait for the next commit of the agent state; a
    send() refused after its look-up makes none, so close() writes them: the next
    start asks the registry only for a bundle."""
    async with registry_behind_proxy(registry) as (url, proxy):
        async with TalosClient.create(
            "bob", home=tmp_path / "b", registry_url=registry.url, accept_policy="open"
        ) as bob:
            # Granted by bob to another agent: it decodes, and is refused after the look-up.
            not_carols = await bob.grant(agent_id_from_digest(b"\x05" * 32), expires_in=600)
            async with TalosClient.create("carol", home=tmp_path / "c", registry_url=url) as carol:
                with pytest.raises(CapabilityDenied):
                    await carol.send(bob.agent_id, "first", capability=not_carols)
            assert [line for _, line in proxy.events if bob.agent_id in line] == [
                f"GET /v1/agents/{bob.agent_id}/contact HTTP/1.1",
                f"GET /v1/agents/{bob.agent_id}/contact HTTP/1.1",
            ]
            proxy.events.clear()
            async with TalosClient.create("carol", home=tmp_path / "c", registry_url=url) as carol:
                sent = await carol.send(bob.agent_id, "first", timeout=10)
                assert sent.status == "delivered"
            about_bob = {line for _, line in proxy.events if bob.agent_id in line}
            assert about_bob == {f"GET /v1/agents/{bob.agent_id}/bundle HTTP/1.1"}, proxy.events


async def test_a_capability_that_is_not_a_token_is_refused_before_the_look_up(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """send() checks its capability argument first: text that does not decode costs
    no registry request, so a new peer's one-time prekey is not spent on a call
    that cannot go on."""
    async with registry_behind_proxy(registry) as (url, proxy):
        async with TalosClient.create(
            "bob", home=tmp_path / "b", registry_url=registry.url, accept_policy="open"
        ) as bob:
            async with TalosClient.create("carol", home=tmp_path / "c", registry_url=url) as carol:
                proxy.events.clear()
                for bad in ("not a token", "tcap1.AAAA", b"tcap1.", 7):
                    with pytest.raises(InvalidArgument):
                        await carol.send(bob.agent_id, "first", capability=bad)  # type: ignore[arg-type]
                    with pytest.raises(InvalidArgument):
                        await carol.request(bob.agent_id, "q", timeout=5, capability=bad)  # type: ignore[arg-type]
                assert not [line for _, line in proxy.events if bob.agent_id in line]
                assert carol.outbox() == {}


async def test_the_first_message_after_establish_session_is_committed_once(
    tmp_path: Path, registry: RegistryProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send fast path takes a session still awaiting confirmation (one message at
    a time, carrying the handshake) on a link still opening: the first message's
    attempt and ratchet go with its enqueue, so the delivery loop commits nothing
    more before it leaves. Two at once wait for the loop (one in flight until the
    peer confirms), and arrive all the same."""
    counted: list[int] = []
    original = AgentState.record_attempts

    def counting(
        state: AgentState, peer: str, ids: list[bytes], now: float, *, session: bytes
    ) -> list[bytes]:
        counted.append(len(ids))
        return original(state, peer, ids, now, session=session)

    monkeypatch.setattr(AgentState, "record_attempts", counting)
    async with (
        TalosClient.create(
            "bob", home=tmp_path / "b", registry_url=registry.url, accept_policy="open"
        ) as bob,
        TalosClient.create("carol", home=tmp_path / "c", registry_url=registry.url) as carol,
        TalosClient.create("dave", home=tmp_path / "d", registry_url=registry.url) as dave,
    ):
        await carol.establish_session(bob.agent_id)
        sent = await carol.send(bob.agent_id, "first", timeout=10)
        assert sent.status == "delivered"
        assert counted == []
        second = await carol.send(bob.agent_id, "second", timeout=10)  # confirmed by now
        assert second.status == "delivered"
        assert counted == []

        await dave.establish_session(bob.agent_id)
        both = await asyncio.gather(
            dave.send(bob.agent_id, "a", timeout=10), dave.send(bob.agent_id, "b", timeout=10)
        )
        assert [result.status for result in both] == ["delivered", "delivered"]
        assert counted  # the delivery loop encrypted them
        received = [await bob.receive(timeout=5) for _ in range(4)]
        assert sorted(m.data for m in received if m is not None) == ["a", "b", "first", "second"]


async def test_a_message_handed_over_while_its_link_opens_is_due_from_its_sending(
    tmp_path: Path, registry: RegistryProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path hands the first message over while the link still opens; its ACK
    is due ACK_TIMEOUT after it actually leaves, not after the hand-over (else a slow
    connection fails a message that was delivered)."""
    monkeypatch.setattr(delivery, "ACK_TIMEOUT", 1.0)
    # Each connection's first bytes wait 1.5 s at the proxy in front of bob.
    async with (
        bob_behind_proxy(tmp_path, registry, hold=1.5) as (bob, _),
        TalosClient.create("carol", home=tmp_path / "c", registry_url=registry.url) as carol,
    ):
        await carol.establish_session(bob.agent_id)
        sent = await carol.send(
            bob.agent_id, "first", timeout=15, retry_count=0, on_failure="raise"
        )
        assert sent.status == "delivered"
