"""Floods of undecodable frames: the link is closed, its address throttled, the log
bounded, and a real peer's messages keep flowing (issue 13, item 1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.core import wire
from talos.storage.agent_state import AgentState
from talos.storage.home import AgentHome
from talos.testing import FakeClock
from talos.transport import Link, Transport

pytestmark = pytest.mark.asyncio


class Decoder:
    """A frame handler that, like the client, reports frames it cannot decode."""

    def __init__(self) -> None:
        self.good: list[bytes] = []
        self.closed_for: list[bool] = []

    async def __call__(self, link: Link, frame: bytes) -> None:
        if frame.startswith(b"ok"):
            self.good.append(frame)
        else:
            self.closed_for.append(link.reject_malformed())


async def refused_status(endpoint: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(endpoint):
            pass
    return refused.value.response.status_code


async def send_until_closed(socket: ClientConnection, frame: bytes | str, most: int) -> int:
    """Send ``frame`` until the server closes the link (or ``most`` were sent)."""
    sent = 0
    with contextlib.suppress(ConnectionClosed):
        while sent < most:
            await socket.send(frame)
            sent += 1
            await asyncio.sleep(0)
    await asyncio.wait_for(socket.wait_closed(), 10)
    return sent


async def test_a_link_past_its_budget_of_undecodable_frames_is_closed_and_its_address_throttled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    handler = Decoder()
    server = Transport(handler, malformed_burst=8, throttle_seconds=30.0, clock=clock)
    try:
        host, port = await server.listen("127.0.0.1", 0)
        endpoint = f"ws://{host}:{port}"
        with caplog.at_level(logging.WARNING, logger="talos.transport"):
            async with connect(endpoint) as flooder:
                await send_until_closed(flooder, b"\xff garbage", 10_000)
            assert flooder.close_code == 1008
            assert handler.closed_for[:9] == [False] * 8 + [True]
            assert server.closed_malformed == 1
            assert await refused_status(endpoint) == 429
            assert server.throttled == 1
        events = [getattr(r, "event", None) for r in caplog.records]
        assert events.count("link_closed_malformed") == 1
        assert events.count("link_throttled") == 1
        clock.advance(30.0)  # the throttle has run out: the address is let in again
        async with connect(endpoint) as again:
            await again.send(b"ok after the throttle")
            await asyncio.wait_for(_until(lambda: handler.good != []), 5)
    finally:
        await server.close()


async def test_a_text_frame_closes_the_link_at_once_with_1003_and_throttles(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Transport(Decoder(), clock=FakeClock())
    try:
        host, port = await server.listen("127.0.0.1", 0)
        endpoint = f"ws://{host}:{port}"
        with caplog.at_level(logging.WARNING, logger="talos.transport"):
            async with connect(endpoint) as talker:
                await talker.send("a text frame")
                await asyncio.wait_for(talker.wait_closed(), 10)
        assert talker.close_code == 1003
        assert server.closed_malformed == 1
        assert await refused_status(endpoint) == 429
        events = [getattr(r, "event", None) for r in caplog.records]
        assert {"malformed_frame", "link_closed_malformed", "link_throttled"} <= set(events)
    finally:
        await server.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (callers bound it with asyncio.wait_for)."""
    while not condition():  # noqa: ASYNC110 -- what it waits on has no event to await
        await asyncio.sleep(0.01)


async def flood(endpoint: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Garbage as fast as the link takes it, reconnecting whenever it is closed."""
    while not stop.is_set():
        try:
            async with connect(endpoint) as socket:
                counts["sent"] += await send_until_closed(socket, b"\x00" * 3, 1_000_000)
                counts["closed_1008"] += socket.close_code == 1008
        except InvalidStatus as refused:
            counts[str(refused.response.status_code)] += 1
            await asyncio.sleep(0.01)


async def test_a_garbage_flood_is_cut_off_while_a_real_peers_messages_flow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="talos")
    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], accept_policy="open") as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        # Alice's link is up before the flood: it shares the flooder's address
        # (127.0.0.1), and a throttled address gets no new links for a while.
        assert (await a.send(b.agent_id, "before", timeout=10)).status == "delivered"
        assert await b.receive(timeout=10) is not None
        stop = asyncio.Event()
        counts = {"sent": 0, "closed_1008": 0, "429": 0}
        flooder = asyncio.create_task(flood(b.endpoint, stop, counts))
        try:
            await asyncio.wait_for(_until(lambda: counts["closed_1008"] >= 1), 10)
            for n in range(30):  # while the flooder keeps coming back
                sent = await a.send(b.agent_id, f"message {n}", timeout=10)
                assert sent.status == "delivered"
            received = [await b.receive(timeout=10) for _ in range(30)]
            await asyncio.wait_for(_until(lambda: counts["429"] >= 3), 10)
        finally:
            stop.set()
            await flooder
        assert [m.data for m in received if m is not None] == [f"message {n}" for n in range(30)]
        metrics = b.metrics.render().decode()
    # The flooder's link was closed after its budget; its returns were refused
    # (for 10 s: a slow run may see it let in, and closed, once more).
    assert 1 <= counts["closed_1008"] <= 2
    assert re.search(r"talos_links_closed_malformed_total [12]\.0", metrics)
    flood_lines = [
        r
        for r in caplog.records
        if getattr(r, "event", None)
        in {"malformed_frame", "link_closed_malformed", "link_throttled"}
    ]
    assert counts["429"] >= 3
    # Each event's burst for one source, and a line per 10 s after it.
    assert len(flood_lines) <= 5 + 1 + 5 + 3
    assert len(caplog.records) < 200


def _signed(home: Path, envelope: wire.Envelope) -> bytes:
    return wire.seal(envelope, AgentHome(home).load_identity(passphrase=None).signing_key)


def _envelope(sender: str, recipient: str, n: int, timestamp_ms: int) -> wire.Envelope:
    return wire.Envelope(
        type=wire.EnvelopeType.MESSAGE,
        message_id=n.to_bytes(16, "big"),
        sender=sender,
        sender_instance=b"\x02" * 16,
        recipient=recipient,
        timestamp_ms=timestamp_ms,
        ratchet_header=b"h" * 40,
        ciphertext=b"c" * 40,
    )


async def test_a_replayed_refused_frame_cannot_fill_the_audit_log_or_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale frame is refused every time it comes (refusals do not enter the replay
    window), so a captured one replayed at will must not write an entry each time."""
    caplog.set_level(logging.INFO, logger="talos")
    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], accept_policy="open") as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        await a.send(b.agent_id, "hello", timeout=10)
        link = a._parts.deliverer.links[b.agent_id]
        day_old = int(time.time() * 1000) - 86_400_000
        frame = _signed(tmp_path / "a", _envelope(a.agent_id, b.agent_id, 1, day_old))
        for _ in range(200):
            await link.send(frame)
        await a.send(b.agent_id, "still here", timeout=10)  # ordered after the replays
    assert audit_kinds(tmp_path / "b").count("PEER_REJECTED") <= 25
    stale = [r for r in caplog.records if getattr(r, "event", None) == "stale_message"]
    assert 1 <= len(stale) <= 5


async def test_frames_for_another_agent_count_against_the_links_budget(tmp_path: Path) -> None:
    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], accept_policy="open") as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):
        now = int(time.time() * 1000)
        frames = [
            _signed(tmp_path / "a", _envelope(a.agent_id, a.agent_id, n, now)) for n in range(20)
        ]
        async with connect(b.endpoint) as socket:
            sent = 0
            with contextlib.suppress(ConnectionClosed):
                for frame in frames:
                    await socket.send(frame)
                    sent += 1
            await asyncio.wait_for(socket.wait_closed(), 10)
        assert socket.close_code == 1008
        assert "talos_frames_malformed_total 9.0" in b.metrics.render().decode()


def audit_kinds(home: Path) -> list[str]:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        return [entry.kind for entry in log.query()]


#: A flooder that never reads: it does not answer our close frame, it just writes.
_DEAF_FLOODER = """
import asyncio, sys, time
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

async def main(endpoint, seconds):
    end = time.monotonic() + seconds
    links = refused = 0
    while time.monotonic() < end:
        try:
            async with connect(endpoint) as ws:
                links += 1
                try:
                    while time.monotonic() < end:
                        await ws.send(b"\\x00\\x01")  # never yields to its reader
                except ConnectionClosed:
                    pass
        except InvalidStatus:
            refused += 1
            await asyncio.sleep(0.01)
    print(links, refused)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


async def test_a_flooder_that_never_reads_is_dropped_without_waiting_for_its_close() -> None:
    server = Transport(Decoder())
    try:
        host, port = await server.listen("127.0.0.1", 0)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _DEAF_FLOODER,
            f"ws://{host}:{port}",
            "4",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await server.close()
    links, refused = map(int, out.split())
    # Its link was dropped within seconds (not the 10 s a close handshake may
    # take), and every return was refused.
    assert links == 1
    assert refused >= 1
    assert server.closed_malformed == 1
