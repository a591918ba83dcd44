"""``talos audit rebuild``: re-derive a damaged log from the entries that are intact.

Everything but the entries is derived (tree nodes, index, head, blocks), so
a log whose derived tables are damaged or gone loses nothing; a damaged
entry ends the rebuilt log, and the entries after it are reported as lost
with the first bad position (they cannot be chained without it). The agent
must be stopped (refused while it runs, like restore); the damaged
environment is kept aside, the agent state is kept as it is, and the
rebuilt log gets an ``AUDIT_REBUILT`` entry signed with the agent's key.
Design: docs/design/audit-recovery.md.

``--from-peers`` fetches the entries back from the agent's mirrors instead
(:mod:`talos.cli.audit.rebuild_peers`, docs/design/mirrors.md); both write
through :func:`talos.audit.rebuild.write_log` and keep the agent state
through :func:`talos.audit.recovery.replace_log`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from talos.audit import AuditLog
from talos.audit.chain_check import scan_chain
from talos.audit.recovery import rebuild
from talos.cli.audit.backups import say_state
from talos.cli.audit.options import existing_log, hinted, log_option
from talos.cli.audit.rebuild_peers import mirror_ids, rebuild_from_peers
from talos.cli.audit.recovering import HomeRecovery, prepare
from talos.cli.context import CliContext
from talos.cli.identity import key_passphrase_option, load_identity
from talos.cli.lockfile import refuse_while_running
from talos.core.crypto import VerifyKey
from talos.errors import StoreCorrupted
from talos.storage.watermark import longest_keylog

__all__ = ["rebuild_command"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)

UNREADABLE_HINT = (
    "nothing was changed: no entry can be read from this data file; restore a backup "
    "(`talos audit restore --backup DIR`) or fetch the entries from mirrors "
    "(`talos audit rebuild --from-peers`)"
)


def _trusted(ctx: CliContext, home: HomeRecovery) -> list[VerifyKey] | None:
    """The keys stored blocks must be signed by to be kept (None: the keys they name)."""
    if home.identity is not None:
        keylog, _ = longest_keylog(ctx.agent_home, home.identity)
        return [VerifyKey(event.signing_key) for event in keylog.events]
    return ctx.trusted_log_keys()


@click.command("rebuild")
@log_option
@click.option(
    "--from-peers", "from_peers", is_flag=True, help="Fetch the log back from its mirrors."
)
@click.option(
    "--mirror",
    "mirrors",
    multiple=True,
    metavar="AGENT_ID",
    help="With --from-peers: a mirror to ask first (repeatable); the home's mirror "
    "store names the others.",
)
@click.option(
    "--registry",
    "registry_url",
    multiple=True,
    envvar="TALOS_REGISTRY_URL",
    help="With --from-peers: registry URL to find the mirrors through (else $TALOS_REGISTRY_URL).",
)
@click.option(
    "--anchor-rpc",
    "anchor_rpc",
    default=None,
    help="With --from-peers: JSON-RPC URL of the chain the log anchored on; its "
    "anchors must match too.",
)
@click.option(
    "--accept-loss",
    is_flag=True,
    help="With --from-peers: rebuild even when the mirrors hold less than the agent "
    "had signed for.",
)
@click.option(
    "--witness",
    "witnesses",
    multiple=True,
    metavar="AGENT_ID",
    help="With --from-peers: a witness of the log to ask for the head it cosigned "
    "(repeatable); the mirrors are asked too.",
)
@click.option(
    "--accept-unwitnessed",
    is_flag=True,
    help="With --from-peers: rebuild even when no witness and no anchor vouches for "
    "a head of the log.",
)
@key_passphrase_option
@click.pass_obj
def rebuild_command(
    ctx: CliContext,
    log: Path | None,
    from_peers: bool,
    mirrors: tuple[str, ...],
    registry_url: tuple[str, ...],
    anchor_rpc: str | None,
    accept_loss: bool,
    witnesses: tuple[str, ...],
    accept_unwitnessed: bool,
    key_passphrase_file: Path | None,
) -> None:
    """Re-derive the log from its intact entries; report what could not be recovered.

    With --from-peers the entries come back from the agent's mirrors instead,
    verified batch by batch and against every root the agent signed or
    anchored; a loss is refused unless --accept-loss. The witnesses (--witness
    and the mirrors) are asked for the head they cosigned; without any
    witness's head or anchor the rebuild is refused unless --accept-unwitnessed.

    The chain is verified first: an intact log is left as it is (exit 0).
    Otherwise the tree nodes, index, head and blocks are derived again from
    the entries up to the first bad one; entries from that position on are
    lost and counted. The damaged log is kept aside; the agent state stays;
    AUDIT_REBUILT records what happened. A data file LMDB cannot open
    (truncated) is read page by page for the entries it still holds. Exit 3
    when no entry can be read.
    Refused while this home's agent runs.
    """
    if from_peers:
        trust = _Trust(mirror_ids(witnesses, "--witness"), accept_unwitnessed)
        _from_peers(
            ctx, log, mirrors, registry_url, anchor_rpc, accept_loss, key_passphrase_file, trust
        )
        return
    # ($TALOS_REGISTRY_URL may be set for other commands: --registry is not checked.)
    for given, name in ((mirrors, "--mirror"), (anchor_rpc, "--anchor-rpc"),
                        (accept_loss, "--accept-loss"), (witnesses, "--witness"),
                        (accept_unwitnessed, "--accept-unwitnessed")):  # fmt: skip
        if given:
            raise click.UsageError(f"{name} goes with --from-peers")
    home = prepare(ctx, log, key_passphrase_file, "talos audit rebuild")
    path = existing_log(ctx, log)
    trusted = _trusted(ctx, home)
    report = scan_chain(path, trusted)
    if report.ok:
        click.echo(f"audit chain intact: {report.entries} entries; nothing to rebuild")
        return
    click.echo(f"damaged: {report.problem}")
    try:
        rebuilt = rebuild(
            path,
            clock=ctx.clock,
            trusted_keys=trusted,
            signer=home.signer,
            recorded=home.recorded,
            unmappable=report.problem is not None and report.problem.where == "file",
        )
    except StoreCorrupted as exc:
        raise hinted(exc, UNREADABLE_HINT) from None
    home.follow(ctx)
    found, written = rebuilt.found, rebuilt.log
    click.echo(f"rebuilt {written.size} intact entries into {path}")
    if found.salvaged:
        click.echo(
            "read from the pages the damaged data file still holds (LMDB cannot open it); "
            "blocks are sealed again"
        )
    with AuditLog.open(path, readonly=True) as opened:
        size, tree_root = opened.size, opened.root()
    click.echo(f"root {tree_root.hex()} ({size} entries with the AUDIT_REBUILT entry)")
    click.echo(f"blocks kept {written.blocks}, dropped {written.dropped_blocks}")
    if written.block_problem is not None:
        click.echo(f"first dropped block: {written.block_problem}")
    say_state(rebuilt.replaced)
    if found.first_bad is not None or rebuilt.lost:
        first = found.first_bad if found.first_bad is not None else written.size
        _err.print(
            f"[yellow]lost:[/] {rebuilt.lost} entries from position {first} "
            f"({found.problem or 'missing'}); they cannot be chained without the entry there. "
            "Recorded as AUDIT_REBUILT; `talos audit rebuild --from-peers` or an older "
            "backup may still hold them"
        )


@dataclass(frozen=True)
class _Trust:
    """What vouches for the rebuilt log besides the mirrors: the witnesses to ask."""

    witnesses: list[str]
    accept_unwitnessed: bool


def _from_peers(
    ctx: CliContext,
    log: Path | None,
    mirrors: tuple[str, ...],
    registry_url: tuple[str, ...],
    anchor_rpc: str | None,
    accept_loss: bool,
    key_passphrase_file: Path | None,
    trust: _Trust,
) -> None:
    if log is not None:
        raise click.UsageError("--from-peers rebuilds the home's own log; drop --log")
    agent_home = ctx.agent_home
    refuse_while_running(agent_home.path, "talos audit rebuild")
    identity = load_identity(agent_home, key_passphrase_file)
    summary = rebuild_from_peers(
        ctx,
        agent_home,
        identity,
        mirror_ids(mirrors),
        list(registry_url),
        accept_loss=accept_loss,
        anchor_rpc=anchor_rpc,
        witnesses=trust.witnesses,
        accept_unwitnessed=trust.accept_unwitnessed,
    )
    for line in summary:
        click.echo(line)
