"""``talos init``, ``talos whoami`` and ``talos rotate``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from talos.audit import AuditKind
from talos.cli.context import CliContext
from talos.cli.lockfile import refuse_while_running
from talos.cli.passphrases import KEY_ENV, existing_passphrase, new_passphrase
from talos.core.identity import Identity
from talos.errors import IdentityExists, StorageError
from talos.storage.home import AgentHome, atomic_write
from talos.storage.watermark import start_watermark

__all__ = [
    "choose_key_passphrase",
    "init",
    "key_passphrase_option",
    "load_identity",
    "rotate",
    "whoami",
]

_err = Console(stderr=True, highlight=False, soft_wrap=True)

key_passphrase_option = click.option(
    "--key-passphrase-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help=f"File holding the key-file passphrase (else ${KEY_ENV}, else a prompt).",
)


def load_identity(home: AgentHome, passphrase_file: Path | None) -> Identity:
    """Open the home's identity, asking for the key passphrase only if it has one."""
    passphrase = None
    if home.needs_passphrase():
        passphrase = existing_passphrase(passphrase_file, KEY_ENV, "Key")
    return home.load_identity(passphrase=passphrase)


def choose_key_passphrase(passphrase_file: Path | None, no_passphrase: bool) -> bytes | None:
    """The passphrase for a new key file, or None for a 0600 local key."""
    if no_passphrase:
        return None
    passphrase = new_passphrase(passphrase_file, KEY_ENV, "key", allow_none=True)
    if passphrase is None:
        _err.print("note: no passphrase; the key file is protected by identity.localkey (0600)")
    return passphrase


@click.command()
@click.option("--name", required=True, help="A human-readable name for this agent.")
@click.option(
    "--new-identity",
    is_flag=True,
    help="Archive the existing identity (kept, never deleted) and create a new one.",
)
@click.option("--no-passphrase", is_flag=True, help="Protect the key file with a 0600 local key.")
@key_passphrase_option
@click.pass_obj
def init(
    ctx: CliContext,
    name: str,
    new_identity: bool,
    no_passphrase: bool,
    key_passphrase_file: Path | None,
) -> None:
    """Create an identity in the agent home and print its agent ID."""
    home = ctx.agent_home
    if home.has_identity() and not new_identity:
        raise IdentityExists(f"{home.path} already holds an identity")
    passphrase = choose_key_passphrase(key_passphrase_file, no_passphrase)
    identity = Identity.create(name, rng=ctx.rng, clock=ctx.clock)
    archived = None
    if home.has_identity():
        archived = home.archive_identity(clock=ctx.clock)
        _err.print(
            f"[yellow]warning:[/] the previous identity was archived to {archived}; "
            "capabilities granted to it do not carry over to the new identity"
        )
    home.save_identity(identity, rng=ctx.rng, passphrase=passphrase)
    start_watermark(home, identity, archive=archived)
    click.echo(identity.agent_id)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--export-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the public key event log here (for peers and `capabilities add`).",
)
@key_passphrase_option
@click.pass_obj
def whoami(
    ctx: CliContext, as_json: bool, export_log: Path | None, key_passphrase_file: Path | None
) -> None:
    """Show this agent's ID, name, key fingerprint and key event sequence."""
    identity = load_identity(ctx.agent_home, key_passphrase_file)
    if export_log is not None:
        atomic_write(export_log, identity.keylog.to_bytes(), mode=0o644)
    summary = identity.public_summary()
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    table = Table(show_header=False, box=None)
    for label, key in (
        ("agent id", "agent_id"),
        ("name", "name"),
        ("fingerprint", "fingerprint"),
        ("key sequence", "sequence"),
    ):
        table.add_row(label, str(summary[key]))
    Console(highlight=False).print(table)


@click.command()
@key_passphrase_option
@click.pass_obj
def rotate(ctx: CliContext, key_passphrase_file: Path | None) -> None:
    """Planned key rotation: promote the pre-committed key, commit to a new one.

    Refused while this home's agent runs: it would go on signing with the
    retired key. Stop it, rotate, start it again.
    """
    home = ctx.agent_home
    refuse_while_running(home.path, "talos rotate")
    passphrase = None
    if home.needs_passphrase():
        passphrase = existing_passphrase(key_passphrase_file, KEY_ENV, "Key")
    identity = home.load_identity(passphrase=passphrase)
    rotated = identity.rotate(rng=ctx.rng, clock=ctx.clock)
    home.save_identity(rotated, rng=ctx.rng, passphrase=passphrase)
    _record_rotation(ctx, rotated)
    click.echo(f"rotated {rotated.agent_id} to key sequence {rotated.sequence}")
    click.echo(f"new fingerprint {rotated.fingerprint}")
    _err.print("note: take a new backup; older ones hold an outdated key event log")


def _record_rotation(ctx: CliContext, rotated: Identity) -> None:
    """Audit the rotation, signed by the new key.

    The rotation itself is never held back by the audit log: after a key
    compromise, rotating matters more than recording. A failure is reported.
    """
    try:
        with ctx.open_audit_log(identity=rotated) as log:
            log.append(
                AuditKind.KEY_ROTATED,
                {"sequence": rotated.sequence, "fingerprint": rotated.fingerprint},
                peer=rotated.agent_id,
            )
    except StorageError as error:
        _err.print(f"[yellow]warning:[/] the rotation was not recorded in the audit log: {error}")
