"""Wiring of the registry server: the FastAPI application over a SQLite store.

This is the registry's composition root (ARCHITECTURE §1): the only place
that picks the concrete store and clock. The store is opened when the
application starts (lifespan) and closed when it stops, so a bad database
path fails the start, not the first request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from talos.core.clock import Clock
from talos.registry.api import install_error_handlers, router
from talos.registry.store import RegistryStore
from talos.system import SYSTEM_CLOCK

__all__ = ["create_app"]

_DESCRIPTION = """\
Stores verified key event logs, prekeys (each one-time prekey handed out
once), signed peer records and signed revocation lists, and serves time.
Binary bodies are canonical CBOR (`application/cbor`); refusals are JSON
`{"error", "reason"}` with a 4xx status. The registry is not trusted for keys:
clients verify everything it serves.
"""


def create_app(db_path: Path | str, *, clock: Clock = SYSTEM_CLOCK) -> FastAPI:
    """The registry application storing its state in the SQLite file ``db_path``.

    Starting the application (its lifespan) raises
    :class:`~talos.errors.StorageError` or
    :class:`~talos.errors.StoreCorrupted` when the database cannot be opened.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = RegistryStore.open(db_path)
        app.state.store = store
        app.state.clock = clock
        try:
            yield
        finally:
            store.close()

    app = FastAPI(
        title="Talos registry",
        version="1",
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    app.include_router(router)
    install_error_handlers(app)
    return app
