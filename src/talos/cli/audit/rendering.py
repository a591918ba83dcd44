"""How ``talos audit`` shows entries and blocks: JSON values and tables.

In JSON and table output a byte string is shown as lower-case hex; times are
UTC ISO-8601 with milliseconds. Text that comes from outside (kinds, peers,
entry data) is never read as rich markup.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from talos.audit import AuditEntry, Block, Pruning
from talos.errors import SignatureInvalid

__all__ = [
    "block_json",
    "data_text",
    "entry_json",
    "iso",
    "plain",
    "print_entries",
    "pruned_note",
    "signature_state",
]

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def pruned_note(
    pruning: Pruning, found: list[AuditEntry], last: int | None = None, *, listed: bool = False
) -> None:
    """Say on stderr that pruned entries are not in ``found``, when they may have matched
    (``listed``: they are, as their leaf hash alone).

    Nothing is said when the log has no pruned entry, or ``last`` entries
    were asked for and found above the pruning point.
    """
    if not pruning.entries:
        return
    if last is not None and len(found) >= last and (not found or found[0].seq >= pruning.below):
        return
    shown = "appear as their leaf hash alone" if listed else "are not listed"
    _err.print(
        f"note: {pruning.entries} entries below seq {pruning.below} were pruned after "
        f"anchoring (prune_after_anchor) and {shown}; their leaf hashes are kept "
        "(`talos audit prove SEQ` still proves each)"
    )


def iso(time_ms: int) -> str:
    """UTC ISO-8601 with milliseconds and a ``Z``."""
    when = datetime.fromtimestamp(time_ms / 1000, tz=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def plain(value: Any) -> Any:
    """Entry data as JSON values: byte strings become hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def entry_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "time_ms": entry.time_ms,
        "time": iso(entry.time_ms),
        "kind": entry.kind,
        "peer": entry.peer,
        "data": plain(dict(entry.data)),
    }


def data_text(entry: AuditEntry) -> str:
    return json.dumps(plain(dict(entry.data)), sort_keys=True, separators=(",", ":"))


def signature_state(block: Block) -> str:
    """``valid``, ``unsigned`` or ``INVALID``: checked against the key the block names."""
    if block.public_key is None:
        return "unsigned"
    try:
        block.verify_signature()
    except SignatureInvalid:
        return "INVALID"
    return "valid"


def block_json(block: Block) -> dict[str, Any]:
    return {
        "height": block.height,
        "first_seq": block.first_seq,
        "last_seq": block.last_seq,
        "tree_size": block.tree_size,
        "root": block.root.hex(),
        "previous": block.previous.hex(),
        "time_ms": block.time_ms,
        "time": iso(block.time_ms),
        "public_key": None if block.public_key is None else block.public_key.hex(),
        "signature": signature_state(block),
    }


def _stdout_console() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def print_entries(entries: list[AuditEntry], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([entry_json(entry) for entry in entries], sort_keys=True))
        return
    if not entries:
        _err.print("no matching entries")
        return
    table = Table("seq", "time (UTC)", "kind", "peer", "data")
    for entry in entries:
        # Text() cells: data and peers come from outside and must not be read as markup.
        table.add_row(
            str(entry.seq),
            iso(entry.time_ms),
            Text(entry.kind),
            Text(entry.peer or "-"),
            Text(data_text(entry)),
        )
    _stdout_console().print(table)
