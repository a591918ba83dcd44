"""``talos backup`` and ``talos recover``: encrypted identity backups."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from talos.cli.context import CliContext
from talos.cli.identity import choose_key_passphrase, key_passphrase_option, load_identity
from talos.cli.lockfile import refuse_while_running
from talos.cli.passphrases import (
    BACKUP_ENV,
    KEY_ENV,
    existing_passphrase,
    new_passphrase,
    passphrase_from,
)
from talos.core.identity import Identity
from talos.errors import (
    ConfigurationError,
    IdentityExists,
    StorageError,
    UnsupportedVersion,
    VerificationError,
    WrongPassphrase,
)
from talos.storage.home import AgentHome

__all__ = ["backup", "recover"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)

backup_passphrase_option = click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help=f"File holding the backup passphrase (else ${BACKUP_ENV}, else a prompt).",
)


@click.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the encrypted backup.",
)
@backup_passphrase_option
@key_passphrase_option
@click.pass_obj
def backup(
    ctx: CliContext, out: Path, passphrase_file: Path | None, key_passphrase_file: Path | None
) -> None:
    """Write an encrypted backup of every identity secret, including the next key."""
    identity = load_identity(ctx.agent_home, key_passphrase_file)
    passphrase = new_passphrase(passphrase_file, BACKUP_ENV, "backup", allow_none=False)
    if passphrase is None:  # allow_none=False never returns None; keeps mypy honest
        raise ConfigurationError("a backup passphrase is required")
    if out.exists():
        raise ConfigurationError(f"{out} exists; choose another --out path")
    AgentHome.write_backup(out, identity, passphrase=passphrase, rng=ctx.rng)
    click.echo(f"backup of {identity.agent_id} (key sequence {identity.sequence}) written to {out}")


@click.command()
@click.option(
    "--backup",
    "backup_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The encrypted backup to restore.",
)
@click.option("--force", is_flag=True, help="Replace a different, intact identity (archived).")
@click.option("--no-passphrase", is_flag=True, help="Protect the key file with a 0600 local key.")
@backup_passphrase_option
@key_passphrase_option
@click.pass_obj
def recover(
    ctx: CliContext,
    backup_file: Path,
    force: bool,
    no_passphrase: bool,
    passphrase_file: Path | None,
    key_passphrase_file: Path | None,
) -> None:
    """Restore the identity from a backup; the replaced key files are archived, not deleted.

    Refused while this home's agent runs (stop it first).
    """
    home = ctx.agent_home
    refuse_while_running(home.path, "talos recover")
    passphrase = existing_passphrase(passphrase_file, BACKUP_ENV, "Backup")
    if passphrase is None:
        raise ConfigurationError(
            f"a backup passphrase is required: --passphrase-file or ${BACKUP_ENV}"
        )
    restored = AgentHome.read_backup(backup_file, passphrase=passphrase)
    if home.has_identity() and not force:
        _refuse_replacing_intact(home, restored, key_passphrase_file)
    key_passphrase = choose_key_passphrase(key_passphrase_file, no_passphrase)
    if home.has_identity():
        archived = home.archive_identity(clock=ctx.clock)
        _err.print(f"note: the replaced key files were archived to {archived}")
    home.save_identity(restored, rng=ctx.rng, passphrase=key_passphrase)
    click.echo(restored.agent_id)


def _refuse_replacing_intact(home: AgentHome, restored: Identity, key_file: Path | None) -> None:
    """Refuse to replace an intact identity unless the backup holds the same history, as new.

    A damaged key file is exactly what recovery is for. An intact one is kept
    (without --force) when it belongs to another agent, is at a newer key
    sequence, has a different history at the same sequence (a fork), was
    written by a newer Talos, or cannot be opened for lack of its passphrase.
    """
    try:
        current = home.load_identity(passphrase=passphrase_from(key_file, KEY_ENV))
    except WrongPassphrase:
        raise IdentityExists(
            f"{home.path} holds an intact, passphrase-protected identity; give its passphrase "
            "(--key-passphrase-file or $TALOS_KEY_PASSPHRASE) or use --force"
        ) from None
    except UnsupportedVersion:
        raise IdentityExists(
            f"{home.path} holds an identity written by a newer Talos; use --force to replace it"
        ) from None
    except (StorageError, VerificationError):
        return
    if current.agent_id != restored.agent_id:
        raise IdentityExists(
            f"{home.path} holds a different intact identity ({current.agent_id}); "
            "use --force to archive it and restore the backup"
        )
    if current.sequence > restored.sequence:
        raise IdentityExists(
            f"{home.path} holds this identity at key sequence {current.sequence}, newer than "
            f"the backup's {restored.sequence}; use --force to roll back anyway"
        )
    ours = restored.keylog.events[current.sequence]
    if ours.digest() != current.state.last_digest:
        raise IdentityExists(
            f"{home.path} holds a different key history at sequence {current.sequence} "
            "than the backup (a fork); use --force to replace it"
        )
