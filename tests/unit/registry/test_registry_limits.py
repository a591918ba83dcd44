"""ClientLimits' checks, the guard's rate-limited log lines, and the serve options."""

from __future__ import annotations

import logging
import math

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from talos.cli import registry as cli
from talos.errors import ConfigurationError
from talos.registry import limits
from talos.registry.limits import LOG_BURST, LOG_INTERVAL, ClientLimits, ConnectionGuard
from talos.registry.metrics import RegistryMetrics


def value(metrics: RegistryMetrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


@pytest.mark.parametrize(
    "bad",
    [
        {"header_timeout": math.nan},
        {"header_timeout": math.inf},
        {"header_timeout": 0.0},
        {"request_timeout": -1.0},
        {"request_timeout": math.nan},
        {"header_timeout": 5.0, "request_timeout": 4.0},
        {"max_connections": 0},
        {"keep_alive_timeout": 0},
    ],
)
def test_limits_refuse_what_cannot_work(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        ClientLimits(**bad)  # type: ignore[arg-type]


def test_every_series_exists_at_zero() -> None:
    metrics = RegistryMetrics()
    for reason in ("header_timeout", "request_timeout"):
        assert value(metrics, "talos_registry_clients_dropped_total", reason=reason) == 0
    assert value(metrics, "talos_registry_connections_refused_total") == 0
    assert value(metrics, "talos_registry_connections") == 0


def test_a_flood_is_counted_in_full_and_logged_a_few_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = RegistryMetrics()
    guard = ConnectionGuard(ClientLimits(max_connections=7), metrics)
    caplog.set_level(logging.WARNING, logger="talos.registry")
    for i in range(1000):
        guard.refused("192.0.2.1", 7, now=100.0 + i / 1000)
        guard.dropped("header_timeout", "192.0.2.2", now=100.0 + i / 1000)
    assert value(metrics, "talos_registry_connections_refused_total") == 1000
    assert value(metrics, "talos_registry_clients_dropped_total", reason="header_timeout") == 1000
    by_event = {
        name: [r for r in caplog.records if getattr(r, "event", None) == name]
        for name in ("registry_connections_refused", "registry_client_dropped")
    }
    assert [len(lines) for lines in by_event.values()] == [LOG_BURST, LOG_BURST]
    caplog.clear()
    # Later, one line says how many were not logged meanwhile.
    guard.refused("192.0.2.1", 7, now=101.0 + LOG_INTERVAL)
    [line] = caplog.records
    assert line.__dict__["suppressed"] == 1000 - LOG_BURST
    assert line.__dict__["limit"] == 7
    assert f"({1000 - LOG_BURST} more not logged)" in line.getMessage()


def test_the_cli_defaults_are_the_library_defaults() -> None:
    assert (cli.HEADER_TIMEOUT, cli.REQUEST_TIMEOUT) == (
        limits.HEADER_TIMEOUT,
        limits.REQUEST_TIMEOUT,
    )
    assert (cli.MAX_CONNECTIONS, cli.KEEP_ALIVE_TIMEOUT) == (
        limits.MAX_CONNECTIONS,
        limits.KEEP_ALIVE_TIMEOUT,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--header-timeout", "nan"],
        ["--header-timeout", "inf"],
        ["--header-timeout", "0"],
        ["--request-timeout", "-1"],
        ["--request-timeout", "1e9"],
        ["--header-timeout", "5", "--request-timeout", "2"],
        ["--max-connections", "0"],
        ["--keep-alive-timeout", "0"],
    ],
)
def test_serve_refuses_bad_limits_with_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(cli.registry, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
