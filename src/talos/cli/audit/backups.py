"""``talos audit backup`` and ``restore``: hot copies of the log, and putting one back.

A backup that fails verification is refused (exit 5) and nothing changes;
restoring is refused while this home's agent runs, since the log is its store.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from talos.audit import AuditLog
from talos.cli.audit.options import hinted, log_option, reading
from talos.cli.context import CliContext
from talos.cli.lockfile import refuse_while_running
from talos.errors import BackupInvalid, TalosError
from talos.storage.lost_state import check_home, keylog_for_checks

__all__ = ["backup_command", "restore_command"]

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
@click.pass_obj
def restore_command(ctx: CliContext, backup_dir: Path, log: Path | None) -> None:
    """Replace the log with a verified backup; the replaced log is kept aside.

    The backup's file structure and whole chain are verified first (block
    signatures against this agent's key log when it has one). A damaged backup
    is refused (exit 5) and nothing changes. Refused while this home's agent
    runs: the log is its store.
    """
    if log is None:
        refuse_while_running(ctx.agent_home.path, "talos audit restore")
    path = ctx.audit_path(log)
    trusted = ctx.trusted_log_keys()
    try:
        aside = AuditLog.restore(path, backup_dir, clock=ctx.clock, trusted_keys=trusted)
    except BackupInvalid as exc:
        raise hinted(exc, "nothing was changed; try an older backup") from None
    size, tree_root = _head(path)
    click.echo(f"restored {size} entries into {path} from {backup_dir}")
    click.echo(f"root {tree_root.hex()}")
    if aside is None:
        click.echo("there was no log to replace")
    else:
        click.echo(f"previous log kept at {aside}")
    if trusted is None:
        _err.print(
            "[yellow]note:[/] this home has no public key log: block signatures were "
            "checked only against the keys the blocks carry"
        )
    if log is None:
        _note_if_short(ctx, path)


def _note_if_short(ctx: CliContext, path: Path) -> None:
    """Say so if the restored log is still shorter than the agent's watermark records."""
    home = ctx.agent_home
    try:
        keylog = keylog_for_checks(home, None)
        if keylog is None:
            return
        with AuditLog.open(path, readonly=True) as opened:
            _, losses = check_home(home, keylog, audit=opened, capabilities=None)
    except TalosError:
        return  # `talos run` and `diagnose --storage` name it
    for loss in losses:
        if loss.store == "audit log":
            _err.print(
                f"[yellow]note:[/] the restored {loss}: `talos run` refuses it. Restore a newer "
                "backup, or start from this one with `talos audit accept-lost-state`"
            )
