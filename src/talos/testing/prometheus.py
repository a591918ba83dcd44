"""A real Prometheus server for alert tests: Debian's ``prometheus``, scraping every second.

:func:`start_prometheus` writes a configuration that scrapes the given agents
(job ``talos-agent``) and registries (job ``talos-registry``) every second,
evaluates a rules file every second and serves its HTTP API on a free port;
:class:`Prometheus` reads the alerts' states from that API
(``/api/v1/alerts``), waiting for what the test expects. :func:`test_copy`
shortens a rules file's ``for:`` durations and range windows, so a test
lasts seconds; the shipped rules are never touched.

Used by ``tests/integration/test_alerts_prometheus*.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from talos.testing.child import ChildProcess, spawn
from talos.testing.processes import free_port
from talos.testing.waiting import wait_until

__all__ = ["Prometheus", "prometheus_binary", "shortened_rules", "start_prometheus"]

#: Seconds an alert gets to reach the state a test waits for.
WITHIN = 60.0
#: The alert states Prometheus reports (an inactive alert is not listed).
ACTIVE = ("pending", "firing")


def prometheus_binary() -> str | None:
    """The ``prometheus`` server on PATH (Debian package ``prometheus``), if any."""
    return shutil.which("prometheus")


def shortened_rules(
    rules: str, *, hold: str = "2s", window: str = "30s", replace: Mapping[str, str] | None = None
) -> str:
    """``rules`` with every ``for:`` set to ``hold``, every range window to ``window``,
    and each key of ``replace`` (an expression's text, e.g. a threshold) replaced.

    Raises:
        ValueError: a key of ``replace`` is not in ``rules``.
    """
    for old, new in (replace or {}).items():
        if old not in rules:
            raise ValueError(f"not in the rules: {old!r}")
        rules = rules.replace(old, new)
    rules = re.sub(r"for: \d+[smh]", f"for: {hold}", rules)
    return re.sub(r"\[\d+[smh]\]", f"[{window}]", rules)


@dataclass
class Prometheus:
    """A running Prometheus server and its HTTP API at ``url``."""

    child: ChildProcess
    url: str

    def stop(self) -> None:
        self.child.stop()

    async def _get(self, path: str, **params: str) -> Any:
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{self.url}{path}", params=params, timeout=5)
        answer.raise_for_status()
        return answer.json()["data"]

    async def alerts(self, state: str = "firing") -> dict[str, list[dict[str, Any]]]:
        """The alerts in ``state`` (``pending`` or ``firing``), by name."""
        found: dict[str, list[dict[str, Any]]] = {}
        for alert in (await self._get("/api/v1/alerts"))["alerts"]:
            if alert["state"] == state:
                found.setdefault(alert["labels"]["alertname"], []).append(alert)
        return found

    async def active(self) -> dict[str, list[dict[str, Any]]]:
        """The pending and firing alerts, by name."""
        found: dict[str, list[dict[str, Any]]] = {}
        for alert in (await self._get("/api/v1/alerts"))["alerts"]:
            found.setdefault(alert["labels"]["alertname"], []).append(alert)
        return found

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now."""
        result: list[dict[str, Any]] = (await self._get("/api/v1/query", query=expr))["result"]
        return result

    async def until_scraped(self, targets: int, within: float = WITHIN) -> None:
        """Wait until ``targets`` targets are up (scraped), so each counter's 0 is on record."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if len(await self.query("up == 1")) >= targets:
                return
            await asyncio.sleep(0.5)  # the first scrapes come within a second or two
        raise AssertionError(
            f"Prometheus did not scrape {targets} targets: {await self.query('up')}"
        )

    async def evaluations(self, count: int, within: float = WITHIN) -> None:
        """Wait until every rule group has been evaluated ``count`` more times (at
        one evaluation a second: until each one's last evaluation is ``count``
        seconds past the call)."""
        since = time.time() + count
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            groups = (await self._get("/api/v1/rules"))["groups"]
            stamps = [_epoch(group["lastEvaluation"]) for group in groups]
            if groups and min(stamps) >= since:
                return
            await asyncio.sleep(0.5)  # Prometheus evaluates every second; let the agents run
        raise AssertionError(f"the rules were not evaluated {count} more times")

    async def until_firing(self, name: str, within: float = WITHIN) -> list[dict[str, Any]]:
        """Wait (an asyncio caller's agents run meanwhile) until ``name`` fires."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            alerts = (await self.alerts()).get(name)
            if alerts:
                return alerts
            await asyncio.sleep(0.5)  # Prometheus evaluates every second; let the agents run
        raise AssertionError(f"{name} did not fire within {within:.0f}s: {await self.active()}")


def _epoch(stamp: str) -> float:
    """An RFC 3339 time of the Prometheus API (nanoseconds, ``Z``) as seconds since the epoch."""
    head, _, fraction = stamp.rstrip("Z").partition(".")
    whole = datetime.fromisoformat(head + "+00:00").timestamp()
    return whole + (float(f"0.{fraction}") if fraction else 0.0)


def start_prometheus(
    directory: Path,
    rules: str,
    *,
    agents: Sequence[str],
    registries: Sequence[str] = (),
) -> Prometheus:
    """A Prometheus scraping ``agents`` and ``registries`` (``host:port``) every second
    and evaluating ``rules`` (the text of a rules file) every second, ready.

    Its configuration, rules, database and log are kept in ``directory``.

    Raises:
        FileNotFoundError: no ``prometheus`` on PATH.
    """
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not on PATH: apt-get install prometheus")
    directory.mkdir(parents=True, exist_ok=True)
    rules_file = directory / "talos-alerts.test-copy.yml"
    rules_file.write_text(rules)
    config = directory / "prometheus.yml"
    config.write_text(
        f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules_file}
scrape_configs:
  - job_name: talos-agent
    static_configs:
      - targets: {list(agents)}
  - job_name: talos-registry
    static_configs:
      - targets: {list(registries)}
"""
    )
    port = free_port()
    child = spawn(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        env={"PATH": os.environ.get("PATH", "")},
        log=directory / "prometheus.log",
        name="prometheus",
        stdout_pipe=False,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 30.0, what="prometheus ready")
    except BaseException:
        child.stop()
        raise
    return Prometheus(child, url)
