"""Entry point of the ``talos`` command and its error handling.

Library code raises :class:`~talos.errors.TalosError`; this module turns it into
a message on stderr (``diagnostics()``, which adds guidance) and an exit code
(:mod:`talos.cli.exit_codes`), never a traceback. It assembles the command
groups; nothing but ``python -m talos`` and the console script imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console

from talos.cli.agent import inbox, outbox, peers, send, status
from talos.cli.anchor import anchor
from talos.cli.audit import audit
from talos.cli.backup import backup, recover
from talos.cli.capabilities import capabilities
from talos.cli.context import CliContext
from talos.cli.daemon import run
from talos.cli.diagnose import diagnose
from talos.cli.exit_codes import exit_code_for
from talos.cli.identity import emergency_rotate, init, rotate, whoami
from talos.cli.registry import registry
from talos.errors import TalosError
from talos.storage.home import default_home

__all__ = ["cli", "main"]


class TalosGroup(click.Group):
    """A click group that reports Talos errors as messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TalosError as error:
            Console(stderr=True, highlight=False).print(
                f"[bold red]error:[/] {error.diagnostics()}", markup=True, soft_wrap=True
            )
            ctx.exit(exit_code_for(error))


@click.group(cls=TalosGroup)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TALOS_HOME",
    default=None,
    help="Agent home directory (default: $TALOS_HOME or ~/.talos).",
)
@click.version_option(package_name="talos")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """Talos: secure, authorized, auditable messaging between software agents."""
    ctx.obj = CliContext(home=home or default_home())


cli.add_command(init)
cli.add_command(whoami)
cli.add_command(rotate)
cli.add_command(emergency_rotate)
cli.add_command(backup)
cli.add_command(recover)
cli.add_command(capabilities)
cli.add_command(audit)
cli.add_command(anchor)
cli.add_command(registry)
cli.add_command(diagnose)
for command in (run, send, inbox, outbox, peers, status):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="talos")
