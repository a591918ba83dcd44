"""The requester's rules for replies (talos.client.requests.OpenRequests)."""

from __future__ import annotations

import pytest

from talos.client.requests import REASONS, OpenRequests
from talos.core.message import Message, reply_message_id

ME, TOOLS, MALLORY = "did:talos:zMe", "did:talos:zTools", "did:talos:zMallory"
REQUEST = b"\x07" * 16
REPLY = reply_message_id(REQUEST, ME)

pytestmark = pytest.mark.asyncio


def answer(data: str = "ok") -> Message:
    return Message(sender=TOOLS, message_id=REPLY.hex(), data=data, sent_at=0.0)


async def test_the_reply_to_an_open_request_is_accepted_and_handed_over() -> None:
    table = OpenRequests(ME)
    waiting = table.open(REQUEST, TOOLS, expires_ms=1000)
    assert table.awaiting(TOOLS)
    assert not table.awaiting(MALLORY)
    assert table.judge(TOOLS, REPLY, REQUEST, now_ms=1000) is None
    assert table.answer(REQUEST, answer())
    assert waiting.result().data == "ok"
    assert not table.awaiting(TOOLS)


async def test_each_rule_names_its_refusal() -> None:
    table = OpenRequests(ME)
    table.open(REQUEST, TOOLS, expires_ms=1000)
    assert table.judge(TOOLS, REPLY, b"\x08" * 16, now_ms=0) == "unsolicited"
    assert table.judge(MALLORY, REPLY, REQUEST, now_ms=0) == "foreign"
    assert table.judge(TOOLS, b"\x09" * 16, REQUEST, now_ms=0) == "second"  # not the derived id
    assert table.judge(TOOLS, REPLY, REQUEST, now_ms=1001) == "expired"
    table.answer(REQUEST, answer())
    assert table.judge(TOOLS, REPLY, REQUEST, now_ms=0) == "second"
    assert table.judge(MALLORY, REPLY, REQUEST, now_ms=0) == "foreign"
    other = b"\x0a" * 16
    table.open(other, TOOLS, expires_ms=1000)
    table.end(other)  # request() gave up
    assert table.judge(TOOLS, reply_message_id(other, ME), other, now_ms=0) == "late"
    assert not table.answer(other, answer())
    assert set(REASONS) == {"unsolicited", "foreign", "second", "late", "expired"}


async def test_a_call_that_gave_up_gets_nothing() -> None:
    table = OpenRequests(ME)
    waiting = table.open(REQUEST, TOOLS, expires_ms=1000)
    waiting.cancel()
    assert not table.waits(REQUEST)
    assert not table.answer(REQUEST, answer())
