"""``talos audit verify-chain``: the whole chain's integrity, with a progress bar.

The scan itself runs in a child process (:func:`talos.audit.chain_check.scan_chain`),
so a damaged data file that kills the reader with SIGBUS is reported as
damage (exit 3) and the ``talos`` process survives.

A pruned log (``prune_after_anchor``) verifies; the summary says how many
entries were pruned and below which seq (JSON: ``pruned``, ``pruned_below``).

Signatures are checked against the agent's key log: ``keylog.cbor``, else
the key file's own log (a missing ``keylog.cbor`` is never silently replaced
by the keys the blocks carry; that fallback is only for a home with no
identity at all). On the home's own log, the agent's watermark is checked
too: a log shorter than the last checkpoint the agent signed, or a missing
key log, is ``StateLost`` (exit 3), like ``talos run`` refuses it.
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
from talos.audit.chain_check import scan_chain, scan_home_chain
from talos.cli.audit.options import DAMAGED_HINT, existing_log, hinted, json_option, log_option
from talos.cli.context import CliContext
from talos.cli.passphrases import KEY_ENV, passphrase_from
from talos.core.crypto import VerifyKey
from talos.core.identity import fingerprint
from talos.core.keylog import KeyLog
from talos.errors import StoreCorrupted
from talos.storage.lmdb import DATA_FILE
from talos.storage.lost_state import Loss, check_home, keylog_for_checks, lost
from talos.storage.watermark import Watermark

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


def _chain_json(report: ChainReport, against: str, losses: list[str]) -> dict[str, Any]:
    problem = report.problem
    return {
        "ok": report.ok and not losses,
        "lost": losses,
        "entries": report.entries,
        "blocks": report.blocks,
        "root": report.root.hex() if report.ok else None,
        "signers": [key.hex() for key in report.signers],
        "unsigned_blocks": report.unsigned_blocks,
        "pruned": report.pruned,
        "pruned_below": report.pruned_below,
        "signatures_checked_against": against,
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


def _print_chain_summary(report: ChainReport, against: str) -> None:
    click.echo(f"audit chain intact: {report.entries} entries, {report.blocks} blocks")
    click.echo(f"root {report.root.hex()}")
    signers = ", ".join(fingerprint(key) for key in report.signers) or "none"
    click.echo(f"signers {signers}")
    if report.unsigned_blocks:
        click.echo(f"unsigned blocks {report.unsigned_blocks}")
    if report.pruned:
        click.echo(
            f"pruned {report.pruned} entries below seq {report.pruned_below} after anchoring "
            "(payloads dropped, leaf hashes kept and checked into every root)"
        )
    if against == "key-log":
        click.echo("signatures checked against this agent's public key log")
    elif against == "key-file":
        click.echo("signatures checked against the key log in this agent's key file")
    else:
        click.echo(
            "signatures checked only against the keys the blocks carry (this home has no identity)"
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
    home = ctx.agent_home
    keylog = keylog_for_checks(home, passphrase_from(None, KEY_ENV))
    own = log is None or log.resolve() == home.audit_path.resolve()
    watermark = None
    if own and keylog is not None:
        watermark, losses = check_home(home, keylog, audit=None, capabilities=None)
        missing = not (home.audit_path / DATA_FILE).is_file()
        if missing and any(loss.store == "audit log" for loss in losses):
            raise lost(home, [loss for loss in losses if loss.store != "capabilities store"])
    path = existing_log(ctx, log)
    trusted = None if keylog is None else [VerifyKey(event.signing_key) for event in keylog.events]
    with _progress_bar(not as_json and sys.stderr.isatty()) as progress:
        report, losses = _scan(ctx, path, trusted, watermark, keylog, deep, progress)
    against = _against(ctx, keylog)
    texts = [str(loss) for loss in losses]
    if as_json:
        click.echo(json.dumps(_chain_json(report, against, texts), sort_keys=True))
    elif report.ok and not losses:
        _print_chain_summary(report, against)
    try:
        report.raise_for_problem()
    except StoreCorrupted as exc:
        raise hinted(exc, DAMAGED_HINT) from None
    if losses:
        raise lost(ctx.agent_home, losses)


def _against(ctx: CliContext, keylog: KeyLog | None) -> str:
    """What the block signatures were checked against, as the JSON output names it."""
    if keylog is None:
        return "block-keys"
    return "key-log" if ctx.agent_home.keylog_path.exists() else "key-file"


def _scan(
    ctx: CliContext,
    path: Path,
    trusted: list[VerifyKey] | None,
    watermark: Watermark | None,
    keylog: KeyLog | None,
    deep: bool,
    progress: Callable[[int, int], None] | None,
) -> tuple[ChainReport, list[Loss]]:
    """The scan, and (with a watermark) the stores found shorter than it records."""
    if watermark is None or keylog is None:
        return scan_chain(path, trusted, deep=deep, progress=progress), []
    marks = watermark.marks
    scanned = scan_home_chain(path, trusted, marks.audit_size, deep=deep, progress=progress)
    if not scanned.report.ok:
        return scanned.report, []
    # The capabilities store is diagnose's to check; here only the log and the key log.
    _, losses = check_home(ctx.agent_home, keylog, audit=scanned, capabilities=marks.capabilities)
    return scanned.report, losses
