"""``talos init``, ``talos whoami``, ``talos rotate`` and ``talos emergency-rotate``."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Final

import click
from rich.console import Console
from rich.table import Table

from talos.cli.context import CliContext
from talos.cli.control import call
from talos.cli.lockfile import refuse_while_running, running_agent_pid
from talos.cli.passphrases import KEY_ENV, existing_passphrase, new_passphrase
from talos.client.own_keys import Rotation, rotate_at_rest
from talos.core.identity import Identity
from talos.errors import ConfigurationError, IdentityExists, IdentityNotFound, TalosError
from talos.storage.home import RECOVER_HINT, AgentHome, atomic_write
from talos.storage.watermark import start_watermark

__all__ = [
    "ROTATE_TIMEOUT",
    "choose_key_passphrase",
    "emergency_rotate",
    "init",
    "key_passphrase_option",
    "load_identity",
    "rotate",
    "whoami",
]

_err = Console(stderr=True, highlight=False, soft_wrap=True)

#: How long ``rotate`` waits for a running agent (it checks the passphrase, writes the
#: key file, and republishes to the registry and the DHT).
ROTATE_TIMEOUT: Final = 120.0

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
@click.option(
    "--name",
    default=None,
    help="A human-readable name for this agent (with --new-identity: default, the old name).",
)
@click.option(
    "--new-identity",
    is_flag=True,
    help="Archive the existing identity and everything it signed (kept, never deleted) "
    "and create a new one.",
)
@click.option("--no-passphrase", is_flag=True, help="Protect the key file with a 0600 local key.")
@key_passphrase_option
@click.pass_obj
def init(
    ctx: CliContext,
    name: str | None,
    new_identity: bool,
    no_passphrase: bool,
    key_passphrase_file: Path | None,
) -> None:
    """Create an identity in the agent home and print its agent ID."""
    home = ctx.agent_home
    if home.has_identity() and not new_identity:
        raise IdentityExists(f"{home.path} already holds an identity")
    refuse_while_running(home.path, "talos init --new-identity")
    if name is None:
        name = _previous_name(home, key_passphrase_file) if home.has_identity() else None
    if name is None:
        raise ConfigurationError("--name is required (there is no previous identity to keep it)")
    passphrase = choose_key_passphrase(key_passphrase_file, no_passphrase)
    identity = Identity.create(name, rng=ctx.rng, clock=ctx.clock)
    archived = None
    if home.has_identity() or home.load_public_keylog() is not None:
        archived = home.archive_identity(clock=ctx.clock, everything=True)
        _err.print(
            f"[yellow]warning:[/] the previous identity, its audit log, agent state and "
            f"capabilities were archived to {archived}; capabilities granted to it do not "
            "carry over to the new identity"
        )
    home.save_identity(identity, rng=ctx.rng, passphrase=passphrase)
    start_watermark(home, identity, archive=archived)
    click.echo(identity.agent_id)


def _previous_name(home: AgentHome, passphrase_file: Path | None) -> str | None:
    """The name of the identity being replaced, if its key file still opens."""
    try:
        return load_identity(home, passphrase_file).name
    except TalosError:
        return None


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
@click.option("--reason", default=None, help="Why (recorded in the key event and audit log).")
@key_passphrase_option
@click.pass_obj
def rotate(ctx: CliContext, reason: str | None, key_passphrase_file: Path | None) -> None:
    """Planned key rotation: promote the pre-committed key, commit to a new one.

    Works on a stopped agent (directly on the home) and on a running one
    (through its control socket, which rotates without a restart).
    """
    _rotate(ctx, Rotation(reason=reason), key_passphrase_file)


@click.command("emergency-rotate")
@click.option(
    "--reason",
    required=True,
    help="Why (1-256 printable characters; recorded in the key event and audit log).",
)
@click.option(
    "--revoke-old",
    is_flag=True,
    help="Revoke every earlier key: nothing signed by it, capabilities included, is trusted.",
)
@key_passphrase_option
@click.pass_obj
def emergency_rotate(
    ctx: CliContext, reason: str, revoke_old: bool, key_passphrase_file: Path | None
) -> None:
    """Rotate after a key compromise, to the pre-rotated key a thief of the current one lacks.

    Sessions are discarded, peers are told (registry, DHT, live links), and
    with --revoke-old every capability issued under an earlier key is revoked.
    """
    _rotate(
        ctx, Rotation(reason=reason, emergency=True, revoke_old=revoke_old), key_passphrase_file
    )


def _rotate(ctx: CliContext, rotation: Rotation, key_passphrase_file: Path | None) -> None:
    """Rotate through the running daemon, else directly on the home.

    Raises:
        ConfigurationError: a reason that is not 1-256 printable characters.
        IdentityNotFound: no key file, so no pre-rotated key to rotate to.
        WrongPassphrase: the key file does not open with the passphrase given.
    """
    rotation.check()
    home = ctx.agent_home
    if not home.has_identity():
        raise IdentityNotFound(
            f"no key file in {home.path}, so no pre-rotated key to rotate to; "
            f"restore one with {RECOVER_HINT}"
        )
    passphrase = None
    if home.needs_passphrase():
        passphrase = existing_passphrase(key_passphrase_file, KEY_ENV, "Key")
    if running_agent_pid(home.path) is not None:
        answer = call(home.path, _request(rotation, passphrase), timeout=ROTATE_TIMEOUT)
        sequence, fingerprint = int(answer["sequence"]), str(answer["fingerprint"])
        agent_id = str(answer["agent_id"])
        click.echo(f"rotated {agent_id} to key sequence {sequence} (running agent)")
    else:
        rotated = rotate_at_rest(
            home, rotation, passphrase=passphrase, clock=ctx.clock, rng=ctx.rng
        )
        sequence, fingerprint, agent_id = rotated.sequence, rotated.fingerprint, rotated.agent_id
        click.echo(f"rotated {agent_id} to key sequence {sequence}")
    click.echo(f"new fingerprint {fingerprint}")
    if rotation.revoke_old:
        click.echo(f"keys before sequence {sequence} are revoked")
    _err.print("note: take a new backup; older ones hold an outdated key event log")


def _request(rotation: Rotation, passphrase: bytes | None) -> dict[str, Any]:
    """The control request: the key passphrase goes along (over the 0600 socket) so the
    daemon can check that the operator knows it (docs/design/key-rotation.md)."""
    request: dict[str, Any] = {
        "op": "rotate",
        "emergency": rotation.emergency,
        "revoke_old": rotation.revoke_old,
    }
    if rotation.reason is not None:
        request["reason"] = rotation.reason
    if passphrase is not None:
        request["passphrase"] = base64.b64encode(passphrase).decode()
    return request
