"""``send``, ``inbox``, ``peers`` and ``status``: the commands that ask the running agent.

None of them opens the agent's stores: each sends requests to the daemon
(``talos run``, :mod:`talos.cli.daemon`) over the home's control socket
with :func:`talos.cli.control.call`, and prints the answers. ``inbox``
*takes* messages from the durable inbox, so each is shown at most once
(``docs/cli.md``, "Agent commands").
"""

from __future__ import annotations

import base64
import json
import re
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final

import click
from rich.console import Console
from rich.table import Table

from talos.cli.context import CliContext
from talos.cli.control import (
    MAX_EXPIRES_IN,
    MAX_INBOX_LIMIT,
    MAX_RETRY_COUNT,
    MAX_SEND_TIMEOUT,
    call,
)
from talos.cli.options import INT64_MAX, BoundedFloat, BoundedInt, parse_json_text, unicode_text
from talos.core.message import encode_payload
from talos.errors import LocalProtocolError

__all__ = ["inbox", "outbox", "peers", "send", "status"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)

#: Seconds ``inbox --follow`` lets the agent wait per request (also its Ctrl-C latency).
FOLLOW_WAIT: Final = 1.0
#: Seconds a command waits for the daemon beyond the operation's own timeout.
ANSWER_MARGIN: Final = 30.0
#: What the text form of ``inbox`` escapes: C0/C1 controls, bidi overrides, lone surrogates.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


@click.command()
@click.argument("peer")
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="TEXT is JSON; send the value it encodes.")
@click.option("--capability", default=None, metavar="TOKEN", help="Attach this capability.")
@click.option(
    "--timeout",
    type=BoundedFloat(0.001, MAX_SEND_TIMEOUT),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the peer's acknowledgement.",
)
@click.option("--retry-count", type=BoundedInt(0, MAX_RETRY_COUNT), default=3, show_default=True)
@click.option(
    "--on-failure",
    type=click.Choice(["queue", "raise"]),
    default="queue",
    show_default=True,
    help="Not acknowledged in time: keep it queued, or give up with an error.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Return once the message is queued (durable); the agent delivers it in the background.",
)
@click.option(
    "--expires-in",
    type=BoundedFloat(0.001, MAX_EXPIRES_IN),
    default=None,
    metavar="SECONDS",
    help="Drop the message (audited) if it is not acknowledged within SECONDS.",
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
    no_wait: bool,
    expires_in: float | None,
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
        "wait": not no_wait,
        "expires_in": expires_in,
    }
    if not unicode_text(text):
        raise click.BadParameter("not valid UTF-8 text", param_hint="TEXT")
    if as_json:
        try:
            request["json"] = parse_json_text(text)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="TEXT") from None
        try:
            encode_payload(request["json"])  # e.g. a JSON string holding a lone surrogate
        except LocalProtocolError as exc:
            raise click.BadParameter(str(exc), param_hint="TEXT") from None
    else:
        request["text"] = text
    answer = call(ctx.home, request, timeout=timeout + ANSWER_MARGIN)
    click.echo(f"{answer['status']} {answer['message_id']} (trace {answer['trace_id']})")
    if answer["status"] == "queued" and not no_wait:
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
@click.option(
    "--limit", type=BoundedInt(1, INT64_MAX), default=None, help="Take at most N messages."
)
@click.pass_obj
def inbox(ctx: CliContext, follow: bool, as_json: bool, limit: int | None) -> None:
    """Take received messages from the agent's inbox and print them (each is shown once)."""
    if follow:
        _follow(ctx.home, as_json, limit)
    else:
        _drain(ctx.home, as_json, limit)


def _take(home: Path, limit: int, wait: float) -> list[dict[str, Any]]:
    request = {"op": "inbox", "take": True, "limit": min(limit, MAX_INBOX_LIMIT), "wait": wait}
    messages: list[dict[str, Any]] = call(home, request, timeout=wait + ANSWER_MARGIN)["messages"]
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
        when = _iso(message["sent_at"])
        data = message["data"]
        shown = data if message["type"] in ("text", "json-text") else json.dumps(data)
        if message["type"] == "bytes":
            shown = f"<{len(base64.b64decode(data))} bytes, base64 {data}>"
        click.echo(f"{when}  {message['sender']}  {_visible(shown)}")
    sys.stdout.flush()


def _visible(text: str) -> str:
    """``text`` with control and bidi-override characters (a peer chose them) as escapes."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def _iso(seconds: float) -> str:
    """A Unix time as ISO-8601 UTC; a time no calendar holds (a peer chose it) as the number."""
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return f"{seconds!r} (Unix time)"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_obj
def peers(ctx: CliContext, as_json: bool) -> None:
    """List peers the running agent knows a verified record for."""
    rows: list[dict[str, Any]] = call(ctx.home, {"op": "peers"}, timeout=ANSWER_MARGIN)["peers"]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        _err.print("no known peers")
        return
    table = Table("agent", "endpoint", "session", "connected", "record expires")
    for row in rows:
        expires = _iso(row["expires_ms"] / 1000)
        table.add_row(
            row["agent_id"],
            row["endpoint"],
            _yes(row["session"]),
            _yes(row["connected"]),
            expires,
        )
    Console(highlight=False, soft_wrap=True).print(table)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_obj
def status(ctx: CliContext, as_json: bool) -> None:
    """Show the running agent: queue depth, sessions, connections, registry reachability."""
    info: dict[str, Any] = call(ctx.home, {"op": "status"}, timeout=ANSWER_MARGIN)["status"]
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


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="JSON output (of `list`).")
@click.pass_context
def outbox(click_ctx: click.Context, as_json: bool) -> None:
    """The running agent's queued messages: list them (the default) or cancel one."""
    if click_ctx.invoked_subcommand is None:
        click_ctx.invoke(outbox_list, as_json=as_json)


@outbox.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.pass_obj
def outbox_list(ctx: CliContext, as_json: bool) -> None:
    """List queued messages per peer: id, attempts, age, expiry."""
    by_peer: dict[str, list[dict[str, Any]]] = call(
        ctx.home, {"op": "outbox"}, timeout=ANSWER_MARGIN
    )["outbox"]
    if as_json:
        click.echo(json.dumps(by_peer, indent=2, sort_keys=True))
        return
    if not by_peer:
        _err.print("the outbox is empty")
        return
    for peer, entries in by_peer.items():
        click.echo(f"{peer}: {len(entries)} queued")
        for entry in entries:
            expires = entry["expires_in"]
            click.echo(
                f"  {entry['message_id']}  attempts {entry['attempts']}  "
                f"age {entry['age']:.0f} s  "
                f"expires {'never' if expires is None else f'in {expires:.0f} s'}"
            )


@outbox.command("cancel")
@click.argument("message_id")
@click.pass_obj
def outbox_cancel(ctx: CliContext, message_id: str) -> None:
    """Take MESSAGE_ID out of the outbox (audited); a delivered message cannot be."""
    request = {"op": "cancel", "message_id": message_id}
    outcome = call(ctx.home, request, timeout=ANSWER_MARGIN)["outcome"]
    click.echo(f"{outcome['state']} {outcome['message_id']} ({outcome['reason']})")
