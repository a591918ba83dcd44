"""``talos registry serve``: run the registry server (FastAPI on uvicorn).

Logs (startup, access lines, security events such as key log forks) go to
stderr. SIGINT / SIGTERM stop the server gracefully: requests in flight
finish and the database is closed. ``GET /metrics`` answers Prometheus text
on the API port, and with ``--metrics-port`` on a port of its own.

Slow and surplus clients are cut (``--header-timeout``, ``--request-timeout``,
``--max-connections``, ``--keep-alive-timeout``; see
:mod:`talos.registry.limits`), and ``/docs``, ``/redoc`` and
``/openapi.json`` are served only with ``--openapi``.

``--db`` is a SQLite file (one process) or a ``postgresql://`` URL (any
number of replicas on one database); ``talos registry port-db`` moves a
registry from the first to the second. Behind a load balancer,
``--trusted-proxy`` names the balancer's addresses, whose
``X-Forwarded-For`` is believed, so that drain limits count clients.
"""

from __future__ import annotations

import copy
import ipaddress
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from talos.cli.options import log_format_option
from talos.logs import LogFormat
from talos.registry.database import is_database_url, redacted
from talos.registry.store import ONE_TIME_PREKEYS_PER_MINUTE, RegistryStore

# The defaults of talos.registry.limits, repeated so that --help does not import
# uvicorn (a test checks that they agree).
HEADER_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
MAX_CONNECTIONS = 512
KEEP_ALIVE_TIMEOUT = 5

__all__ = ["registry"]

_LEVELS = ("critical", "error", "warning", "info", "debug")


def _seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """A timeout: a finite number of seconds in [0.1, 3600] (exit 2 otherwise)."""
    if not (math.isfinite(value) and 0.1 <= value <= 3600):
        raise click.BadParameter(f"{value} is not a number of seconds in [0.1, 3600]", param=param)
    return value


def _database(ctx: click.Context, param: click.Parameter, value: str) -> Path | str:
    """A ``postgresql://`` URL as is, anything else a SQLite file's path."""
    if is_database_url(value):
        return value
    if "://" in value:
        raise click.BadParameter(
            f"{redacted(value)}: only postgresql:// URLs (or a SQLite file path)", param=param
        )
    return Path(value)


def _networks(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> tuple[str, ...]:
    """Addresses or CIDR networks, normalized (host bits cleared); exit 2 on a bad one."""
    networks = []
    for text in value:
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not an address or CIDR network") from None
    return tuple(networks)


@click.group()
def registry() -> None:
    """Run the registry server that agents use to find each other."""


@registry.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8765, show_default=True, help="TCP port."
)
@click.option(
    "--db",
    "database",
    callback=_database,
    default="talos-registry.db",
    show_default=True,
    help="SQLite database file (created if missing), or postgresql://USER@HOST:PORT/DB "
    "shared by every replica (tables created or migrated at start).",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    callback=_networks,
    metavar="CIDR",
    help="A load balancer's address or network whose X-Forwarded-For names the client "
    "(repeatable; replaces the default, 127.0.0.1). Drain limits then count clients, "
    "not the balancer.",
)
@click.option(
    "--log-level", type=click.Choice(_LEVELS), default="info", show_default=True, help="Log level."
)
@log_format_option
@click.option("--access-log/--no-access-log", default=True, help="Log every request.")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve Prometheus /metrics on this port of HOST (0: any free port).",
)
@click.option(
    "--one-time-prekeys-per-minute",
    type=click.IntRange(0),
    default=ONE_TIME_PREKEYS_PER_MINUTE,
    show_default=True,
    help="One-time prekeys of an agent one client address may take per minute "
    "(0: no bound); past it, bundles carry none.",
)
@click.option(
    "--header-timeout",
    type=float,
    callback=_seconds,
    default=HEADER_TIMEOUT,
    show_default=True,
    help="Seconds a client has to send a request's head (from connecting, or from "
    "the request's first byte); past it, 408 and the connection is closed.",
)
@click.option(
    "--request-timeout",
    type=float,
    callback=_seconds,
    default=REQUEST_TIMEOUT,
    show_default=True,
    help="Seconds a client has to send a whole request, head and body (at least "
    "--header-timeout); past it, 408 and the connection is closed.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 1_000_000),
    default=MAX_CONNECTIONS,
    show_default=True,
    help="Open client connections at most; one more is answered 503 and closed.",
)
@click.option(
    "--keep-alive-timeout",
    type=click.IntRange(1, 3600),
    default=KEEP_ALIVE_TIMEOUT,
    show_default=True,
    help="Seconds an idle connection is kept open between requests.",
)
@click.option(
    "--openapi/--no-openapi",
    default=False,
    show_default=True,
    help="Serve the API description at /openapi.json, /docs and /redoc.",
)
def serve(
    host: str,
    port: int,
    database: Path | str,
    trusted_proxies: tuple[str, ...],
    log_level: str,
    log_format: LogFormat,
    access_log: bool,
    metrics_port: int | None,
    one_time_prekeys_per_minute: int,
    header_timeout: float,
    request_timeout: float,
    max_connections: int,
    keep_alive_timeout: int,
    openapi: bool,
) -> None:
    """Serve the registry API on HOST:PORT, storing its state in --db.

    The database is opened once before listening, so a bad path, an
    unreachable or refusing database, or one of a newer schema is reported
    (exit 1, or 3 when damaged or not a registry's) instead of a server that
    fails every request.
    """
    # Imported here: the web stack costs ~0.3 s, which no other command should pay.
    import uvicorn

    from talos.registry.app import create_app
    from talos.registry.limits import ClientLimits, ConnectionGuard, guarded_protocol
    from talos.registry.metrics import RegistryMetrics

    if request_timeout < header_timeout:
        raise click.BadParameter(
            f"{request_timeout:g} is shorter than --header-timeout {header_timeout:g}",
            param_hint="--request-timeout",
        )
    limits = ClientLimits(
        header_timeout=header_timeout,
        request_timeout=request_timeout,
        max_connections=max_connections,
        keep_alive_timeout=keep_alive_timeout,
    )
    RegistryStore.open(database).close()
    metrics = RegistryMetrics()
    if metrics_port is not None:
        metrics.serve(metrics_port, host)  # bound before the API: a busy port fails the start
    try:
        uvicorn.run(
            create_app(
                database,
                metrics=metrics,
                one_time_prekeys_per_minute=one_time_prekeys_per_minute,
                openapi=openapi,
            ),
            host=host,
            port=port,
            http=guarded_protocol(ConnectionGuard(limits, metrics)),
            ws="none",
            timeout_keep_alive=limits.keep_alive_timeout,
            log_level=log_level,
            access_log=access_log,
            log_config=_log_config(log_level, log_format),
            server_header=False,
            forwarded_allow_ips=list(trusted_proxies) if trusted_proxies else None,
        )
    finally:
        metrics.close()


@registry.command("port-db")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The SQLite registry file to copy (only read; stop its registry first).",
)
@click.option(
    "--to",
    "target",
    required=True,
    help="postgresql://USER@HOST:PORT/DB: an empty database (its tables are created).",
)
def port_db(source: Path, target: str) -> None:
    """Copy a SQLite registry into an empty PostgreSQL database, verifying row counts.

    One transaction: either every table is copied with as many rows as the
    file holds, or nothing is (exit 1 with the reason).
    """
    from talos.registry.porting import port_database

    if not is_database_url(target):
        raise click.BadParameter(
            f"{redacted(target)} is not a postgresql:// URL", param_hint="--to"
        )
    report = port_database(source, target)
    for table, rows in report.rows.items():
        click.echo(f"{table}: {rows} rows")
    click.echo(
        f"copied {source} to {redacted(target)}: {sum(report.rows.values())} rows, counts verified"
    )


def _log_config(level: str, fmt: LogFormat = "text") -> dict[str, Any]:
    """uvicorn's default logging, with access lines and Talos's logger on stderr too.

    Talos's own records always go through :mod:`talos.logs` (escaped, with
    their ``extra`` fields); with ``fmt="json"`` uvicorn's startup and access
    lines do too, so every line on stderr is one JSON object.
    """
    import uvicorn.config

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    talos_formatter = {"()": "talos.logs.formatter", "fmt": fmt, "level": level.upper()}
    config["formatters"]["talos"] = talos_formatter
    if fmt == "json":
        config["formatters"]["default"] = talos_formatter
        config["formatters"]["access"] = talos_formatter
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["handlers"]["talos"] = {
        "formatter": "talos",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["talos"] = {
        "handlers": ["talos"],
        "level": level.upper(),
        "propagate": False,
    }
    return config
