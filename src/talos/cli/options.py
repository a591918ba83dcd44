"""Command-line options shared by several ``talos`` commands."""

from __future__ import annotations

import click

from talos.logs import LOG_FORMATS

__all__ = ["log_format_option"]

#: ``--log-format text|json`` (else ``$TALOS_LOG_FORMAT``), as ``log_format``.
log_format_option = click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar="TALOS_LOG_FORMAT",
    help="Log lines on stderr: text, or one JSON object per line (else $TALOS_LOG_FORMAT).",
)
