"""Application payloads: what ``send`` accepts and ``receive`` gives back.

``data`` may be ``bytes``, ``str`` or any JSON-able value. It is wrapped in a
small versioned CBOR map that records which it was, so the receiver gets
back the same type: ``{"v": 1, "k": "b" | "s" | "j", "d": bytes | text}``
(JSON values travel as their canonical JSON text, so they round-trip exactly
as JSON does). The wrapped bytes are what the ratchet encrypts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.errors import LocalProtocolError, MalformedFrame

__all__ = ["MAX_PAYLOAD_SIZE", "Message", "decode_payload", "encode_payload"]

PAYLOAD_VERSION: Final = 1
#: Largest application payload, leaving room for headers in a 1 MiB frame.
MAX_PAYLOAD_SIZE: Final = 900 * 1024
_FIELDS: Final = frozenset({"v", "k", "d"})
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

    @property
    def message_id_bytes(self) -> bytes:
        """The message id as the bytes the envelope carries (what ``message_id`` was
        before it became hex text)."""
        return bytes.fromhex(self.message_id)


def encode_payload(data: Any) -> bytes:
    """Wrap ``data`` (bytes, str or JSON-able) for encryption.

    Raises:
        LocalProtocolError: not bytes, str or JSON-able, or too large.
    """
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
    """Unwrap a decrypted payload.

    Raises:
        MalformedFrame, UnsupportedVersion: not a well-formed payload.
    """
    body = strict_versioned_map(
        raw, max_size=MAX_PAYLOAD_SIZE, fields=_FIELDS, version=PAYLOAD_VERSION, what="payload"
    )
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
