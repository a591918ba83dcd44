"""``talos registry serve``: run the registry server (FastAPI on uvicorn).

Logs (startup, access lines, security events such as key log forks) go to
stderr. SIGINT / SIGTERM stop the server gracefully: requests in flight
finish and the database is closed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import click

from talos.registry.store import RegistryStore

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
@click.option("--access-log/--no-access-log", default=True, help="Log every request.")
def serve(host: str, port: int, db_path: Path, log_level: str, access_log: bool) -> None:
    """Serve the registry API on HOST:PORT, storing its state in the --db file.

    The database is opened once before listening, so a bad path or a damaged
    file is reported (exit 1, or 3 when damaged) instead of a server that
    fails every request.
    """
    # Imported here: the web stack costs ~0.3 s, which no other command should pay.
    import uvicorn

    from talos.registry.app import create_app

    RegistryStore.open(db_path).close()
    uvicorn.run(
        create_app(db_path),
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        log_config=_log_config(log_level),
        server_header=False,
    )


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's default logging, with access lines and Talos's logger on stderr too."""
    import uvicorn.config

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["talos"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config
