"""``talos audit backup`` and ``restore``: hot copies of the log, and putting one back.

A backup that fails verification is refused (exit 5) and nothing changes;
restoring is refused while this home's agent runs, since the log is its store,
and restores the audit log only: the agent state stays the current one.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from talos.audit import AuditLog
from talos.audit.recovery import Replaced
from talos.cli.audit.options import hinted, log_option, reading
from talos.cli.audit.recovering import prepare
from talos.cli.context import CliContext
from talos.cli.identity import key_passphrase_option
from talos.errors import BackupInvalid

__all__ = ["backup_command", "restore_command", "say_state"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _head(path: Path) -> tuple[int, bytes]:
    """Size and root of the log at ``path`` (opened read-only)."""
    with AuditLog.open(path, readonly=True) as opened:
        size = opened.size
        return size, opened.root_at(size)


@click.command("backup")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Empty DIR."
)
@log_option
@click.pass_obj
def backup_command(ctx: CliContext, out: Path, log: Path | None) -> None:
    """Write a consistent, compacted hot copy of the log into an empty directory.

    The agent may keep appending; the copy is the log as it was when it began.
    """
    with reading(ctx, log) as opened:
        opened.backup(out)
    size, tree_root = _head(out)
    click.echo(f"backup of {size} entries written to {out}")
    click.echo(f"root {tree_root.hex()}")


@click.command("restore")
@click.option(
    "--backup",
    "backup_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory written by `talos audit backup`.",
)
@log_option
@key_passphrase_option
@click.pass_obj
def restore_command(
    ctx: CliContext, backup_dir: Path, log: Path | None, key_passphrase_file: Path | None
) -> None:
    """Replace the audit log with a verified backup; the agent state stays the current one.

    The backup's file structure and whole chain are verified first (block
    signatures against this agent's key log when it has one). A damaged backup
    is refused (exit 5) and nothing changes. Only the audit log is restored:
    sessions, replay window, outbox, inbox and prekeys are kept as they are
    now, so no key is used twice and no old message is accepted again. The
    restored log gets a LOG_RESTORED entry (which backup, its size, entries
    lost against the watermark), signed with the agent's key; the replaced
    log is kept aside. Refused while this home's agent runs.
    """
    home = prepare(ctx, log, key_passphrase_file, "talos audit restore")
    path = home.path
    trusted = ctx.trusted_log_keys()
    try:
        restored = AuditLog.restore(
            path,
            backup_dir,
            clock=ctx.clock,
            trusted_keys=trusted,
            signer=home.signer,
            recorded=home.recorded,
        )
    except BackupInvalid as exc:
        raise hinted(exc, "nothing was changed; try an older backup") from None
    home.follow(ctx)
    size, tree_root = _head(path)
    click.echo(f"restored {restored.size} entries into {path} from {backup_dir}")
    click.echo(f"root {tree_root.hex()} ({size} entries with the LOG_RESTORED entry)")
    say_state(restored.replaced)
    if restored.lost:
        recorded = home.recorded
        _err.print(
            f"[yellow]lost:[/] the agent had {recorded[0] if recorded else '?'} entries; "
            f"{restored.lost} are not in this backup (from position {restored.size}). "
            "Recorded as LOG_RESTORED in the log; the watermark now follows the restored log"
        )
    if trusted is None:
        _err.print(
            "[yellow]note:[/] this home has no public key log: block signatures were "
            "checked only against the keys the blocks carry"
        )


def say_state(replaced: Replaced) -> None:
    """Where the old log went, and what happened to the agent state."""
    if replaced.aside is None:
        click.echo("there was no log to replace")
    else:
        click.echo(f"previous log kept at {replaced.aside}")
    if replaced.state == "kept":
        click.echo("agent state kept: sessions, replay window, outbox and inbox are current")
        return
    found = "there was none" if replaced.aside is None else "it could not be read"
    _err.print(
        f"[yellow]note:[/] no agent state was kept ({found}): it starts empty; sessions "
        "are established again and every message older than now is refused"
    )
