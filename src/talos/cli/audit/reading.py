"""``talos audit query``, ``log``, ``show`` and ``root``: reading the log.

Each opens the log read-only for the length of the command, so it can run
beside the agent that writes it. On a pruned log (``prune_after_anchor``)
``query`` and ``log`` say on stderr which entries were pruned (they are not
in the results); ``show`` of a pruned entry is an error naming its kept
leaf hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from talos.audit import AuditLog, Block
from talos.cli.audit.options import json_option, log_option, reading, time_argument
from talos.cli.audit.rendering import (
    block_json,
    data_text,
    entry_json,
    iso,
    print_entries,
    pruned_note,
    signature_state,
)
from talos.cli.context import CliContext
from talos.cli.options import INT64_MAX, BoundedInt
from talos.core.identity import fingerprint

__all__ = ["log_command", "query", "root", "show"]


@click.command()
@click.option("--type", "kind", default=None, help="Entry kind, e.g. SIGNATURE_FAILURE.")
@click.option("--last", type=BoundedInt(0, INT64_MAX), default=None, help="Only the N most recent.")
@click.option("--peer", default=None, help="Only entries about this peer.")
@click.option("--since", callback=time_argument, help="From TIME (ISO-8601 or Unix s).")
@click.option("--until", callback=time_argument, help="Before TIME (exclusive).")
@json_option
@log_option
@click.pass_obj
def query(
    ctx: CliContext,
    kind: str | None,
    last: int | None,
    peer: str | None,
    since: int | None,
    until: int | None,
    as_json: bool,
    log: Path | None,
) -> None:
    """Entries matching every filter, oldest first (a table, or a JSON array)."""
    with reading(ctx, log) as opened:
        found = opened.query(
            kind=None if kind is None else kind.upper(),
            peer=peer,
            since=since,
            until=until,
            last=last,
        )
        pruned_note(opened.pruning(), found, last)
        if kind is not None:
            _suppressed_note(opened, kind.upper(), peer=peer, since=since, until=until)
    print_entries(found, as_json)


def _suppressed_note(
    opened: AuditLog, kind: str, *, peer: str | None, since: int | None, until: int | None
) -> None:
    """Say on stderr how many ``kind`` events the audit rate limit left out
    (``FAILURES_SUPPRESSED`` entries in the same window), so a query by kind never
    undercounts without saying so."""
    summaries = [
        entry
        for entry in opened.query(kind="FAILURES_SUPPRESSED", peer=peer, since=since, until=until)
        if isinstance(entry.data, dict) and entry.data.get("kind") == kind
    ]
    if summaries:
        left_out = sum(int(entry.data.get("count", 0)) for entry in summaries)
        click.echo(
            f"note: {left_out} more {kind} events were left out by the audit rate limit "
            f"({len(summaries)} FAILURES_SUPPRESSED entries: "
            "talos audit query --type FAILURES_SUPPRESSED)",
            err=True,
        )


@click.command("log")
@click.option("--last", type=BoundedInt(0, INT64_MAX), default=20, show_default=True)
@json_option
@log_option
@click.pass_obj
def log_command(ctx: CliContext, last: int, as_json: bool, log: Path | None) -> None:
    """The most recent entries, oldest first."""
    with reading(ctx, log) as opened:
        found = opened.query(last=last)
        pruned_note(opened.pruning(), found, last)
    print_entries(found, as_json)


def _sealing_block(opened: AuditLog, seq: int) -> Block | None:
    """The block whose range holds ``seq`` (binary search by height), or None if unsealed."""
    low, high = 0, opened.block_count
    while low < high:
        mid = (low + high) // 2
        if opened.block(mid).last_seq < seq:
            low = mid + 1
        else:
            high = mid
    if low == opened.block_count:
        return None
    block = opened.block(low)
    return block if block.first_seq <= seq <= block.last_seq else None


@click.command()
@click.argument("seq", type=BoundedInt(0, INT64_MAX))
@json_option
@log_option
@click.pass_obj
def show(ctx: CliContext, seq: int, as_json: bool, log: Path | None) -> None:
    """One entry (re-hashed), its leaf hash, and the block that seals it."""
    with reading(ctx, log) as opened:
        entry = opened.entry(seq)
        block = _sealing_block(opened, seq)
    if as_json:
        out = {
            "entry": entry_json(entry),
            "leaf_hash": entry.leaf_hash().hex(),
            "block": None if block is None else block_json(block),
        }
        click.echo(json.dumps(out, sort_keys=True))
        return
    rows = [
        ("seq", str(entry.seq)),
        ("time", f"{iso(entry.time_ms)} ({entry.time_ms} ms)"),
        ("kind", entry.kind),
        ("peer", entry.peer or "-"),
        ("leaf", entry.leaf_hash().hex()),
        ("data", data_text(entry)),
    ]
    if block is None:
        rows.append(("block", "not sealed yet"))
    else:
        signer = "-" if block.public_key is None else fingerprint(block.public_key)
        rows += [
            ("block", f"height {block.height}, entries {block.first_seq}..{block.last_seq}"),
            ("block root", f"{block.root.hex()} (tree size {block.tree_size})"),
            ("block time", iso(block.time_ms)),
            ("signature", f"{signature_state(block)} (key {signer})"),
        ]
    for name, value in rows:
        click.echo(f"{name:<11} {value}")  # kind and peer are printable; data is JSON


@click.command()
@click.option(
    "--height", type=BoundedInt(0, INT64_MAX), default=None, help="Root sealed in a block."
)
@json_option
@log_option
@click.pass_obj
def root(ctx: CliContext, height: int | None, as_json: bool, log: Path | None) -> None:
    """The current root and tree size, or those sealed in block HEIGHT."""
    with reading(ctx, log) as opened:
        if height is None:
            size = opened.size
            out: dict[str, Any] = {"size": size, "root": opened.root_at(size).hex()}
        else:
            block = opened.block(height)
            out = {
                "height": height,
                "size": block.tree_size,
                "root": block.root.hex(),
                "time": iso(block.time_ms),
            }
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
        return
    for name, value in out.items():
        click.echo(f"{name} {value}")
