"""``talos registry serve``: run the registry server (FastAPI on uvicorn).

Logs (startup, access lines, security events such as key log forks) go to
stderr. SIGINT / SIGTERM stop the server gracefully: requests in flight
finish and the database is closed. ``GET /metrics`` answers Prometheus text
on the API port, and with ``--metrics-port`` on a port of its own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import click

from talos.cli.options import log_format_option
from talos.logs import LogFormat
from talos.registry.store import ONE_TIME_PREKEYS_PER_MINUTE, RegistryStore

__all__ = ["registry"]

_LEVELS = ("critical", "error", "warning", "info", "debug")


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
    "db_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("talos-registry.db"),
    show_default=True,
    help="SQLite database file (created if missing).",
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
def serve(
    host: str,
    port: int,
    db_path: Path,
    log_level: str,
    log_format: LogFormat,
    access_log: bool,
    metrics_port: int | None,
    one_time_prekeys_per_minute: int,
) -> None:
    """Serve the registry API on HOST:PORT, storing its state in the --db file.

    The database is opened once before listening, so a bad path or a damaged
    file is reported (exit 1, or 3 when damaged) instead of a server that
    fails every request.
    """
    # Imported here: the web stack costs ~0.3 s, which no other command should pay.
    import uvicorn

    from talos.registry.app import create_app
    from talos.registry.metrics import RegistryMetrics

    RegistryStore.open(db_path).close()
    metrics = RegistryMetrics()
    if metrics_port is not None:
        metrics.serve(metrics_port, host)  # bound before the API: a busy port fails the start
    try:
        uvicorn.run(
            create_app(
                db_path,
                metrics=metrics,
                one_time_prekeys_per_minute=one_time_prekeys_per_minute,
            ),
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
            log_config=_log_config(log_level, log_format),
            server_header=False,
        )
    finally:
        metrics.close()


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
