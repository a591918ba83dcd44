"""Prometheus metrics of the registry server: every ``talos_registry_*`` series.

Like :class:`talos.metrics.AgentMetrics`, each :class:`RegistryMetrics` owns a
private :class:`~prometheus_client.CollectorRegistry`, and every series,
including each expected value of a labelled one, exists from construction
with its zero value. The gauges (live agents, live instances, duplicated
identities) are read from the store at scrape time, so they are right even
when records simply expire; until a store is attached they are zero.

The same text is served at ``GET /metrics`` on the API port and, with
``talos registry serve --metrics-port N``, on a port of its own. See
``docs/metrics.md`` ("Registry") for the list.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talos.errors import StorageError
from talos.logs import LimitedLog
from talos.metrics import MetricsEndpoint, SuppressedLines
from talos.registry.backend import LiveCounts
from talos.system import SYSTEM_CLOCK

__all__ = [
    "CONTENT_TYPE",
    "DROP_REASONS",
    "OTHER",
    "REJECTION_REASONS",
    "STATUS_CLASSES",
    "SUBMISSION_KINDS",
    "RegistryMetrics",
    "RequestMetricsMiddleware",
]

#: Media type of the exposition text.
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
#: Label value for anything outside the known values (keeps label cardinality bounded).
OTHER: Final = "other"
#: Values of the ``status`` label of ``talos_registry_requests_total``.
STATUS_CLASSES: Final = ("2xx", "3xx", "4xx", "5xx")
#: Values of the ``kind`` label of ``talos_registry_rejections_total``.
SUBMISSION_KINDS: Final = ("keylog", "prekeys", "record", "revocations")
#: Values of the ``reason`` label of ``talos_registry_rejections_total``: the
#: ``error`` names a refusal can carry (``docs/design/registry.md``), plus ``other``.
REJECTION_REASONS: Final = (
    "AgentMismatch",
    "ClientDisconnect",
    "KeyLogInvalid",
    "KeyLogRollback",
    "MalformedFrame",
    "NotCurrentKey",
    "PayloadTooLarge",
    "RevocationListForked",
    "RevocationListNotAppendOnly",
    "SignatureInvalid",
    "StaleMessage",
    "StaleSequence",
    "UnknownAgent",
    "UnsupportedMediaType",
    "UnsupportedVersion",
    OTHER,
)
#: Values of the ``reason`` label of ``talos_registry_clients_dropped_total``
#: (``talos.registry.limits``): which deadline a slow client missed.
DROP_REASONS: Final = ("header_timeout", "request_timeout")
_METHODS: Final = ("GET", "PUT")
_LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

log = logging.getLogger("talos.registry")


class RegistryMetrics:
    """The registry's Prometheus collectors, and the events that move them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._endpoint = MetricsEndpoint(self.registry)
        r = self.registry
        # First, so that a database failure while reading the gauges is counted
        # in the same scrape.
        self._live = _LiveGauges(self)
        r.register(self._live)
        self.requests = Counter(
            "talos_registry_requests",
            "HTTP requests answered, by method, route template and status class.",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "talos_registry_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "talos_registry_rejections",
            "Submissions refused with a 4xx, by submission kind and refusal name.",
            ["kind", "reason"],
            registry=r,
        )
        self.duplicate_instances = Counter(
            "talos_registry_duplicate_instances",
            "Accepted peer records that revealed an identity running as overlapping instances.",
            registry=r,
        )
        self.one_time_prekeys_served = Counter(
            "talos_registry_one_time_prekeys_served",
            "One-time prekeys handed out in bundles (each once).",
            registry=r,
        )
        self.bundles_without_one_time_prekey = Counter(
            "talos_registry_bundles_without_one_time_prekey",
            "Bundles served without a one-time prekey because the agent's pool was empty.",
            registry=r,
        )
        self.one_time_prekeys_withheld = Counter(
            "talos_registry_one_time_prekeys_withheld",
            "Bundles served without a one-time prekey because the asking address "
            "took its share of that agent's prekeys (drain protection).",
            registry=r,
        )
        self.db_errors = Counter(
            "talos_registry_db_errors",
            "Database failures (answered 503, a gauge that could not be read, a failed sweep).",
            registry=r,
        )
        self.records_swept = Counter(
            "talos_registry_records_swept",
            "Expired peer records deleted by this replica's sweeps.",
            registry=r,
        )
        self.clients_dropped = Counter(
            "talos_registry_clients_dropped",
            "Connections closed because the client sent its request head or whole request "
            "too slowly, by the deadline it missed.",
            ["reason"],
            registry=r,
        )
        self.connections_refused = Counter(
            "talos_registry_connections_refused",
            "Connections answered 503 and closed because --max-connections were open.",
            registry=r,
        )
        self.connections = Gauge(
            "talos_registry_connections",
            "Client connections open on the API port (refused ones not included).",
            registry=r,
        )
        for drop in DROP_REASONS:
            self.clients_dropped.labels(reason=drop)
        r.register(SuppressedLines("talos_registry_log_lines_suppressed"))
        for kind in SUBMISSION_KINDS:
            for reason in REJECTION_REASONS:
                self.rejections.labels(kind=kind, reason=reason)
        self._declare(OTHER, OTHER)

    def declare_routes(self, routes: Iterable[tuple[str, str]]) -> None:
        """Create the request series of each (method, route template) at zero."""
        for method, route in routes:
            if method in _METHODS:
                self._declare(method, route)

    def _declare(self, method: str, route: str) -> None:
        for status in STATUS_CLASSES:
            self.requests.labels(method=method, route=route, status=status)
        self.request_seconds.labels(method=method, route=route)

    # -- the store behind the gauges ------------------------------------------------------

    def attach(self, counts: Callable[[], LiveCounts]) -> None:
        """Read the gauges from ``counts`` (the store, at the current time) from now on."""
        self._live.source = counts

    def detach(self) -> None:
        """Gauges read zero again (the store is closing)."""
        self._live.source = None

    # -- events -------------------------------------------------------------------------

    def request_answered(self, method: str, route: str, status: int, seconds: float) -> None:
        """An HTTP request got ``status`` after ``seconds``; unknown labels become ``other``."""
        method = method if method in _METHODS else OTHER
        status_class = f"{status // 100}xx"
        if status_class not in STATUS_CLASSES:
            status_class = "5xx"
        self.requests.labels(method=method, route=route, status=status_class).inc()
        self.request_seconds.labels(method=method, route=route).observe(seconds)

    def submission_rejected(self, kind: str, reason: str) -> None:
        """A ``kind`` submission was refused with the error name ``reason``."""
        kind = kind if kind in SUBMISSION_KINDS else OTHER
        reason = reason if reason in REJECTION_REASONS else OTHER
        self.rejections.labels(kind=kind, reason=reason).inc()

    def duplicate_detected(self) -> None:
        self.duplicate_instances.inc()

    def bundle_served(self, *, with_one_time_prekey: bool, withheld: bool = False) -> None:
        if with_one_time_prekey:
            self.one_time_prekeys_served.inc()
        elif withheld:
            self.one_time_prekeys_withheld.inc()
        else:
            self.bundles_without_one_time_prekey.inc()

    def storage_failed(self) -> None:
        self.db_errors.inc()

    def client_dropped(self, reason: str) -> None:
        """A slow client missed the ``reason`` deadline (one of :data:`DROP_REASONS`)."""
        self.clients_dropped.labels(reason=reason if reason in DROP_REASONS else OTHER).inc()

    def connection_refused(self) -> None:
        self.connections_refused.inc()

    # -- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text format (what ``/metrics`` answers); reads the store."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (0: any free port); see :class:`MetricsEndpoint`.

        Raises:
            ConfigurationError: the address cannot be bound (in use, not local).
        """
        return self._endpoint.serve(port, host)

    @property
    def address(self) -> tuple[str, int] | None:
        """The metrics port's address, or ``None`` when it is not served."""
        return self._endpoint.address

    def close(self) -> None:
        """Stop the metrics port, if any (idempotent)."""
        self._endpoint.close()


class _LiveGauges(Collector):
    """The gauges read from the store when scraped (NaN when the database fails)."""

    _HELP: Final = {
        "talos_registry_live_agents": "Agents with at least one unexpired peer record.",
        "talos_registry_live_instances": "Unexpired peer records (one per agent instance).",
        "talos_registry_duplicate_identities": (
            "Agents whose live instances overlap (split brain; see docs/design/registry.md)."
        ),
    }

    def __init__(self, metrics: RegistryMetrics) -> None:
        self._metrics = metrics
        self._logs = LimitedLog(log, SYSTEM_CLOCK)
        self.source: Callable[[], LiveCounts] | None = None

    def describe(self) -> Iterator[Metric]:
        for name, text in self._HELP.items():
            yield GaugeMetricFamily(name, text)

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        for (name, text), value in zip(self._HELP.items(), values, strict=True):
            yield GaugeMetricFamily(name, text, value=value)

    def _read(self) -> tuple[float, float, float]:
        source = self.source
        if source is None:
            return 0.0, 0.0, 0.0
        try:
            counts = source()
        except StorageError as exc:
            self._metrics.storage_failed()
            self._logs.log(  # anyone who can GET /metrics causes this line
                logging.ERROR,
                "registry_storage_failure",
                "cannot read the registry gauges: %s",
                exc,
                peer_id=None,
            )
            return math.nan, math.nan, math.nan
        return float(counts.agents), float(counts.instances), float(counts.duplicate_identities)


class RequestMetricsMiddleware:
    """ASGI middleware counting and timing every HTTP request by its route template.

    Requests that match no route are labelled ``other``, so the number of
    series stays bounded whatever paths clients send.
    """

    def __init__(self, app: ASGIApp, metrics: RegistryMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes becomes a 500 outside this middleware

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", None)
            self.metrics.request_answered(
                scope["method"],
                route if isinstance(route, str) else OTHER,
                status,
                time.perf_counter() - started,
            )
