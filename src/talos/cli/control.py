"""The control protocol between ``talos run`` and the commands that talk to it.

A running agent listens on its home's **control socket**,
``<home>/control.sock`` (:func:`control_path`). This module owns the wire
side: the socket path, the limits, how a line is framed, and the client's
:func:`call`. The daemon's side is :mod:`talos.cli.control_server`.

One request, one response, each a JSON object on one line; several
requests may share a connection::

    {"op": "send", "peer", "text" | "json", "timeout", "retry_count", "on_failure",
     "capability"}            -> {"ok": true, "status", "message_id", "trace_id"}
    {"op": "inbox", "take": true, "limit": n, "wait": s}
                              -> {"ok": true, "messages": [...]}
    {"op": "status"}          -> {"ok": true, "status": {...}}
    {"op": "peers"}           -> {"ok": true, "peers": [...]}
    {"op": "rotate", "reason", "emergency", "revoke_old", "passphrase" (base64)}
                              -> {"ok": true, "agent_id", "sequence", "fingerprint"}
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

import json
import os
import socket
from pathlib import Path
from typing import Any, Final

import click
from rich.console import Console
from rich.markup import escape

from talos.cli.exit_codes import exit_code_for_name
from talos.errors import AgentNotRunning, AgentUnresponsive, ConfigurationError

__all__ = [
    "MAX_EXPIRES_IN",
    "MAX_INBOX_LIMIT",
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "MAX_RETRY_COUNT",
    "MAX_SEND_TIMEOUT",
    "MAX_WAIT",
    "SOCKET_NAME",
    "call",
    "control_path",
    "encode_line",
]

_err = Console(stderr=True, highlight=False, soft_wrap=True)

SOCKET_NAME: Final = "control.sock"
#: Largest request line (a maximal message, JSON-escaped, fits).
MAX_REQUEST: Final = 8 << 20
#: Largest response line the commands accept.
MAX_RESPONSE: Final = 32 << 20
#: Most messages one ``inbox`` request may take.
MAX_INBOX_LIMIT: Final = 1000
#: Longest ``timeout`` of a ``send`` request, in seconds.
MAX_SEND_TIMEOUT: Final = 86400.0
#: Most ``retry_count`` of a ``send`` request.
MAX_RETRY_COUNT: Final = 1000
#: Longest ``expires_in`` of a ``send`` request, in seconds (a year, as the library's).
MAX_EXPIRES_IN: Final = 365 * 24 * 3600.0
#: Longest ``wait`` of an ``inbox`` request, in seconds.
MAX_WAIT: Final = 30.0
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


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


def encode_line(obj: dict[str, Any]) -> bytes:
    """One request or response as a compact JSON line."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def call(home: Path, request: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """One request to the home's daemon; a refusal ends the command like a local error.

    The daemon's error is printed on stderr and the command exits with that
    error's status (:func:`~talos.cli.exit_codes.exit_code_for_name`).

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
            sock.sendall(encode_line(request))
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
