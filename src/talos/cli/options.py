"""Command-line options shared by several ``talos`` commands."""

from __future__ import annotations

import click

from talos.logs import LOG_FORMATS

__all__ = ["log_format_option", "parse_bootstrap"]

#: ``--log-format text|json`` (else ``$TALOS_LOG_FORMAT``), as ``log_format``.
log_format_option = click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    envvar="TALOS_LOG_FORMAT",
    help="Log lines on stderr: text, or one JSON object per line (else $TALOS_LOG_FORMAT).",
)


def parse_bootstrap(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, int]]:
    """``--dht-bootstrap HOST:PORT`` (repeatable) as (host, port) pairs; IPv6 in brackets."""
    nodes = []
    for value in values:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise click.BadParameter(f"{value!r} is not HOST:PORT", ctx=ctx, param=param)
        nodes.append((host.strip("[]"), int(port)))
    return nodes
