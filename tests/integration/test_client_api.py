"""The developer-facing calls of TalosClient: fail fast on bad input, send without
waiting, follow outcomes, manage the outbox (list, cancel, expire), acknowledge off
the event loop, offline mode without network. Real sockets and LMDB; time is a
FakeClock where expiry is concerned."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import talos
from talos.audit import AuditLog
from talos.client import TalosClient
from talos.client import inbox as inbox_module
from talos.client.inbox import INLINE_ACKNOWLEDGEMENTS
from talos.core.agent_id import agent_id_from_digest
from talos.core.message import Message
from talos.errors import (
    CannotCancel,
    ConfigurationError,
    InvalidArgument,
    LocalProtocolError,
    MessageCancelled,
    MessageExpired,
    MessageNotFound,
    PeerNotFound,
    PeerUnknown,
)
from talos.storage.agent_state import AgentState
from talos.testing import FakeClock
from talos.testing.processes import RegistryProcess, free_port

pytestmark = pytest.mark.asyncio

#: A well-formed agent id nobody has (32 zero bytes).
NOBODY = "did:talos:z" + "1" * 32


def dropped_count(client: TalosClient, reason: str) -> float:
    """``talos_messages_dropped_total{reason=...}`` from the agent's ``/metrics`` over HTTP."""
    host, port = client.metrics.address or ("", 0)
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "talos_messages_dropped_total" and sample.labels == {
                "reason": reason
            }:
                return float(sample.value)
    raise AssertionError("no talos_messages_dropped_total")


def audit_entries(home: Path, kind: str) -> list[Any]:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        return log.query(kind=kind)


@asynccontextmanager
async def pair(tmp_path: Path, **alice: Any) -> AsyncIterator[tuple[TalosClient, TalosClient]]:
    """Alice and Bob introduced by contact cards, no registry; Alice's session open."""
    async with (
        TalosClient.create(
            "alice", home=tmp_path / "a", discovery=[], accept_policy="open", **alice
        ) as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        yield a, b


# -- the public API ---------------------------------------------------------------------


async def test_the_public_api_is_exported() -> None:
    for name in ("TalosClient", "Message", "SendResult", "MessageOutcome", "QueuedEntry"):
        assert name in talos.__all__
        assert getattr(talos, name).__name__ == name
    for name in ("DeliveryTimeout", "PeerRejected", "QueueFull", "InvalidArgument", "PeerUnknown"):
        assert issubclass(getattr(talos, name), talos.TalosError)
    assert issubclass(talos.InvalidArgument, ValueError)
    assert set(dir(talos)) >= set(talos.__all__)


async def test_message_ids_are_hex_text_on_both_sides(tmp_path: Path) -> None:
    async with pair(tmp_path) as (a, b):
        sent = await a.send(b.agent_id, "hi", timeout=10)
        got = await b.receive(timeout=10)
        assert got is not None
        assert isinstance(sent.message_id, str)
        assert isinstance(got.message_id, str)
        assert got.message_id == sent.message_id
        assert got.message_id_bytes == sent.message_id_bytes == bytes.fromhex(sent.message_id)


# -- fail fast ----------------------------------------------------------------------------

BAD_SENDS: list[tuple[str, dict[str, Any], str]] = [
    ("not-a-did", {}, "not an agent id"),
    ("did:talos:zO0", {}, "not an agent id"),
    (NOBODY, {"timeout": -1}, "timeout must be"),
    (NOBODY, {"timeout": 0}, "timeout must be"),
    (NOBODY, {"timeout": math.nan}, "timeout must be"),
    (NOBODY, {"timeout": math.inf}, "timeout must be"),
    (NOBODY, {"timeout": "3"}, "timeout must be a number"),
    (NOBODY, {"retry_count": -1}, "retry_count must be"),
    (NOBODY, {"retry_count": 1.5}, "retry_count must be an int"),
    (NOBODY, {"retry_count": True}, "retry_count must be an int"),
    (NOBODY, {"on_failure": "drop"}, "on_failure must be"),
    (NOBODY, {"wait": "no"}, "wait must be"),
    (NOBODY, {"expires_in": 0}, "expires_in must be"),
    (NOBODY, {"expires_in": -5}, "expires_in must be"),
    (NOBODY, {"expires_in": math.nan}, "expires_in must be"),
]


@pytest.mark.parametrize(("peer", "options", "said"), BAD_SENDS)
async def test_bad_send_arguments_fail_at_the_call_and_queue_nothing(
    tmp_path: Path, peer: str, options: dict[str, Any], said: str
) -> None:
    async with TalosClient.create("alice", home=tmp_path / "a", offline_mode=True) as a:
        with pytest.raises(InvalidArgument, match=said) as raised:
            await a.send(peer, "x", **options)
        assert isinstance(raised.value, ValueError)
        assert "nothing was queued" in raised.value.diagnostics()
        assert a.queue_depth() == 0
        assert a.outbox() == {}
    assert audit_entries(tmp_path / "a", "MESSAGE_SENT") == []


async def test_too_large_data_fails_at_the_call(tmp_path: Path) -> None:
    async with TalosClient.create("alice", home=tmp_path / "a", offline_mode=True) as a:
        with pytest.raises(LocalProtocolError, match="exceeds"):
            await a.send(NOBODY, b"\0" * (1 << 20), wait=False)
        assert a.queue_depth() == 0


async def test_bad_ids_and_timeouts_of_the_new_calls(tmp_path: Path) -> None:
    async with TalosClient.create("alice", home=tmp_path / "a", offline_mode=True) as a:
        queued = await a.send(NOBODY, "keep", wait=False)
        for bad in ("xyz", "00" * 15, b"\1" * 3, 12, None):
            with pytest.raises(InvalidArgument, match="message_id must be"):
                await a.cancel(bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="message_id must be"):
                await a.outcome(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="timeout must be"):
            await a.outcome(queued.message_id, timeout=-1)
        with pytest.raises(InvalidArgument, match="timeout must be"):
            await a.receive(timeout=math.nan)
        with pytest.raises(MessageNotFound):
            await a.cancel("ab" * 16)
        with pytest.raises(MessageNotFound):
            await a.outcome("ab" * 16)
        with pytest.raises(LocalProtocolError, match="auto_ack=False"):
            await a.acknowledge("not a message")  # type: ignore[arg-type]
        assert [e.message_id for e in a.outbox()[NOBODY]] == [queued.message_id]  # untouched


async def test_an_unknown_peer_is_reported_as_such_not_as_a_timeout(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    async with TalosClient.create("alice", home=tmp_path / "a", registry_url=registry.url) as a:
        started = time.monotonic()
        with pytest.raises(PeerUnknown, match="the registry does not know it"):
            await a.send(NOBODY, "hello?", timeout=30)
        assert time.monotonic() - started < 10  # answered, not timed out
        assert a.queue_depth() == 0
    async with TalosClient.create("carol", home=tmp_path / "c", discovery=[]) as c:
        with pytest.raises(PeerUnknown, match="not in the cache"):
            await c.send(NOBODY, "hello?", wait=False)
        assert c.queue_depth() == 0


async def test_a_peer_that_cannot_be_looked_up_now_is_queued(tmp_path: Path) -> None:
    """The registry is down: that is no answer about the peer, so the message waits."""
    down = f"http://127.0.0.1:{free_port()}"
    async with TalosClient.create("alice", home=tmp_path / "a", registry_url=down) as a:
        result = await a.send(NOBODY, "later", wait=False)
        assert result.status == "queued"
        assert a.queue_depth() == 1


async def test_a_port_in_use_is_a_configuration_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"listen=127.0.0.1:{port}"):
            await TalosClient.create("alice", home=tmp_path / "a", listen=f"127.0.0.1:{port}")
    # Nothing was left holding the home.
    async with TalosClient.create("alice", home=tmp_path / "a", discovery=[]):
        pass


# -- sending without waiting, outcomes ----------------------------------------------------


async def test_send_without_waiting_returns_queued_and_the_outcome_follows(
    tmp_path: Path,
) -> None:
    async with pair(tmp_path) as (a, b):
        result = await a.send(b.agent_id, {"tool": "search"}, wait=False)
        assert result.status == "queued"
        outcome = await asyncio.wait_for(a.outcome(result.message_id), 30)
        assert (outcome.state, outcome.peer, outcome.final) == ("delivered", b.agent_id, True)
        got = await b.receive(timeout=10)
        assert got is not None
        assert got.message_id == result.message_id
        assert await a.outcome(result.message_id_bytes) == outcome  # remembered
    # After a restart the outcome comes from the audit log.
    async with TalosClient.create("alice", home=tmp_path / "a", discovery=[]) as again:
        restored = await again.outcome(result.message_id)
        assert (restored.state, restored.peer) == ("delivered", b.agent_id)


async def test_an_outcome_not_reached_in_time_says_queued(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    async with TalosClient.create("a", home=tmp_path / "a", offline_mode=True, clock=clock) as a:
        result = await a.send(NOBODY, "x", wait=False)
        waiting = asyncio.ensure_future(a.outcome(result.message_id, timeout=5))
        await asyncio.sleep(0)
        clock.advance(6)
        outcome = await asyncio.wait_for(waiting, 10)
        assert (outcome.state, outcome.final) == ("queued", False)


# -- the outbox: list, cancel, expire -----------------------------------------------------


async def test_the_outbox_lists_queued_messages_per_peer_with_attempts_and_age(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=time.time())
    other = agent_id_from_digest(b"\2" * 32)
    async with TalosClient.create("a", home=tmp_path / "a", offline_mode=True, clock=clock) as a:
        first = await a.send(NOBODY, "one", wait=False)
        clock.advance(10)
        second = await a.send(other, "two", wait=False, expires_in=60)
        third = await a.send(NOBODY, "three", wait=False)
        clock.advance(2)
        listing = a.outbox()
    assert list(listing) == [NOBODY, other]
    assert [e.message_id for e in listing[NOBODY]] == [first.message_id, third.message_id]
    one, three = listing[NOBODY]
    assert (one.age, three.age) == (pytest.approx(12), pytest.approx(2))
    assert (one.attempts, one.last_attempt_age, one.expires_in) == (0, None, None)
    (two,) = listing[other]
    assert (two.message_id, two.expires_in) == (second.message_id, pytest.approx(58))
    assert two.size > len("two")


async def test_cancel_removes_a_queued_message_audited_and_reported(tmp_path: Path) -> None:
    async with TalosClient.create(
        "alice", home=tmp_path / "a", offline_mode=True, metrics_port=0
    ) as a:
        kept = await a.send(NOBODY, "keep", wait=False)
        dropped = await a.send(NOBODY, "drop", wait=False)
        waiting = asyncio.ensure_future(a.outcome(dropped.message_id))
        cancelled = await a.cancel(dropped.message_id)
        assert (cancelled.state, cancelled.peer) == ("cancelled", NOBODY)
        assert "after 0 attempt(s)" in (cancelled.reason or "")
        assert await asyncio.wait_for(waiting, 10) == cancelled
        assert await a.cancel(dropped.message_id) == cancelled  # twice: the same answer
        assert [e.message_id for e in a.outbox()[NOBODY]] == [kept.message_id]
        assert (dropped_count(a, "cancelled"), dropped_count(a, "expired")) == (1, 0)
    (entry,) = audit_entries(tmp_path / "a", "MESSAGE_CANCELLED")
    assert (entry.peer, entry.data["id"]) == (NOBODY, dropped.message_id_bytes)


async def test_a_delivered_message_cannot_be_cancelled(tmp_path: Path) -> None:
    async with pair(tmp_path) as (a, b):
        sent = await a.send(b.agent_id, "done", timeout=10)
        assert sent.status == "delivered"
        with pytest.raises(CannotCancel, match="was delivered already") as refused:
            await a.cancel(sent.message_id)
        assert refused.value.outcome.state == "delivered"  # type: ignore[attr-defined]
    assert audit_entries(tmp_path / "a", "MESSAGE_CANCELLED") == []


async def test_cancel_releases_a_send_that_waits(tmp_path: Path) -> None:
    """A send() waiting for an unreachable peer raises MessageCancelled when cancelled."""
    async with TalosClient.create(
        "bob", home=tmp_path / "b", discovery=[], accept_policy="open"
    ) as bob:
        card, bundle = bob.contact_card(), bob.get_prekey_bundle()
    async with TalosClient.create(
        "alice", home=tmp_path / "a", discovery=[], reconnect_interval=0.2
    ) as a:
        peer = a.add_contact(card)
        await a.establish_session(peer, bundle)
        sending = asyncio.ensure_future(a.send(peer, "nobody home", timeout=60))
        listed = await _queued(a, peer)
        await a.cancel(listed)
        with pytest.raises(MessageCancelled):
            await asyncio.wait_for(sending, 10)
        assert a.queue_depth() == 0


async def _queued(client: TalosClient, peer: str) -> str:
    """The id of the first message queued for ``peer``, once there is one."""
    for _ in range(1000):
        entries = client.outbox().get(peer)
        if entries:
            return entries[0].message_id
        await asyncio.sleep(0.01)  # the send() call commits on the next loop tick
    raise AssertionError("nothing was queued")


async def test_expired_messages_are_dropped_audited_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="talos")
    clock = FakeClock(start=time.time())
    home = tmp_path / "a"
    async with TalosClient.create(
        "a", home=home, offline_mode=True, clock=clock, metrics_port=0
    ) as a:
        short = await a.send(NOBODY, "short", wait=False, expires_in=5)
        long = await a.send(NOBODY, "long", wait=False, expires_in=50)
        kept = await a.send(NOBODY, "forever", wait=False)
        clock.advance(6)
        outcome = await asyncio.wait_for(a.outcome(short.message_id), 10)
        assert (outcome.state, outcome.peer) == ("expired", NOBODY)
        assert [e.message_id for e in a.outbox()[NOBODY]] == [long.message_id, kept.message_id]
        with pytest.raises(CannotCancel, match="expired already"):
            await a.cancel(short.message_id)
        assert (dropped_count(a, "expired"), dropped_count(a, "cancelled")) == (1, 0)
    assert any(getattr(r, "event", None) == "message_expired" for r in caplog.records)
    # The other expiry survives a restart: read back from the outbox.
    async with TalosClient.create("a", home=home, offline_mode=True, clock=clock) as again:
        clock.advance(50)
        outcome = await asyncio.wait_for(again.outcome(long.message_id), 10)
        assert outcome.state == "expired"
        assert [e.message_id for e in again.outbox()[NOBODY]] == [kept.message_id]
    expired = audit_entries(home, "MESSAGE_EXPIRED")
    assert [e.data["id"] for e in expired] == [short.message_id_bytes, long.message_id_bytes]


async def test_a_waiting_send_learns_its_message_expired(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    async with TalosClient.create(
        "bob", home=tmp_path / "b", discovery=[], accept_policy="open"
    ) as bob:
        card, bundle = bob.contact_card(), bob.get_prekey_bundle()
    async with TalosClient.create("alice", home=tmp_path / "a", discovery=[], clock=clock) as a:
        peer = a.add_contact(card)
        await a.establish_session(peer, bundle)
        sending = asyncio.ensure_future(a.send(peer, "soon stale", timeout=600, expires_in=3))
        await _queued(a, peer)
        clock.advance(4)
        with pytest.raises(MessageExpired):
            await asyncio.wait_for(sending, 10)


# -- receiving ------------------------------------------------------------------------


async def _received(a: TalosClient, b: TalosClient, count: int) -> list[Message]:
    """``count`` messages from a, received by b at least once (still in its inbox)."""
    for n in range(count):
        await a.send(b.agent_id, n, timeout=10)
    got = [await b.receive(timeout=10, auto_ack=False) for _ in range(count)]
    assert None not in got
    return got  # type: ignore[return-value]


async def _waiting(*acknowledgements: Awaitable[None]) -> list[asyncio.Future[None]]:
    """Start ``acknowledgements`` and let each reach its wait for a commit to carry it."""
    started = [asyncio.ensure_future(call) for call in acknowledgements]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not any(call.done() for call in started)
    return started


def _spy(state: AgentState, name: str) -> list[int]:
    """The threads that call ``state.<name>`` from now on (the real one still runs)."""
    threads: list[int] = []
    real = getattr(state, name)

    def spy(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args)

    setattr(state, name, spy)
    return threads


async def test_acknowledge_commits_a_large_batch_off_the_event_loop(tmp_path: Path) -> None:
    async with pair(tmp_path) as (a, b):
        got = await _received(a, b, INLINE_ACKNOWLEDGEMENTS)
        state = b._state  # noqa: SLF001 -- a spy on the real commit, to see its thread
        threads = _spy(state, "acknowledge")
        await b.acknowledge(*got)
        assert len(threads) == 1  # one commit
        assert threads[0] != threading.get_ident()
        assert state.inbox_count() == 0


@pytest.mark.parametrize("count", [1, INLINE_ACKNOWLEDGEMENTS - 1])
async def test_a_small_acknowledgement_with_nothing_to_ride_commits_alone(
    tmp_path: Path, count: int
) -> None:
    """No other commit within ACKNOWLEDGE_LINGER: one commit of its own, on the loop."""
    async with pair(tmp_path) as (a, b):
        got = await _received(a, b, count)
        state = b._state  # noqa: SLF001 -- spies on the real commits
        alone, in_thread = _spy(state, "flush"), _spy(state, "acknowledge")
        await b.acknowledge(*got)
        assert alone == [threading.get_ident()]
        assert in_thread == []
        assert state.inbox_count() == 0


async def test_a_small_acknowledgement_does_not_wait_for_a_test_clock(tmp_path: Path) -> None:
    """The linger is measured on the event loop's clock: an agent on a clock that
    stands still (FakeClock) still gets its acknowledgement committed."""
    clock = FakeClock(start=time.time())
    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], accept_policy="open") as a,
        TalosClient.create(
            "bob", home=tmp_path / "b", discovery=[], accept_policy="open", clock=clock
        ) as b,
    ):
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        [first] = await _received(a, b, 1)
        await asyncio.wait_for(b.acknowledge(first), 10)
        assert b._state.inbox_count() == 0  # noqa: SLF001


async def test_a_small_acknowledgement_rides_the_next_receive_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An application acknowledging a request as the next one arrives: the next
    receive commit removes it, no commit of its own, and acknowledge() returns
    only once that commit is durable."""
    monkeypatch.setattr(inbox_module, "ACKNOWLEDGE_LINGER", 60.0)  # only a ride ends it
    async with pair(tmp_path) as (a, b):
        [first] = await _received(a, b, 1)
        state = b._state  # noqa: SLF001 -- a spy on the commit it would make alone
        alone = _spy(state, "flush")
        [acknowledging] = await _waiting(b.acknowledge(first))
        assert state.inbox_count() == 1  # nothing removed before a commit carries it
        await a.send(b.agent_id, "next", timeout=10)
        await asyncio.wait_for(acknowledging, 10)
        assert alone == []
        assert [seq for seq, _ in state.inbox()] == [first.inbox_seq + 1]  # type: ignore[operator]
    async with TalosClient.create("bob", home=tmp_path / "b", discovery=[]) as b:
        message = await b.receive(timeout=0, auto_ack=False)
        assert message is not None
        assert message.data == "next"  # the acknowledged one is gone for good


async def test_a_commit_in_a_worker_thread_carries_a_small_acknowledgement_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large batches of removals and acknowledgements commit in worker threads: the
    acknowledgement waiting on the loop learns of that commit as well."""
    monkeypatch.setattr(inbox_module, "ACKNOWLEDGE_LINGER", 60.0)
    async with pair(tmp_path) as (a, b):
        [first] = await _received(a, b, 1)
        [acknowledging] = await _waiting(b.acknowledge(first))
        state = b._state  # noqa: SLF001 -- a commit made by another thread
        committing = threading.get_ident()

        def commit_elsewhere() -> int:
            state.flush()
            return threading.get_ident()

        assert await asyncio.to_thread(commit_elsewhere) != committing
        await asyncio.wait_for(acknowledging, 10)
        assert state.inbox_count() == 0


async def test_a_large_acknowledgement_of_rows_small_ones_wait_to_remove_removes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two small acknowledgements wait for a commit; a large one of the same messages
    commits them all (the waiting removals run first in its transaction, and it must
    not then count itself as removing nothing and throw them away)."""
    monkeypatch.setattr(inbox_module, "ACKNOWLEDGE_LINGER", 60.0)
    async with pair(tmp_path) as (a, b):
        got = await _received(a, b, INLINE_ACKNOWLEDGEMENTS)
        half = INLINE_ACKNOWLEDGEMENTS // 2
        small = await _waiting(b.acknowledge(*got[:half]), b.acknowledge(*got[half:]))
        await b.acknowledge(*got)  # eight: in a worker thread, carrying the two
        await asyncio.wait_for(asyncio.gather(*small), 10)
        assert b._state.inbox_count() == 0  # noqa: SLF001


async def test_a_cancelled_acknowledgement_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_module, "ACKNOWLEDGE_LINGER", 60.0)
    async with pair(tmp_path) as (a, b):
        [first] = await _received(a, b, 1)
        [acknowledging] = await _waiting(b.acknowledge(first))
        acknowledging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acknowledging
        await a.send(b.agent_id, "next", timeout=10)  # a commit it could have ridden
        assert b._state.inbox_count() == 2  # noqa: SLF001 -- the first one is still there


async def test_acknowledging_again_does_not_stop_the_commit_it_rides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An acknowledgement of a message already removed rides a receive commit that
    must still happen: removing nothing is not an error that aborts it."""
    async with pair(tmp_path) as (a, b):
        [first] = await _received(a, b, 1)
        await b.acknowledge(first)
        monkeypatch.setattr(inbox_module, "ACKNOWLEDGE_LINGER", 60.0)
        [again] = await _waiting(b.acknowledge(first))
        sent = await a.send(b.agent_id, "next", timeout=10)
        assert sent.status == "delivered"  # the receive commit it rode went through
        await asyncio.wait_for(again, 10)
        message = await b.receive(timeout=0, auto_ack=False)
        assert message is not None
        assert message.data == "next"


async def test_messages_offers_both_receive_modes(tmp_path: Path) -> None:
    async with pair(tmp_path) as (a, b):
        for n in range(2):
            await a.send(b.agent_id, n, timeout=10)
        stream = b.messages(auto_ack=False)
        first = await asyncio.wait_for(anext(stream), 10)
        assert b._state.inbox_count() == 2  # noqa: SLF001 -- still there until acknowledged
        await b.acknowledge(first)
        second = await asyncio.wait_for(anext(stream), 10)
        await stream.aclose()
        assert [first.data, second.data] == [0, 1]
        assert b._state.inbox_count() == 1  # noqa: SLF001
        taken = await asyncio.wait_for(anext(b.messages()), 10)  # auto_ack: taken out
        assert taken.data == 1
        assert b._state.inbox_count() == 0  # noqa: SLF001


# -- offline mode -----------------------------------------------------------------------


class RecordingServer:
    """A TCP server that records every connection made to it (and answers nothing)."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


async def test_offline_mode_touches_no_network(tmp_path: Path) -> None:
    recorder = RecordingServer()
    async with (
        recorder as url,
        TalosClient.create("alice", home=tmp_path / "a", registry_url=url, offline_mode=True) as a,
    ):
        queued = await a.send(NOBODY, "later", timeout=1)
        assert queued.status == "queued"
        with pytest.raises(PeerNotFound, match="offline"):
            await a.establish_session(NOBODY)
        assert a.status()["offline_mode"] is True
    assert recorder.connections == 0
