"""Wiring of the registry server: the FastAPI application over its store.

This is the registry's composition root (ARCHITECTURE §1): the only place
that picks the concrete store and clock. The store (a SQLite file, or a
PostgreSQL database shared by replicas) is opened when the application
starts (lifespan) and closed when it stops, so a bad database fails the
start, not the first request. The metrics (a
:class:`~talos.registry.metrics.RegistryMetrics`) exist from construction;
their gauges read the store while it is open. While it runs, the application
sweeps expired records every :data:`SWEEP_INTERVAL` seconds (with several
replicas, one of them at a time).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute

from talos.core.clock import Clock, time_ms
from talos.core.ratelimit import RateLimiter
from talos.errors import ConfigurationError, TalosError
from talos.registry.answers import install_error_handlers
from talos.registry.api import metrics_router, router
from talos.registry.drain import ONE_TIME_PREKEYS_PER_MINUTE
from talos.registry.metrics import RegistryMetrics, RequestMetricsMiddleware
from talos.registry.store import RegistryStore
from talos.system import SYSTEM_CLOCK

__all__ = ["ONE_TIME_PREKEYS_PER_MINUTE", "SWEEP_INTERVAL", "create_app"]

#: Seconds between two sweeps of expired records.
SWEEP_INTERVAL: Final = 60.0

_DESCRIPTION = """\
Stores verified key event logs, prekeys (each one-time prekey handed out
once), signed peer records and signed revocation lists, and serves time.
Binary bodies are canonical CBOR (`application/cbor`); refusals are JSON
`{"error", "reason"}` with a 4xx status. The registry is not trusted for keys:
clients verify everything it serves.
"""


log = logging.getLogger("talos.registry")


def create_app(
    database: Path | str,
    *,
    clock: Clock = SYSTEM_CLOCK,
    metrics: RegistryMetrics | None = None,
    one_time_prekeys_per_minute: int = ONE_TIME_PREKEYS_PER_MINUTE,
    openapi: bool = False,
) -> FastAPI:
    """The registry application storing its state in ``database``: a SQLite file, or
    a PostgreSQL database named by a ``postgresql://`` URL (a ``str``).

    ``metrics`` (a fresh :class:`RegistryMetrics` by default) is where the
    application counts; pass one whose :meth:`~RegistryMetrics.serve` already
    runs to expose it on a port of its own too. ``app.state.metrics`` holds it.

    ``one_time_prekeys_per_minute`` bounds how fast one client address can
    drain an agent's one-time prekeys (0: no bound); past it, bundles are
    served without one.

    ``openapi`` publishes the API's description (``/openapi.json``, ``/docs``,
    ``/redoc``); off, those paths answer 404 like any unknown path, so an
    Internet-facing registry does not hand out its map or load the docs
    pages' scripts from a CDN.

    Raises:
        ConfigurationError: ``one_time_prekeys_per_minute`` is negative.

    Starting the application (its lifespan) raises
    :class:`~talos.errors.StorageError` or
    :class:`~talos.errors.StoreCorrupted` when the database cannot be opened.
    """
    if one_time_prekeys_per_minute < 0:
        raise ConfigurationError("one_time_prekeys_per_minute must be 0 (no bound) or more")
    collectors = RegistryMetrics() if metrics is None else metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = RegistryStore.open(database)
        app.state.store = store
        app.state.clock = clock
        app.state.prekey_limiter = (
            store.drain_shares(one_time_prekeys_per_minute)
            if one_time_prekeys_per_minute > 0
            else None
        )
        collectors.attach(lambda: store.live_counts(now_ms=time_ms(clock)))
        if collectors.address is not None:
            host, port = collectors.address
            log.info(
                "registry metrics on http://%s:%d/metrics",
                host,
                port,
                extra={"event": "registry_metrics_listening", "peer_id": None, "port": port},
            )
        sweeper = asyncio.create_task(_sweep_forever(store, clock, collectors))
        try:
            yield
        finally:
            sweeper.cancel()
            collectors.detach()
            store.close()

    app = FastAPI(
        title="Talos registry",
        version="1",
        description=_DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json" if openapi else None,
        docs_url="/docs" if openapi else None,
        redoc_url="/redoc" if openapi else None,
    )
    app.include_router(router)
    app.include_router(metrics_router)
    install_error_handlers(app)
    app.state.metrics = collectors
    app.state.prekey_limiter = None  # the store's shares, once it is open
    # One warning per address per minute; the metric counts every withheld prekey.
    app.state.prekey_warnings = RateLimiter(rate=1 / 60, burst=1)
    # Included routers may be wrapped in app.routes: list their routes directly.
    collectors.declare_routes(_route_methods([*app.routes, *router.routes, *metrics_router.routes]))
    app.add_middleware(RequestMetricsMiddleware, metrics=collectors)
    return app


async def _sweep_forever(store: RegistryStore, clock: Clock, metrics: RegistryMetrics) -> None:
    """Every :data:`SWEEP_INTERVAL` seconds (real time), delete expired records."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        await sweep_once(store, clock, metrics)


async def sweep_once(store: RegistryStore, clock: Clock, metrics: RegistryMetrics) -> int | None:
    """One sweep, in the thread pool; a database failure is counted and logged, not raised."""
    try:
        swept = await run_in_threadpool(functools.partial(store.sweep, now_ms=time_ms(clock)))
    except TalosError as exc:
        metrics.storage_failed()
        log.warning(
            "sweeping expired records failed: %s",
            exc,
            extra={"event": "registry_sweep_failed", "peer_id": None},
        )
        return None
    if swept:
        metrics.records_swept.inc(swept)
        log.info(
            "swept %d expired peer records",
            swept,
            extra={"event": "registry_swept", "peer_id": None, "records": swept},
        )
    return swept


def _route_methods(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    """(method, path template) of every HTTP route."""
    pairs: list[tuple[str, str]] = []
    for route in routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if isinstance(path, str) and methods:
            pairs.extend((method, path) for method in sorted(methods))
    return pairs
