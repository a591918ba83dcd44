"""What every ``talos audit`` command shares: options, opening the log, arguments.

``--log DIR`` and ``--json`` (:data:`log_option`, :data:`json_option`);
opening the log read-only for a reading command (:func:`reading`), so it can
run beside the agent that writes it; and parsing ``--since`` / ``--until``
times and ``--root`` hashes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import click

from talos.audit import AuditLog
from talos.cli.context import CliContext
from talos.errors import StorageError, TalosError
from talos.storage.lmdb import DATA_FILE

__all__ = [
    "DAMAGED_HINT",
    "existing_log",
    "hinted",
    "json_option",
    "log_option",
    "parse_time",
    "reading",
    "root_argument",
    "time_argument",
]

_E = TypeVar("_E", bound=TalosError)

_SECONDS = re.compile(r"\d+(\.\d+)?")
_ROOT_HEX = re.compile(r"(0x)?([0-9a-fA-F]{64})")

DAMAGED_HINT = (
    "stop the agent; `talos audit rebuild` derives the log again from its intact entries, "
    "`talos audit restore --backup DIR` puts back a good backup (both keep the damaged log)"
)


def hinted(error: _E, hint: str) -> _E:
    """``error`` with an operator hint of its own (shown by ``diagnostics()``)."""
    error.hint = hint
    return error


log_option = click.option(
    "--log",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Audit log directory (default: <home>/audit).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def existing_log(ctx: CliContext, log: Path | None) -> Path:
    """The log directory; a missing log is an error with a hint, not a traceback.

    Raises:
        StorageError: there is no audit log there.
    """
    path = ctx.audit_path(log)
    if not (path / DATA_FILE).is_file():
        raise hinted(
            StorageError(f"no audit log at {path}"),
            "pass --log DIR, or --home / TALOS_HOME for the agent whose log you mean",
        )
    return path


@contextmanager
def reading(ctx: CliContext, log: Path | None) -> Iterator[AuditLog]:
    """Open the log read-only for the length of a command."""
    with AuditLog.open(existing_log(ctx, log), clock=ctx.clock, readonly=True) as opened:
        yield opened


def parse_time(text: str) -> int:
    """Unix seconds (``1700000000``, ``1700000000.5``) or ISO-8601, as Unix milliseconds.

    An ISO time without a zone is taken as UTC, so a query means the same on
    every host.

    Raises:
        ValueError: neither form.
    """
    text = text.strip()
    if _SECONDS.fullmatch(text):
        return round(float(text) * 1000)
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


def time_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--since`` / ``--until``: ISO-8601 or Unix seconds, as Unix milliseconds."""
    if value is None:
        return None
    try:
        return parse_time(value)
    except (ValueError, OverflowError):
        raise click.BadParameter(f"{value!r} is neither ISO-8601 nor Unix seconds") from None


def root_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes | None:
    """``--root``: 64 hex digits, ``0x`` optional."""
    if value is None:
        return None
    match = _ROOT_HEX.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter("a root is 64 hex digits (0x prefix optional)")
    return bytes.fromhex(match.group(2))
