"""``talos audit anchors``: the log's anchors on a chain, final ones and the one in flight.

Read-only (works beside the running agent); needs no web3. Each anchor shows
its state (``final``, ``included``, ``pending``), tree size, root,
transaction hash (of the version included, else the newest broadcast), block
and nonce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from talos.audit.anchoring.store import read_anchors
from talos.cli.audit.options import existing_log, json_option, log_option, reading
from talos.cli.context import CliContext
from talos.core.anchoring import Anchor
from talos.errors import ConfigurationError

__all__ = ["anchor_json", "anchors_command", "verify_anchors_command"]


def anchor_json(anchor: Anchor) -> dict[str, Any]:
    found = anchor.inclusion
    return {
        "state": anchor.state.value,
        "tree_size": anchor.tree_size,
        "root": anchor.root.hex(),
        "tx": (found.tx_hash if found else anchor.latest.tx_hash).hex(),
        "block_number": found.block_number if found else None,
        "block_hash": found.block_hash.hex() if found else None,
        "nonce": anchor.nonce,
        "broadcasts": len(anchor.broadcasts),
        "created": anchor.created,
    }


@click.command("anchors")
@json_option
@log_option
@click.pass_obj
def anchors_command(ctx: CliContext, as_json: bool, log: Path | None) -> None:
    """The log's anchors, oldest first: final ones, then the one in flight."""
    finals, current = read_anchors(existing_log(ctx, log), clock=ctx.clock)
    rows = [anchor_json(anchor) for anchor in [*finals, *([current] if current else [])]]
    if as_json:
        click.echo(json.dumps(rows, sort_keys=True))
        return
    if not rows:
        Console(stderr=True, highlight=False).print("no anchors")
        return
    table = Table("state", "tree size", "root", "tx", "block", "nonce")
    for row in rows:
        block = "-" if row["block_number"] is None else str(row["block_number"])
        table.add_row(
            row["state"], str(row["tree_size"]), row["root"], row["tx"], block, str(row["nonce"])
        )
    Console(highlight=False, width=200).print(table)


@click.command("verify-anchors")
@click.option(
    "--rpc", "rpc_url", required=True, help="JSON-RPC URL of the chain the log anchors on."
)
@json_option
@log_option
@click.pass_obj
def verify_anchors_command(ctx: CliContext, rpc_url: str, as_json: bool, log: Path | None) -> None:
    """Check every anchor of this log on the chain against the log (exit 8 on a mismatch).

    Starts from the log's AUDIT_ANCHORED entries (needs the talos[anchor] extra).
    """
    try:
        from talos.audit.anchoring.chain import Chain
        from talos.audit.anchoring.verify import verify_anchors
    except ImportError as exc:
        raise ConfigurationError(
            f"verify-anchors needs the talos[anchor] extra (pip install 'talos[anchor]'): {exc}"
        ) from None
    chain = Chain(rpc_url)
    try:
        with reading(ctx, log) as opened:
            checks = verify_anchors(opened, chain)
    finally:
        chain.close()
    if as_json:
        click.echo(json.dumps([check.to_json() for check in checks], sort_keys=True))
        return
    if not checks:
        click.echo("no anchors on this chain (no AUDIT_ANCHORED entry names it)")
        return
    for check in checks:
        click.echo(
            f"{check.verdict:8} size {check.tree_size} root {check.root.hex()} "
            f"block {check.block_number} tx 0x{check.tx_hash.hex()} by {check.submitter}"
        )
    ok = sum(check.verdict == "ok" for check in checks)
    click.echo(f"{ok} anchors match the log; {len(checks) - ok} by other wallets ignored")
