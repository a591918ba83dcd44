"""``talos audit verify-chain``: the whole chain's integrity, with a progress bar.

The scan itself runs in a child process (:func:`talos.audit.chain_check.scan_chain`),
so a damaged data file that kills the reader with SIGBUS is reported as
damage (exit 3) and the ``talos`` process survives.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from talos.audit import ChainReport
from talos.audit.chain_check import scan_chain
from talos.cli.audit.options import DAMAGED_HINT, existing_log, hinted, json_option, log_option
from talos.cli.context import CliContext
from talos.core.identity import fingerprint
from talos.errors import StoreCorrupted

__all__ = ["verify_chain_command"]


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient rich progress bar on stderr, or None when disabled."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("verifying"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} entries"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: list[TaskID] = []

    def update(done: int, total: int) -> None:
        if not tasks:  # the total is known only once the scan has started
            tasks.append(bar.add_task("verify", total=total))
        bar.update(tasks[0], completed=done, total=total)

    with bar:
        yield update


def _chain_json(report: ChainReport, trusted: bool) -> dict[str, Any]:
    problem = report.problem
    return {
        "ok": report.ok,
        "entries": report.entries,
        "blocks": report.blocks,
        "root": report.root.hex() if report.ok else None,
        "signers": [key.hex() for key in report.signers],
        "unsigned_blocks": report.unsigned_blocks,
        "signatures_checked_against": "key-log" if trusted else "block-keys",
        "problem": None
        if problem is None
        else {
            "where": problem.where,
            "what": problem.what,
            "seq": problem.seq,
            "height": problem.height,
            "text": str(problem),
        },
    }


def _print_chain_summary(report: ChainReport, trusted: bool) -> None:
    click.echo(f"audit chain intact: {report.entries} entries, {report.blocks} blocks")
    click.echo(f"root {report.root.hex()}")
    signers = ", ".join(fingerprint(key) for key in report.signers) or "none"
    click.echo(f"signers {signers}")
    if report.unsigned_blocks:
        click.echo(f"unsigned blocks {report.unsigned_blocks}")
    if trusted:
        click.echo("signatures checked against this agent's public key log")
    else:
        click.echo(
            "signatures checked only against the keys the blocks carry "
            "(this home has no public key log)"
        )


@click.command("verify-chain")
@click.option("--deep", is_flag=True, help="Also decode every entry and check times (~3x slower).")
@json_option
@log_option
@click.pass_obj
def verify_chain_command(ctx: CliContext, deep: bool, as_json: bool, log: Path | None) -> None:
    """Re-hash every entry, rebuild every root, check block links and signatures.

    Exit 0 and a summary when the chain is intact; exit 3 and the first bad
    sequence or height otherwise.
    """
    path = existing_log(ctx, log)
    trusted = ctx.trusted_log_keys()
    with _progress_bar(not as_json and sys.stderr.isatty()) as progress:
        report = scan_chain(path, trusted, deep=deep, progress=progress)
    if as_json:
        click.echo(json.dumps(_chain_json(report, trusted is not None), sort_keys=True))
    elif report.ok:
        _print_chain_summary(report, trusted is not None)
    try:
        report.raise_for_problem()
    except StoreCorrupted as exc:
        raise hinted(exc, DAMAGED_HINT) from None
