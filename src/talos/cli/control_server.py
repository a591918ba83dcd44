"""The daemon's side of the control socket: :class:`ControlServer`.

It answers the requests of :mod:`talos.cli.control` for one running
:class:`~talos.client.TalosClient`, checks every field of a request before
acting on it (a bad request gets an error response and never ends the
daemon), and turns received messages into JSON (:func:`message_json`).
:func:`claim_socket` replaces a socket left behind by a crashed daemon.
Only ``talos run`` (:mod:`talos.cli.daemon`) imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final, Literal

from talos.cli.control import (
    MAX_EXPIRES_IN,
    MAX_INBOX_LIMIT,
    MAX_REQUEST,
    MAX_RETRY_COUNT,
    MAX_SEND_TIMEOUT,
    MAX_WAIT,
    encode_line,
)
from talos.client import TalosClient
from talos.client.own_keys import Rotation
from talos.core.agent_id import check_agent_id
from talos.core.message import Message
from talos.errors import (
    AgentAlreadyRunning,
    ConfigurationError,
    MalformedFrame,
    TalosError,
    WrongPassphrase,
)
from talos.storage.home import AgentHome

__all__ = ["INBOX_BATCH_BYTES", "ControlServer", "claim_socket", "message_json"]

_log = logging.getLogger("talos.agent")

#: An inbox response stops taking messages once it holds this many bytes.
INBOX_BATCH_BYTES: Final = 4 << 20
_SEND_FIELDS: Final = frozenset(
    {
        "op",
        "peer",
        "text",
        "json",
        "timeout",
        "retry_count",
        "on_failure",
        "capability",
        "wait",
        "expires_in",
    }
)
_INBOX_FIELDS: Final = frozenset({"op", "take", "limit", "wait"})
_ROTATE_FIELDS: Final = frozenset({"op", "reason", "emergency", "revoke_old", "passphrase"})


class ControlServer:
    """Answers newline-delimited JSON requests for one client on an AF_UNIX socket."""

    def __init__(self, client: TalosClient, path: Path) -> None:
        self._client = client
        self._path = path
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "send": self._send,
            "inbox": self._inbox,
            "status": self._status,
            "peers": self._peers,
            "rotate": self._rotate,
            "outbox": self._outbox,
            "cancel": self._cancel,
        }

    async def start(self) -> None:
        """Listen on the socket path (which must not exist) with mode 0600.

        Raises:
            ConfigurationError: the socket cannot be created.
        """
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))
            os.chmod(self._path, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {self._path}: {exc}") from exc

    async def close(self) -> None:
        """Stop listening, end open connections and remove the socket file."""
        if self._server is not None:
            self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            async for line in _request_lines(reader):
                if line is None:
                    response = _failure(
                        "MalformedFrame",
                        f"request larger than {MAX_REQUEST} bytes",
                        MalformedFrame.hint,
                    )
                else:
                    response = await self.handle(line)
                writer.write(encode_line(response))
                await writer.drain()
        except ConnectionError:
            pass  # the command went away; nothing to answer
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def handle(self, line: bytes) -> dict[str, Any]:
        """The response to one request line; never raises (except cancellation)."""
        try:
            request = _parse_request(line)
            answer = self._ops.get(request["op"])
            if answer is None:
                raise ConfigurationError(
                    f"unknown op {request['op']!r}; expected one of {', '.join(sorted(self._ops))}"
                )
            return {"ok": True, **await answer(request)}
        except TalosError as exc:
            return _failure(type(exc).__name__, str(exc), exc.hint)
        except Exception as exc:  # the daemon outlives a bug in one request
            _log.exception("control request failed")
            return _failure("InternalError", str(exc), "see the agent's log (its stderr)")

    async def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, _SEND_FIELDS)
        if ("text" in request) == ("json" in request):
            raise ConfigurationError("give exactly one of 'text' and 'json'")
        data = request["text"] if "text" in request else request["json"]
        if "text" in request and not _is_text(data):
            raise ConfigurationError("'text' must be a string of Unicode text")
        mode = _string(request, "on_failure", "queue")
        if mode not in ("queue", "raise"):
            raise ConfigurationError("'on_failure' must be 'queue' or 'raise'")
        on_failure: Literal["queue", "raise"] = "raise" if mode == "raise" else "queue"
        expires_in = None
        if request.get("expires_in") is not None:
            expires_in = _number(request, "expires_in", 0.0, low=0.001, high=MAX_EXPIRES_IN)
        result = await self._client.send(
            _peer(request),
            data,
            timeout=_number(request, "timeout", 30.0, low=0.001, high=MAX_SEND_TIMEOUT),
            retry_count=_integer(request, "retry_count", 3, low=0, high=MAX_RETRY_COUNT),
            on_failure=on_failure,
            capability=_optional_string(request, "capability"),
            wait=_flag(request, "wait", True),
            expires_in=expires_in,
        )
        return {
            "status": result.status,
            "message_id": result.message_id,
            "trace_id": result.trace_id,
        }

    async def _inbox(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, _INBOX_FIELDS)
        if not _flag(request, "take", True):
            raise ConfigurationError("this agent can only take messages (take=true) for now")
        limit = _integer(request, "limit", 100, low=1, high=MAX_INBOX_LIMIT)
        wait = _number(request, "wait", 0.0, low=0.0, high=MAX_WAIT)
        messages: list[dict[str, Any]] = []
        size = 0
        message = await self._client.receive(timeout=wait)
        while message is not None:
            entry = message_json(message)
            messages.append(entry)
            size += len(json.dumps(entry))
            if len(messages) >= limit or size >= INBOX_BATCH_BYTES:
                break
            message = await self._client.receive(timeout=0)
        return {"messages": messages}

    async def _rotate(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, _ROTATE_FIELDS)
        emergency = _flag(request, "emergency", False)
        revoke_old = _flag(request, "revoke_old", False)
        reason = _optional_string(request, "reason")
        Rotation(reason=reason, emergency=emergency, revoke_old=revoke_old).check()
        home = AgentHome(self._path.parent)
        await _operator_knows_the_key(
            home, self._client.agent_id, _optional_string(request, "passphrase")
        )
        return await self._client.rotate_keys(
            reason=reason, emergency=emergency, revoke_old=revoke_old
        )

    async def _outbox(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, frozenset({"op"}))
        return {
            "outbox": {
                peer: [dataclasses.asdict(entry) for entry in entries]
                for peer, entries in self._client.outbox().items()
            }
        }

    async def _cancel(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, frozenset({"op", "message_id"}))
        outcome = await self._client.cancel(_string(request, "message_id", None))
        return {"outcome": dataclasses.asdict(outcome)}

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, frozenset({"op"}))
        return {"status": {**self._client.status(), "pid": os.getpid()}}

    async def _peers(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, frozenset({"op"}))
        return {"peers": self._client.known_peers()}


async def _operator_knows_the_key(home: AgentHome, agent_id: str, given: str | None) -> None:
    """A passphrase-protected key file must open with the passphrase the operator gave.

    The daemon holds the identity already; this proves the person asking for
    a rotation could have started it (docs/design/key-rotation.md). A home
    without a passphrase is protected by its 0600 local key, as the socket is.

    Raises:
        WrongPassphrase: none given, or it does not open the key file.
        ConfigurationError: the key file holds another agent.
    """
    if not home.needs_passphrase():
        return
    if given is None:
        raise WrongPassphrase(
            f"the key file {home.identity_path} is protected by a passphrase: give it to rotate"
        )
    try:
        passphrase = base64.b64decode(given, validate=True)
    except ValueError:
        raise ConfigurationError("'passphrase' must be base64") from None
    identity = await asyncio.to_thread(home.load_identity, passphrase=passphrase)
    if identity.agent_id != agent_id:
        raise ConfigurationError(f"the key file {home.identity_path} holds another agent")


async def _request_lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes | None]:
    """Request lines as they arrive; ``None`` for one longer than :data:`MAX_REQUEST`.

    An oversized line is dropped as it streams in (memory stays bounded) and
    answered once it ends, so the connection stays usable. Bytes after the
    last newline count as a request at end of input.
    """
    buffer = bytearray()
    oversized = False
    while chunk := await reader.read(1 << 16):
        searched = len(buffer)
        buffer += chunk
        end = buffer.find(b"\n", searched)
        while end >= 0:
            yield None if oversized else bytes(buffer[: end + 1])
            oversized = False
            del buffer[: end + 1]
            end = buffer.find(b"\n")
        if len(buffer) > MAX_REQUEST:
            oversized = True
            buffer.clear()
    if buffer.strip() or oversized:
        yield None if oversized else bytes(buffer)


def _parse_request(line: bytes) -> dict[str, Any]:
    """Decode one request line.

    Raises:
        MalformedFrame: not JSON, not an object, or without a string "op".
    """
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedFrame("request is not a JSON object on one line") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise MalformedFrame('request must be a JSON object with a string "op"')
    return request


def _failure(error: str, message: str, hint: str) -> dict[str, Any]:
    return {"ok": False, "error": error, "message": message, "hint": hint}


def _only(request: dict[str, Any], fields: frozenset[str]) -> None:
    extra = sorted(set(request) - fields)
    if extra:
        raise ConfigurationError(f"unknown field(s) for op {request['op']!r}: {', '.join(extra)}")


def _peer(request: dict[str, Any]) -> str:
    try:
        return check_agent_id(_string(request, "peer", None))
    except MalformedFrame:
        raise ConfigurationError("'peer' must be an agent id (did:talos:z...)") from None


def _string(request: dict[str, Any], name: str, default: str | None) -> str:
    value = request.get(name, default)
    if not isinstance(value, str):
        raise ConfigurationError(f"{name!r} must be a string")
    return value


def _optional_string(request: dict[str, Any], name: str) -> str | None:
    return None if request.get(name) is None else _string(request, name, None)


def _is_text(value: object) -> bool:
    """A str that UTF-8 can encode (JSON can carry lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _flag(request: dict[str, Any], name: str, default: bool) -> bool:
    value = request.get(name, default)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name!r} must be true or false")
    return value


def _integer(request: dict[str, Any], name: str, default: int, *, low: int, high: int) -> int:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name!r} must be an integer from {low} to {high}")
    return value


def _number(
    request: dict[str, Any], name: str, default: float, *, low: float, high: float
) -> float:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigurationError(f"{name!r} must be a number from {low:g} to {high:g}")
    return float(value)


def message_json(message: Message) -> dict[str, Any]:
    """A received message as JSON: bytes travel base64-encoded, tagged by ``type``."""
    data = message.data
    if isinstance(data, bytes):
        kind, value = "bytes", base64.b64encode(data).decode()
    elif isinstance(data, str):
        kind, value = "text", data
    else:
        kind, value = "json", data
        try:
            json.dumps(data, allow_nan=False)
        except (ValueError, RecursionError):
            # NaN or an infinity, which a non-conforming peer can send: strict JSON has
            # no such number, so the value travels as its (non-standard) JSON text.
            kind, value = "json-text", _json_text(data)
    return {
        "sender": message.sender,
        "message_id": message.message_id,
        "type": kind,
        "data": value,
        "sent_at": message.sent_at,
        "capability_id": None if message.capability_id is None else message.capability_id.hex(),
    }


def _json_text(data: Any) -> str:
    try:
        return json.dumps(data, sort_keys=True)
    except RecursionError:
        return "null"  # nested beyond what Python can encode; nothing to show


def claim_socket(path: Path) -> None:
    """Remove a stale socket at ``path``; refuse if a daemon answers on it.

    Raises:
        AgentAlreadyRunning: something accepts connections on it.
        ConfigurationError: ``path`` exists and is not a socket.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"{path} exists and is not a socket; move it away")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            _log.info("removing stale control socket %s", path)
            path.unlink(missing_ok=True)
            return
        except OSError:
            pass  # e.g. a timeout: something holds it; do not remove it
    raise AgentAlreadyRunning(f"another Talos agent is serving {path}")
