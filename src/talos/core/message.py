"""Application payloads: what ``send`` accepts and ``receive`` gives back.

``data`` may be ``bytes``, ``str`` or any JSON-able value. It is wrapped in a
small versioned CBOR map that records which it was, so the receiver gets
back the same type: ``{"v": 1, "k": "b" | "s" | "j", "d": bytes | text}``
(JSON values travel as their canonical JSON text, so they round-trip exactly
as JSON does). The wrapped bytes are what the ratchet encrypts.

Version 2 (request/reply, docs/design/request-reply.md) adds one key: a
request carries ``"rq"``, the time (Unix ms) until which the requester
accepts a reply; a reply carries ``"re"``, the 16-byte id of the request it
answers. Plain messages are still written as version 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from talos.core.encoding import (
    canonical_dumps,
    check_versioned_map,
    strict_loads,
    strict_versioned_map,
)
from talos.errors import LocalProtocolError, MalformedFrame

__all__ = [
    "MAX_PAYLOAD_SIZE",
    "Message",
    "Payload",
    "decode_payload",
    "decode_payload_fields",
    "encode_payload",
    "reply_message_id",
]

PAYLOAD_VERSION: Final = 1
#: The version of a request's or a reply's payload (one more key, ``rq`` or ``re``).
REQUEST_PAYLOAD_VERSION: Final = 2
_REQUEST_ID_SIZE: Final = 16
_MAX_MS: Final = 2**63 - 1
#: Largest application payload, leaving room for headers in a 1 MiB frame.
MAX_PAYLOAD_SIZE: Final = 900 * 1024
_FIELDS: Final = frozenset({"v", "k", "d"})
_REQUEST_FIELDS: Final = _FIELDS | {"rq"}
_REPLY_FIELDS: Final = _FIELDS | {"re"}
#: Deepest nesting of arrays and objects a JSON payload may have, either way.
#: Checked by counting, never by recursion, so it holds whatever the
#: interpreter's recursion limit is (a library may raise it process-wide).
MAX_JSON_DEPTH: Final = 128


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the application receives it.

    ``message_id`` is the sender's id of the message as lowercase hex text, the
    same form as :attr:`talos.SendResult.message_id` on the sending side (the
    bytes on the wire are :attr:`message_id_bytes`).
    """

    #: The sending agent's id (``did:talos:z…``), verified: the envelope is
    #: signed by a key of that agent's key log.
    sender: str
    #: The sender's id of the message, hex text; repeats carry the same one.
    message_id: str
    #: What was sent, as the type it was sent: ``bytes``, ``str`` or a JSON value.
    data: Any
    #: When the sender sent it, Unix seconds on the sender's clock.
    sent_at: float
    #: The id of the capability that authorized it (``None`` under
    #: ``accept_policy="open"`` when none was attached).
    capability_id: bytes | None = None
    #: Position in the durable inbox when received with ``auto_ack=False``.
    inbox_seq: int | None = None
    #: A request (sent with ``request()``): until when (Unix seconds) its sender
    #: accepts the one reply :meth:`reply` sends; ``None``: not a request.
    request_expires_at: float | None = None
    #: A reply: the id (hex) of the request it answers.
    in_reply_to: str | None = None
    #: A request this agent already answered: a copy handed out again (say, after a
    #: crash between :meth:`reply` and ``acknowledge()``). :meth:`reply` would send
    #: nothing new; an application can skip the work and just acknowledge it.
    replied: bool = False
    _replier: Callable[[Message, Any], Awaitable[Any]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def is_request(self) -> bool:
        """Whether the sender waits for a reply (:meth:`reply`)."""
        return self.request_expires_at is not None

    async def reply(self, data: Any) -> Any:
        """Answer this request with ``data`` (bytes, str or JSON-able); returns the
        reply's :class:`~talos.SendResult`. See ``TalosClient.reply``.

        Raises:
            LocalProtocolError: not a request, or not received through a client.
            RequestExpired: the request's expiry passed; nothing was sent.
            QueueFull: as ``TalosClient.send``.
        """
        if self._replier is None:
            raise LocalProtocolError(
                "this message is not a request (its sender used send(), not request())"
                if self.request_expires_at is None
                else "this message was not received through a TalosClient"
            )
        return await self._replier(self, data)

    @property
    def message_id_bytes(self) -> bytes:
        """The message id as the bytes the envelope carries (what ``message_id`` was
        before it became hex text)."""
        return bytes.fromhex(self.message_id)


@dataclass(frozen=True, slots=True)
class Payload:
    """A decoded payload: the data, and the request/reply fields of version 2."""

    data: Any
    #: A request: until when (Unix ms) a reply is accepted.
    request_expires_ms: int | None = None
    #: A reply: the id of the request it answers.
    reply_to: bytes | None = None


def reply_message_id(request_id: bytes, requester: str) -> bytes:
    """The message id of the reply to ``request_id`` (sent by ``requester``).

    Derived, not random: whatever happens on the replier's side (a crash
    between queueing the reply and recording it, ``reply()`` called again
    after a restart), a request has one reply id, and the requester's replay
    window drops any second copy.
    """
    digest = hashlib.sha256(b"talos/reply/v1\x00" + requester.encode() + b"\x00" + request_id)
    return digest.digest()[:_REQUEST_ID_SIZE]


def encode_payload(
    data: Any, *, request_expires_ms: int | None = None, reply_to: bytes | None = None
) -> bytes:
    """Wrap ``data`` (bytes, str or JSON-able) for encryption; a request (with
    ``request_expires_ms``) or a reply (with ``reply_to``) as version 2.

    Raises:
        LocalProtocolError: not bytes, str or JSON-able, or too large.
    """
    encoded = _encode_data(data)
    if request_expires_ms is None and reply_to is None:
        return encoded
    if request_expires_ms is not None and reply_to is not None:
        raise LocalProtocolError("a payload is a request or a reply, not both")
    body = strict_versioned_map(
        encoded, max_size=MAX_PAYLOAD_SIZE, fields=_FIELDS, version=PAYLOAD_VERSION, what="payload"
    )
    body["v"] = REQUEST_PAYLOAD_VERSION
    if request_expires_ms is not None:
        if type(request_expires_ms) is not int or not 0 <= request_expires_ms <= _MAX_MS:
            raise LocalProtocolError("a request's expiry must be Unix milliseconds")
        body["rq"] = request_expires_ms
    else:
        if type(reply_to) is not bytes or len(reply_to) != _REQUEST_ID_SIZE:
            raise LocalProtocolError(f"a reply names a {_REQUEST_ID_SIZE}-byte request id")
        body["re"] = reply_to
    return canonical_dumps(body)


def _encode_data(data: Any) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        body: dict[str, Any] = {"v": PAYLOAD_VERSION, "k": "b", "d": bytes(data)}
    elif isinstance(data, str):
        body = {"v": PAYLOAD_VERSION, "k": "s", "d": data}
    else:
        try:
            text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise LocalProtocolError(
                f"message data is not bytes, str or JSON-able: {exc}"
            ) from None
        if not json_depth_within(text, MAX_JSON_DEPTH):
            raise LocalProtocolError(f"message data nests deeper than {MAX_JSON_DEPTH} levels")
        body = {"v": PAYLOAD_VERSION, "k": "j", "d": text}
    try:
        encoded = canonical_dumps(body)
    except MalformedFrame as exc:
        raise LocalProtocolError(f"message data cannot be encoded: {exc}") from None
    if len(encoded) > MAX_PAYLOAD_SIZE:
        raise LocalProtocolError(f"message of {len(encoded)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return encoded


def decode_payload(raw: bytes) -> Any:
    """Unwrap a decrypted payload (version 1 or 2): its data.

    Raises:
        MalformedFrame, UnsupportedVersion: not a well-formed payload.
    """
    return decode_payload_fields(raw).data


def decode_payload_fields(raw: bytes) -> Payload:
    """Unwrap a decrypted payload with its request/reply fields.

    Raises:
        MalformedFrame, UnsupportedVersion: not a well-formed payload.
    """
    value = strict_loads(raw, max_size=MAX_PAYLOAD_SIZE)
    if type(value) is dict and value.get("v") == REQUEST_PAYLOAD_VERSION:
        fields = _REQUEST_FIELDS if "rq" in value else _REPLY_FIELDS
        body = check_versioned_map(
            value, fields=fields, version=REQUEST_PAYLOAD_VERSION, what="payload"
        )
        expires, reply_to = body.get("rq"), body.get("re")
        if expires is not None and (type(expires) is not int or not 0 <= expires <= _MAX_MS):
            raise MalformedFrame("a request's expiry must be Unix milliseconds")
        if reply_to is not None and (
            type(reply_to) is not bytes or len(reply_to) != _REQUEST_ID_SIZE
        ):
            raise MalformedFrame(f"a reply names a {_REQUEST_ID_SIZE}-byte request id")
        return Payload(_data(body), expires, reply_to)
    body = check_versioned_map(value, fields=_FIELDS, version=PAYLOAD_VERSION, what="payload")
    return Payload(_data(body))


def _data(body: dict[str, Any]) -> Any:
    kind, data = body["k"], body["d"]
    if kind == "b" and type(data) is bytes:
        return data
    if kind == "s" and type(data) is str:
        return data
    if kind == "j" and type(data) is str:
        if not json_depth_within(data, MAX_JSON_DEPTH):
            raise MalformedFrame(f"payload JSON nests deeper than {MAX_JSON_DEPTH} levels")
        try:
            return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
        except (ValueError, RecursionError):
            # A peer's JSON is held to what encode_payload sends: no NaN or
            # infinities (which the JSON text of a reply could not carry), and no
            # nesting deep enough to exhaust the parser's stack.
            raise MalformedFrame("payload JSON is not valid") from None
    raise MalformedFrame("payload kind and data do not match")


def json_depth_within(text: str, limit: int) -> bool:
    """Whether the arrays and objects of JSON ``text`` nest at most ``limit`` deep.

    Brackets inside strings do not count. Linear, without recursion; a text
    with fewer brackets than ``limit`` is accepted without a scan.
    """
    if text.count("[") + text.count("{") <= limit:
        return True
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} overflows a float")
    return value
