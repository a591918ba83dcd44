"""request()/reply() between two real agents (docs/design/request-reply.md).

Real sockets and LMDB files. The planner runs with the default accept
policy (a capability is required) and grants the tool server nothing: the
server's replies are authorized by the planner's own requests alone. The
tool server accepts anyone (``accept_policy="open"``), so no registry is
needed: the agents meet by contact cards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sent_frames import record_sent

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.client.receiving import UNSOLICITED_BURST, UNSOLICITED_RATE
from talos.client.sending import Correlation
from talos.core import wire
from talos.core.encoding import canonical_dumps
from talos.core.message import Message, reply_message_id
from talos.errors import (
    DeliveryTimeout,
    InvalidArgument,
    LocalProtocolError,
    PeerRejected,
    ReplyTimeout,
)
from talos.storage.agent_state import AgentState
from talos.testing.processes import free_port

pytestmark = pytest.mark.asyncio


def audit(home: Path, kind: str) -> list[Any]:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        return log.query(kind=kind)


def server_client(home: Path, port: int, name: str = "tools") -> Any:
    return TalosClient.create(
        name, home=home, discovery=[], accept_policy="open", listen=f"127.0.0.1:{port}"
    )


@asynccontextmanager
async def agents(tmp_path: Path) -> AsyncIterator[tuple[TalosClient, TalosClient]]:
    """A planner (capabilities required) and a tool server (open), introduced."""
    async with (
        TalosClient.create("planner", home=tmp_path / "planner", discovery=[]) as planner,
        server_client(tmp_path / "tools", free_port()) as tools,
    ):
        await introduce(planner, tools)
        yield planner, tools


async def introduce(planner: TalosClient, tools: TalosClient) -> None:
    planner.add_contact(tools.contact_card())
    tools.add_contact(planner.contact_card())
    await planner.establish_session(tools.agent_id, tools.get_prekey_bundle())


async def serve_once(tools: TalosClient, answer: Any) -> Message:
    request = await tools.receive(timeout=20)
    assert request is not None
    assert request.is_request
    await request.reply(answer)
    return request


async def forge_reply(tools: TalosClient, planner_id: str, request_id: bytes, data: Any) -> str:
    """What a misbehaving replier can send: any 'reply', past reply()'s own checks."""
    sent = await tools._drivers.sender.send(
        planner_id,
        data,
        timeout=10,
        retry_count=3,
        on_failure="queue",
        capability=None,
        wait=False,
        correlation=Correlation(
            message_id=reply_message_id(request_id, planner_id), reply_to=request_id
        ),
    )
    return sent.message_id


async def outcome_reason(client: TalosClient, message_id: str) -> str:
    outcome = await client.outcome(message_id, timeout=20)
    assert outcome.state == "failed", outcome
    return str(outcome.reason)


async def test_round_trip_without_a_grant_for_the_reply(tmp_path: Path) -> None:
    async with agents(tmp_path) as (planner, tools):
        server = asyncio.create_task(serve_once(tools, {"sum": 3}))
        reply = await planner.request(tools.agent_id, {"tool": "add", "args": [1, 2]}, timeout=20)
        request = await server
        assert (reply.sender, reply.data) == (tools.agent_id, {"sum": 3})
        assert reply.in_reply_to == request.message_id
        assert request.data == {"tool": "add", "args": [1, 2]}
        assert await planner.receive(timeout=0.2) is None  # the reply is not in the inbox
        # A plain message from the server is still refused: only replies need no grant.
        with pytest.raises(PeerRejected, match="capability"):
            await tools.send(planner.agent_id, "unsolicited chatter", timeout=10)
    assert [e.data["re"] for e in audit(tmp_path / "tools", "REPLY_SENT")] == [
        request.message_id_bytes
    ]
    assert len(audit(tmp_path / "tools", "REQUEST_RECEIVED")) == 1
    assert audit(tmp_path / "planner", "REPLY_REFUSED") == []


async def test_a_request_survives_a_restart_of_the_server(tmp_path: Path) -> None:
    """The server takes the request (at least once), stops without answering, starts
    again, finds the request in its inbox and answers it; the planner's call gets it."""
    port = free_port()
    async with TalosClient.create("planner", home=tmp_path / "planner", discovery=[]) as planner:
        tools = await server_client(tmp_path / "tools", port)
        await introduce(planner, tools)
        asking = asyncio.create_task(planner.request(tools.agent_id, "ping", timeout=60))
        first = await tools.receive(timeout=20, auto_ack=False)
        assert first is not None
        assert first.is_request
        await tools.close()  # before any reply: the request stays in the durable inbox
        async with server_client(tmp_path / "tools", port) as tools:
            again = await tools.receive(timeout=20, auto_ack=False)
            assert again is not None
            assert again.message_id == first.message_id
            assert again.is_request  # known from its REQUEST_RECEIVED entry
            await again.reply("pong")
            await tools.acknowledge(again)
            reply = await asking
            assert (reply.data, reply.in_reply_to) == ("pong", first.message_id)


async def test_a_request_handled_twice_gets_one_reply(tmp_path: Path) -> None:
    """An at-least-once server that crashes after replying handles the request again
    after its restart: the second reply() sends nothing and names the first reply."""
    port = free_port()
    async with TalosClient.create("planner", home=tmp_path / "planner", discovery=[]) as planner:
        tools = await server_client(tmp_path / "tools", port)
        await introduce(planner, tools)
        asking = asyncio.create_task(planner.request(tools.agent_id, "what time?", timeout=60))
        request = await tools.receive(timeout=20, auto_ack=False)
        assert request is not None
        first = await request.reply("noon")
        reply = await asking
        assert reply.data == "noon"
        await tools.close()  # never acknowledged: the request comes again
        async with server_client(tmp_path / "tools", port) as tools:
            again = await tools.receive(timeout=20, auto_ack=False)
            assert again is not None
            assert again.message_id == request.message_id
            second = await again.reply("one o'clock")
            assert second.message_id == first.message_id
            assert tools.queue_depth() == 0  # nothing was queued again
            await tools.acknowledge(again)
        assert await planner.receive(timeout=0.3) is None
    assert len(audit(tmp_path / "tools", "REPLY_SENT")) == 1
    assert len(audit(tmp_path / "planner", "MESSAGE_RECEIVED")) == 1


async def test_a_redelivered_request_is_not_handed_to_the_application_again(
    tmp_path: Path,
) -> None:
    async with agents(tmp_path) as (planner, tools):
        captured = record_sent(planner)
        server = asyncio.create_task(serve_once(tools, "done"))
        assert (await planner.request(tools.agent_id, "job", timeout=20)).data == "done"
        await server
        request_frame = next(
            f for f in captured if wire.decode(f).type is wire.EnvelopeType.INITIAL
        )
        await planner._drivers.deliverer.links[tools.agent_id].send(request_frame)
        assert await tools.receive(timeout=0.3) is None
    assert len(audit(tmp_path / "tools", "REPLAY_DROPPED")) == 1
    assert len(audit(tmp_path / "tools", "REPLY_SENT")) == 1


async def test_unsolicited_second_and_late_replies_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="talos")
    async with agents(tmp_path) as (planner, tools):
        # Three requests wait: a reply is judged (not refused unread) while the
        # planner waits on its sender. With none open, any message without a
        # capability is refused before it is decrypted (the first test).
        asking = [
            asyncio.create_task(planner.request(tools.agent_id, f"q{n}", timeout=30))
            for n in range(3)
        ]
        requests = {}
        for _ in range(3):
            got = await tools.receive(timeout=20)
            assert got is not None
            requests[got.data] = got
        # Unsolicited: a "reply" to a request the planner never sent.
        bogus = await forge_reply(tools, planner.agent_id, b"\x01" * 16, "made up")
        assert "no request of this agent" in await outcome_reason(tools, bogus)
        await requests["q0"].reply("a")
        assert (await asking[0]).data == "a"
        # Second: another reply to the same request (another id than the derived one).
        sent = await tools._drivers.sender.send(
            planner.agent_id,
            "b",
            timeout=10,
            retry_count=3,
            on_failure="queue",
            capability=None,
            wait=False,
            correlation=Correlation(reply_to=requests["q0"].message_id_bytes),
        )
        assert "reply already" in await outcome_reason(tools, sent.message_id)
        # Late: the requester gave up (cancelled its call) before the reply came.
        asking[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking[1]
        answer = await requests["q1"].reply("too late")
        assert "stopped waiting" in await outcome_reason(tools, answer.message_id)
        await requests["q2"].reply("c")
        assert (await asking[2]).data == "c"
        assert await planner.receive(timeout=0.2) is None
    reasons = [e.data["reason"] for e in audit(tmp_path / "planner", "REPLY_REFUSED")]
    assert sorted(reasons) == ["late", "second", "unsolicited"]
    assert sum(getattr(r, "event", None) == "reply_refused" for r in caplog.records) == 3


async def test_a_reply_from_another_agent_is_refused(tmp_path: Path) -> None:
    async with (
        agents(tmp_path) as (planner, tools),
        server_client(tmp_path / "mallory", free_port(), "mallory") as mallory,
    ):
        await introduce(planner, mallory)
        to_mallory = asyncio.create_task(planner.request(mallory.agent_id, "x", timeout=30))
        to_tools = asyncio.create_task(planner.request(tools.agent_id, "y", timeout=30))
        request = await tools.receive(timeout=20)
        assert await mallory.receive(timeout=20) is not None
        assert request is not None
        # Mallory (whom the planner does wait on) answers the request sent to tools.
        forged = await forge_reply(mallory, planner.agent_id, request.message_id_bytes, "mine")
        assert "another agent" in await outcome_reason(mallory, forged)
        await request.reply("theirs")
        assert (await to_tools).data == "theirs"
        to_mallory.cancel()
    assert [e.data["reason"] for e in audit(tmp_path / "planner", "REPLY_REFUSED")] == ["foreign"]


async def test_no_reply_in_time_and_no_delivery_in_time_are_told_apart(tmp_path: Path) -> None:
    async with agents(tmp_path) as (planner, tools):
        with pytest.raises(ReplyTimeout, match="delivered") as caught:
            await planner.request(tools.agent_id, "never answered", timeout=1)
        request = await tools.receive(timeout=5)
        assert request is not None
        assert caught.value.request_id == request.message_id
        assert caught.value.hint
        tools_id = tools.agent_id
    # The server is gone: the request itself is not acknowledged.
    async with TalosClient.create("planner", home=tmp_path / "planner", discovery=[]) as planner:
        with pytest.raises(DeliveryTimeout):
            await planner.request(tools_id, "anyone?", timeout=1)
        assert planner.queue_depth() == 0


async def test_bad_calls_are_refused_before_anything_is_queued(tmp_path: Path) -> None:
    async with agents(tmp_path) as (planner, tools):
        for bad in (-1, 0, float("nan"), float("inf"), "5", True):
            with pytest.raises(InvalidArgument):
                await planner.request(tools.agent_id, "x", timeout=bad)
        with pytest.raises(InvalidArgument):
            await planner.request("not-a-did", "x", timeout=5)
        with pytest.raises(InvalidArgument):
            await planner.request(tools.agent_id, "x", timeout=5, retry_count=-1)
        with pytest.raises(LocalProtocolError):
            await planner.request(tools.agent_id, object(), timeout=5)
        assert planner.queue_depth() == 0
        await planner.send(tools.agent_id, "plain", capability=None, timeout=10)
        plain = await tools.receive(timeout=10)
        assert plain is not None
        assert not plain.is_request
        with pytest.raises(LocalProtocolError, match="not a request"):
            await plain.reply("no")
        assert tools.queue_depth() == 0


async def test_a_frame_of_the_previous_wire_version_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="talos")
    async with agents(tmp_path) as (planner, tools):
        server = asyncio.create_task(serve_once(tools, "ok"))
        await planner.request(tools.agent_id, "warm up", timeout=20)
        await server
        envelope = wire.Envelope(
            type=wire.EnvelopeType.ACK,
            message_id=wire.new_message_id(planner._rng),
            sender=planner.agent_id,
            sender_instance=b"\x00" * 16,
            recipient=tools.agent_id,
            timestamp_ms=1,
            ref_ids=(b"\x02" * 16,),
            status=wire.AckStatus.ACCEPTED,
        )
        body = {**wire._to_map(envelope), "v": 2}
        signature = planner._own.current.signing_key.sign(
            wire.DOMAIN_PREFIX + canonical_dumps(body)
        )
        frame = canonical_dumps({**body, "sig": signature})
        await planner._drivers.deliverer.links[tools.agent_id].send(frame)
        # Frames on one link are handled in order: once the next request is answered,
        # the old frame was handled.
        server = asyncio.create_task(serve_once(tools, "still ok"))
        assert (await planner.request(tools.agent_id, "after", timeout=20)).data == "still ok"
        await server
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "malformed_frame"]
    assert any("envelope version 2 is not supported" in r.getMessage() for r in refusals)


async def test_a_reply_that_opens_a_new_session_reaches_its_request(tmp_path: Path) -> None:
    """The server lost its session with the planner: its reply is an X3DH INITIAL
    message, committed on its own (not batched), and still goes to the waiting call."""
    async with agents(tmp_path) as (planner, tools):
        asking = asyncio.create_task(planner.request(tools.agent_id, "ping", timeout=20))
        request = await tools.receive(timeout=20)
        assert request is not None
        await tools.reset_session(planner.agent_id)
        await tools.establish_session(planner.agent_id, planner.get_prekey_bundle())
        await request.reply("pong")
        reply = await asking
        assert (reply.data, reply.in_reply_to) == ("pong", request.message_id)
        assert await planner.receive(timeout=0.2) is None
    established = audit(tmp_path / "planner", "SESSION_ESTABLISHED")
    assert [e.data["role"] for e in established] == ["initiator", "responder"]


async def test_a_request_expiring_past_what_send_accepts_is_still_answered(
    tmp_path: Path,
) -> None:
    """A (modified) requester may name an expiry years ahead: reply() keeps the reply
    for as long as send() allows instead of raising InvalidArgument at every call."""
    async with agents(tmp_path) as (planner, tools):
        far = int((time.time() + 400 * 24 * 3600) * 1000)
        await planner._drivers.sender.send(
            tools.agent_id,
            "far",
            timeout=10,
            retry_count=3,
            on_failure="queue",
            capability=None,
            wait=True,
            correlation=Correlation(request_expires_ms=far),
        )
        request = await tools.receive(timeout=20)
        assert request is not None
        assert request.is_request
        sent = await request.reply("ok")
        assert sent.status == "queued"


async def test_capability_free_messages_that_are_not_replies_are_soon_refused_unread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the planner waits on the tool server, the server's messages without a
    capability are decrypted to see whether they are replies; past a burst of ones
    that are not, they are refused unread again (a flood costs no decryption)."""
    caplog.set_level(logging.INFO, logger="talos")
    async with agents(tmp_path) as (planner, tools):
        asking = asyncio.create_task(planner.request(tools.agent_id, "q", timeout=60))
        request = await tools.receive(timeout=20)
        assert request is not None
        sent = [
            await tools.send(planner.agent_id, f"chatter {n}", wait=False)
            for n in range(UNSOLICITED_BURST + 5)
        ]
        for result in sent:
            assert "no capability attached" in await outcome_reason(tools, result.message_id)
        throttled = [
            r for r in caplog.records if getattr(r, "event", None) == "unsolicited_throttled"
        ]
        assert throttled
        # Once the bucket refills (one a second), a real reply gets through again.
        await asyncio.sleep(2 / UNSOLICITED_RATE)
        await request.reply("answer")
        assert (await asking).data == "answer"


async def test_an_open_agent_logs_no_throttle_of_what_it_decrypts_anyway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An open agent decrypts every capability-free message: a peer it waits on that
    sends more bad replies than the budget gets each refused as before (judged, not
    unread), and nothing claims them refused unread (no ``unsolicited_throttled``)."""
    caplog.set_level(logging.INFO, logger="talos")
    async with (
        server_client(tmp_path / "asker", free_port(), "asker") as asker,
        server_client(tmp_path / "tools", free_port()) as tools,
    ):
        await introduce(asker, tools)
        asking = asyncio.create_task(asker.request(tools.agent_id, "q", timeout=60))
        request = await tools.receive(timeout=20)
        assert request is not None
        forged = [
            await forge_reply(tools, asker.agent_id, os.urandom(16), n)
            for n in range(UNSOLICITED_BURST + 5)
        ]
        for message_id in forged:
            assert "reply refused: no request" in await outcome_reason(tools, message_id)
        events = {getattr(r, "event", None) for r in caplog.records}
        assert "reply_refused" in events
        assert "unsolicited_throttled" not in events
        await request.reply("answer")
        assert (await asking).data == "answer"
