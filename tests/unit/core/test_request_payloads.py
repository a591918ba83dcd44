"""Payload version 2: requests (``rq``) and replies (``re``) in talos.core.message."""

from __future__ import annotations

from typing import Any

import pytest

from talos.core.encoding import canonical_dumps
from talos.core.message import (
    Message,
    decode_payload,
    decode_payload_fields,
    encode_payload,
    reply_message_id,
)
from talos.errors import LocalProtocolError, MalformedFrame, UnsupportedVersion

REQUEST_ID = bytes(range(16))


@pytest.mark.parametrize("data", [b"\x00bytes", "text", {"a": [1, 2.5, None]}])
def test_requests_and_replies_round_trip(data: Any) -> None:
    request = decode_payload_fields(encode_payload(data, request_expires_ms=1234))
    assert (request.data, request.request_expires_ms, request.reply_to) == (data, 1234, None)
    reply = decode_payload_fields(encode_payload(data, reply_to=REQUEST_ID))
    assert (reply.data, reply.request_expires_ms, reply.reply_to) == (data, None, REQUEST_ID)
    assert decode_payload(encode_payload(data, reply_to=REQUEST_ID)) == data


def test_plain_messages_stay_version_1() -> None:
    assert encode_payload("x") == canonical_dumps({"v": 1, "k": "s", "d": "x"})
    plain = decode_payload_fields(encode_payload("x"))
    assert (plain.request_expires_ms, plain.reply_to) == (None, None)


@pytest.mark.parametrize(
    "arguments",
    [
        {"request_expires_ms": 1, "reply_to": REQUEST_ID},
        {"request_expires_ms": -1},
        {"request_expires_ms": 2**63},
        {"request_expires_ms": True},
        {"reply_to": b"short"},
        {"reply_to": "not bytes"},
    ],
)
def test_bad_correlations_are_refused_when_encoding(arguments: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_payload("x", **arguments)


@pytest.mark.parametrize(
    "body",
    [
        {"v": 2, "k": "s", "d": "x"},  # version 2 without rq or re
        {"v": 2, "k": "s", "d": "x", "rq": 1, "re": REQUEST_ID},
        {"v": 2, "k": "s", "d": "x", "rq": -1},
        {"v": 2, "k": "s", "d": "x", "rq": "soon"},
        {"v": 2, "k": "s", "d": "x", "re": b"short"},
        {"v": 1, "k": "s", "d": "x", "rq": 1},  # version 1 has no rq
    ],
)
def test_malformed_correlations_are_malformed(body: dict[str, Any]) -> None:
    with pytest.raises(MalformedFrame):
        decode_payload_fields(canonical_dumps(body))


def test_a_later_payload_version_is_unsupported() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_payload(canonical_dumps({"v": 3, "k": "s", "d": "x", "rq": 1}))


def test_the_reply_id_is_derived_from_request_and_requester() -> None:
    first = reply_message_id(REQUEST_ID, "did:talos:zA")
    assert len(first) == 16
    assert first == reply_message_id(REQUEST_ID, "did:talos:zA")
    assert first != reply_message_id(REQUEST_ID, "did:talos:zB")
    assert first != reply_message_id(bytes(16), "did:talos:zA")


@pytest.mark.asyncio
async def test_a_message_that_is_not_a_request_cannot_be_answered() -> None:
    plain = Message(sender="did:talos:zA", message_id="00" * 16, data="x", sent_at=0.0)
    assert not plain.is_request
    with pytest.raises(LocalProtocolError, match="not a request"):
        await plain.reply("no")
    detached = Message(
        sender="did:talos:zA", message_id="00" * 16, data="x", sent_at=0.0, request_expires_at=9
    )
    assert detached.is_request
    with pytest.raises(LocalProtocolError, match="not received through"):
        await detached.reply("no")
