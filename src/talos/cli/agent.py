"""``talos run`` (the agent daemon) and the commands that talk to it.

``talos run`` keeps one :class:`~talos.client.TalosClient` running in the
foreground until SIGTERM or SIGINT. ``send``, ``inbox``, ``peers`` and
``status`` never open the agent's stores themselves: they ask the running
daemon through its **control socket**, ``<home>/control.sock``.

Control protocol (one request, one response, each a JSON object on one
line; several requests may share a connection)::

    {"op": "send", "peer", "text" | "json", "timeout", "retry_count", "on_failure",
     "capability"}            -> {"ok": true, "status", "message_id", "trace_id"}
    {"op": "inbox", "take": true, "limit": n, "wait": s}
                              -> {"ok": true, "messages": [...]}
    {"op": "status"}          -> {"ok": true, "status": {...}}
    {"op": "peers"}           -> {"ok": true, "peers": [...]}
    any failure               -> {"ok": false, "error": <class>, "message", "hint"}

Rules: a request is at most :data:`MAX_REQUEST` bytes; unknown ops and
fields, wrong types and out-of-range values are refused with an error
response, and nothing a client sends ends the daemon. The socket is mode
0600 inside the 0700 home. One daemon per home: an advisory lock
(``<home>/control.lock``, holding the pid) makes that race-free, and a
socket left by a crashed daemon is detected (nothing answers on it) and
replaced. ``inbox`` *takes* messages from the durable inbox, so each is
shown at most once (``docs/cli.md``, "Agent commands").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import talos.errors
from talos.cli.context import CliContext
from talos.cli.identity import key_passphrase_option
from talos.cli.lockfile import daemon_lock, running_agent_pid
from talos.cli.options import log_format_option
from talos.cli.passphrases import KEY_ENV, existing_passphrase
from talos.client import TalosClient
from talos.core.agent_id import check_agent_id
from talos.core.message import Message
from talos.errors import (
    AgentAlreadyRunning,
    AgentNotRunning,
    AgentUnresponsive,
    ConfigurationError,
    IdentityNotFound,
    MalformedFrame,
    TalosError,
)
from talos.logs import LogFormat, configure_logging

__all__ = [
    "AgentAlreadyRunning",
    "AgentNotRunning",
    "ControlServer",
    "inbox",
    "peers",
    "run",
    "running_agent_pid",
    "send",
    "status",
]

_log = logging.getLogger("talos.agent")
_err = Console(stderr=True, highlight=False, soft_wrap=True)

SOCKET_NAME: Final = "control.sock"
#: Largest request line (a maximal message, JSON-escaped, fits).
MAX_REQUEST: Final = 8 << 20
#: Largest response line the commands accept.
MAX_RESPONSE: Final = 32 << 20
#: An inbox response stops taking messages once it holds this many bytes.
INBOX_BATCH_BYTES: Final = 4 << 20
MAX_INBOX_LIMIT: Final = 1000
MAX_WAIT: Final = 30.0
#: Seconds ``inbox --follow`` lets the agent wait per request (also its Ctrl-C latency).
FOLLOW_WAIT: Final = 1.0
#: Seconds a command waits for the daemon beyond the operation's own timeout.
ANSWER_MARGIN: Final = 30.0
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_LEVELS = ("critical", "error", "warning", "info", "debug")
_SEND_FIELDS: Final = frozenset(
    {"op", "peer", "text", "json", "timeout", "retry_count", "on_failure", "capability"}
)
_INBOX_FIELDS: Final = frozenset({"op", "take", "limit", "wait"})


# -- the daemon side --------------------------------------------------------------------


def control_path(home: Path) -> Path:
    """``<home>/control.sock``, checked to fit in an AF_UNIX address.

    Raises:
        ConfigurationError: the path is too long for a Unix socket.
    """
    path = home / SOCKET_NAME
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigurationError(
            f"control socket path {path} is longer than {_SUN_PATH_MAX} bytes; use a shorter --home"
        )
    return path


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
                writer.write(_encode(response))
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
        result = await self._client.send(
            _peer(request),
            data,
            timeout=_number(request, "timeout", 30.0, low=0.001, high=86400.0),
            retry_count=_integer(request, "retry_count", 3, low=0, high=1000),
            on_failure=on_failure,
            capability=_optional_string(request, "capability"),
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

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, frozenset({"op"}))
        return {"status": {**self._client.status(), "pid": os.getpid()}}

    async def _peers(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, frozenset({"op"}))
        return {"peers": self._client.known_peers()}


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


def _encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":"), allow_nan=False).encode() + b"\n"


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
    return {
        "sender": message.sender,
        "message_id": message.message_id.hex(),
        "type": kind,
        "data": value,
        "sent_at": message.sent_at,
        "capability_id": None if message.capability_id is None else message.capability_id.hex(),
    }


def _claim_socket(path: Path) -> None:
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


def _configure_logging(level: str, fmt: LogFormat = "text") -> None:
    configure_logging(level=level, fmt=fmt)


def _parse_bootstrap(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, int]]:
    nodes = []
    for value in values:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise click.BadParameter(f"{value!r} is not HOST:PORT", ctx=ctx, param=param)
        nodes.append((host.strip("[]"), int(port)))
    return nodes


@click.command()
@click.option("--name", default=None, help="Name for a new identity, if the home has none.")
@click.option(
    "--registry",
    "registry_url",
    default=None,
    envvar="TALOS_REGISTRY_URL",
    help="Registry URL (else $TALOS_REGISTRY_URL; without one, no registry is used).",
)
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT to serve.")
@click.option(
    "--announce",
    default=None,
    metavar="HOST[:PORT]",
    help="Address peers are told to connect to (required with --listen 0.0.0.0:PORT); "
    "the port defaults to the one listened on.",
)
@click.option("--offline", is_flag=True, help="Queue every send; make no network attempt.")
@click.option(
    "--accept",
    type=click.Choice(["capability", "open"]),
    default="capability",
    show_default=True,
    help="'open' accepts messages without a capability (development only).",
)
@click.option(
    "--reconnect-interval",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Longest pause between delivery retries, in seconds.",
)
@click.option(
    "--queue-limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Most messages the outbox may hold.",
)
@click.option(
    "--dht-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Run a DHT node on this UDP port (0: any) as the registry's fallback.",
)
@click.option(
    "--dht-bootstrap",
    multiple=True,
    metavar="HOST:PORT",
    callback=_parse_bootstrap,
    help="A DHT node to join through (repeatable; implies DHT discovery).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics on this port (0: any).",
)
@click.option("--log-level", type=click.Choice(_LEVELS), default="info", show_default=True)
@log_format_option
@key_passphrase_option
@click.pass_obj
def run(
    ctx: CliContext,
    name: str | None,
    registry_url: str | None,
    listen: str,
    announce: str | None,
    offline: bool,
    accept: str,
    reconnect_interval: float,
    queue_limit: int,
    dht_port: int | None,
    dht_bootstrap: list[tuple[str, int]],
    metrics_port: int | None,
    log_level: str,
    log_format: LogFormat,
    key_passphrase_file: Path | None,
) -> None:
    """Run this home's agent in the foreground until SIGTERM or Ctrl-C.

    Prints one line (agent id and endpoint) on stdout when ready; logs go to
    stderr. Other commands reach it through <home>/control.sock.
    \f
    Raises:
        IdentityNotFound: the home has no identity and no --name was given.
        AgentAlreadyRunning: another agent serves this home.
        TalosError: the agent cannot start (its stores, the listen address).
    """
    home = ctx.agent_home
    if not home.has_identity() and name is None:
        raise IdentityNotFound(
            f"no identity in {home.path}; run `talos init --name NAME` or pass --name"
        )
    use_dht = dht_port is not None or bool(dht_bootstrap)
    if accept == "open":
        _err.print("[yellow]warning:[/] --accept open: messages are accepted without capability")
    passphrase = None
    if home.needs_passphrase():
        passphrase = existing_passphrase(key_passphrase_file, KEY_ENV, "Key")
    path = control_path(home.path)
    _configure_logging(log_level, log_format)
    home.ensure()
    with daemon_lock(home.path):
        _claim_socket(path)
        options: dict[str, Any] = {
            "home": home.path,
            "registry_url": registry_url,
            "listen": listen,
            "announce": announce,
            "offline_mode": offline,
            "accept_policy": accept,
            "reconnect_interval": reconnect_interval,
            "queue_limit": queue_limit,
            "discovery": ["registry", "dht"] if use_dht else ["registry"],
            "dht_port": dht_port or 0,
            "dht_bootstrap": dht_bootstrap,
            "metrics_port": metrics_port,
            "passphrase": passphrase,
            "clock": ctx.clock,
            "rng": ctx.rng,
        }
        asyncio.run(_daemon(name or home.path.name, options, path))


async def _daemon(name: str, options: dict[str, Any], path: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with TalosClient.create(name, **options) as client:
        server = ControlServer(client, path)
        await server.start()
        try:
            click.echo(f"agent {client.agent_id} listening on {client.endpoint}")
            if client.metrics.address is not None:
                click.echo("metrics on http://{}:{}/metrics".format(*client.metrics.address))
            sys.stdout.flush()
            _log.info("control socket %s; queue depth %d", path, client.queue_depth())
            await stop.wait()
            _log.info("stopping (queued messages stay queued)")
        finally:
            await server.close()


# -- the command side ---------------------------------------------------------------


def _call(home: Path, request: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """One request to the home's daemon; a refusal ends the command like a local error.

    Raises:
        AgentNotRunning: no daemon answers on the control socket.
        AgentUnresponsive: it did not answer in time, or not with JSON.
        ConfigurationError: the socket path is unusable.
    """
    path = control_path(home)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise AgentNotRunning(
                f"no Talos agent is running for home {home}; start one with `talos run`"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"cannot reach the agent at {path}: {exc}") from exc
        try:
            sock.sendall(_encode(request))
            with sock.makefile("rb") as stream:
                line = stream.readline(MAX_RESPONSE + 1)
        except TimeoutError:
            raise AgentUnresponsive(f"the agent did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise AgentUnresponsive(f"the connection to the agent failed: {exc}") from exc
    response = _parse_response(line)
    if response.get("ok") is not True:
        _refused(response)
    return response


def _parse_response(line: bytes) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise AgentUnresponsive("the agent closed the connection without a complete answer")
    try:
        response = json.loads(line)
    except ValueError:
        raise AgentUnresponsive("the agent's answer is not JSON") from None
    if not isinstance(response, dict):
        raise AgentUnresponsive("the agent's answer is not a JSON object")
    return response


def _refused(response: dict[str, Any]) -> None:
    """Print the daemon's error like a local one and exit with that error's code."""
    name = str(response.get("error", "TalosError"))
    text = f"[bold red]error:[/] {escape(name)}: {escape(str(response.get('message', '')))}"
    if response.get("hint"):
        text += f"\n  hint: {escape(str(response['hint']))}"
    _err.print(text, markup=True)
    click.get_current_context().exit(exit_code_for_name(name))


def exit_code_for_name(name: str) -> int:
    """The documented exit status for a Talos error known only by its class name."""
    from talos.cli.main import EXIT_CODES  # here: main imports this module

    kind = getattr(talos.errors, name, None)
    if not isinstance(kind, type) or not issubclass(kind, TalosError):
        return 1
    return next(code for family, code in EXIT_CODES if issubclass(kind, family))


@click.command()
@click.argument("peer")
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="TEXT is JSON; send the value it encodes.")
@click.option("--capability", default=None, metavar="TOKEN", help="Attach this capability.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.001, max=86400),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the peer's acknowledgement.",
)
@click.option("--retry-count", type=click.IntRange(0, 1000), default=3, show_default=True)
@click.option(
    "--on-failure",
    type=click.Choice(["queue", "raise"]),
    default="queue",
    show_default=True,
    help="Not acknowledged in time: keep it queued, or give up with an error.",
)
@click.pass_obj
def send(
    ctx: CliContext,
    peer: str,
    text: str,
    as_json: bool,
    capability: str | None,
    timeout: float,
    retry_count: int,
    on_failure: str,
) -> None:
    """Send TEXT to the agent PEER through the running agent.

    Prints the status (delivered or queued) and the message id; both exit 0.
    """
    request: dict[str, Any] = {
        "op": "send",
        "peer": peer,
        "timeout": timeout,
        "retry_count": retry_count,
        "on_failure": on_failure,
        "capability": capability,
    }
    if as_json:
        try:
            request["json"] = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="TEXT") from None
    else:
        request["text"] = text
    answer = _call(ctx.home, request, timeout=timeout + ANSWER_MARGIN)
    click.echo(f"{answer['status']} {answer['message_id']} (trace {answer['trace_id']})")
    if answer["status"] == "queued":
        _err.print(
            "[yellow]note:[/] not acknowledged yet; the agent keeps it queued and delivers it "
            "when the peer is reachable (see `talos status`)"
        )


class _Interrupt:
    """Defers SIGINT/SIGTERM to the end of the current request, so no taken message is lost."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # asked twice: stop now
            raise KeyboardInterrupt
        self.requested = True


@click.command()
@click.option("--follow", is_flag=True, help="Keep waiting for new messages until interrupted.")
@click.option(
    "--json", "as_json", is_flag=True, help="JSON output (one object per line with --follow)."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Take at most N messages.")
@click.pass_obj
def inbox(ctx: CliContext, follow: bool, as_json: bool, limit: int | None) -> None:
    """Take received messages from the agent's inbox and print them (each is shown once)."""
    if follow:
        _follow(ctx.home, as_json, limit)
    else:
        _drain(ctx.home, as_json, limit)


def _take(home: Path, limit: int, wait: float) -> list[dict[str, Any]]:
    request = {"op": "inbox", "take": True, "limit": min(limit, MAX_INBOX_LIMIT), "wait": wait}
    messages: list[dict[str, Any]] = _call(home, request, timeout=wait + ANSWER_MARGIN)["messages"]
    return messages


def _drain(home: Path, as_json: bool, limit: int | None) -> None:
    """Print what the inbox holds now (at most ``limit``), even if a later request fails."""
    taken: list[dict[str, Any]] = []
    try:
        while limit is None or len(taken) < limit:
            batch = _take(home, MAX_INBOX_LIMIT if limit is None else limit - len(taken), 0.0)
            if not batch:
                break
            taken += batch
    except BaseException:
        if taken:  # they are out of the inbox: show them before the error
            _show(taken, as_json)
        raise
    _show(taken, as_json)


def _show(messages: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(messages, indent=2, sort_keys=True))
        return
    for message in messages:
        _print_message(message, as_json=False)
    if not messages:
        _err.print("no messages")


def _follow(home: Path, as_json: bool, limit: int | None) -> None:
    """Print messages as they arrive until interrupted (or ``limit`` were shown)."""
    count = 0
    with _Interrupt() as interrupt:
        while not interrupt.requested and (limit is None or count < limit):
            wanted = MAX_INBOX_LIMIT if limit is None else limit - count
            for message in _take(home, wanted, FOLLOW_WAIT):
                _print_message(message, as_json)
                count += 1


def _print_message(message: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(message, sort_keys=True))
    else:
        when = datetime.fromtimestamp(message["sent_at"], UTC).isoformat(timespec="seconds")
        data = message["data"]
        shown = data if message["type"] == "text" else json.dumps(data)
        if message["type"] == "bytes":
            shown = f"<{len(base64.b64decode(data))} bytes, base64 {data}>"
        click.echo(f"{when}  {message['sender']}  {shown}")
    sys.stdout.flush()


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_obj
def peers(ctx: CliContext, as_json: bool) -> None:
    """List peers the running agent knows a verified record for."""
    rows: list[dict[str, Any]] = _call(ctx.home, {"op": "peers"}, timeout=ANSWER_MARGIN)["peers"]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        _err.print("no known peers")
        return
    table = Table("agent", "endpoint", "session", "connected", "record expires")
    for row in rows:
        expires = datetime.fromtimestamp(row["expires_ms"] / 1000, UTC)
        table.add_row(
            row["agent_id"],
            row["endpoint"],
            _yes(row["session"]),
            _yes(row["connected"]),
            expires.isoformat(timespec="seconds"),
        )
    Console(highlight=False, soft_wrap=True).print(table)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_obj
def status(ctx: CliContext, as_json: bool) -> None:
    """Show the running agent: queue depth, sessions, connections, registry reachability."""
    info: dict[str, Any] = _call(ctx.home, {"op": "status"}, timeout=ANSWER_MARGIN)["status"]
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    reachable = {True: "reachable", False: "DOWN", None: "not contacted yet"}
    registry = "none" if info["registry"] is None else info["registry"]
    if info["registry"] is not None:
        registry += f" ({reachable.get(info['registry_reachable'], '?')})"
    queued = ", ".join(f"{peer}: {n}" for peer, n in sorted(info["queued_by_peer"].items()))
    lines = [
        ("agent", info["agent_id"]),
        ("pid", str(info["pid"])),
        ("endpoint", info["endpoint"]),
        ("registry", registry),
        ("offline mode", _yes(info["offline_mode"])),
        ("queue depth", f"{info['queue_depth']}" + (f" ({queued})" if queued else "")),
        ("inbox depth", str(info["inbox_depth"])),
        ("sessions", str(len(info["sessions"]))),
        ("connected", ", ".join(info["connected"]) or "none"),
    ]
    for label, value in lines:
        click.echo(f"{label:<14}{value}")


def _yes(value: object) -> str:
    return "yes" if value else "no"
