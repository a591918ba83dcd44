"""deploy/grafana/talos-dashboard.json: valid, on real metric names, covering every alert."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.metrics import AgentMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "talos-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "talos-alerts.yml"

#: Series the registry exports (the only ones the dashboard may use besides the agent's).
REGISTRY_SERIES = frozenset(
    {
        "talos_registry_duplicate_identities",
        "talos_registry_duplicate_instances_total",
        "talos_registry_rejections_total",
    }
)
#: Series Prometheus itself writes for every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})

ROWS = (
    "Delivery",
    "Sessions",
    "Security",
    "Capabilities and revocation",
    "Audit",
    "Clock",
    "Registry reachability",
    "Registry",
)

#: Values for Grafana's variables when an expression is handed to promtool.
VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "job": ".*",
    "instance": ".*",
    "registry_job": "talos-registry",
}

_NOT_METRICS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan", "Inf", "NaN"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a tokenizer, enough for our queries)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    text = re.sub(grouping, "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match.group() not in _NOT_METRICS:
            names.add(match.group())
    return names


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and panels nested in collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def graphs(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(board) if p["type"] != "row"]


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and the label_values() of query variables."""
    exprs = [t["expr"] for p in graphs(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        exprs.append(match.group(1))
    return exprs


def agent_series() -> set[str]:
    """Every sample name a fresh agent exports (``_total``, ``_bucket``, ... included)."""
    text = AgentMetrics().render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def alerts() -> dict[str, str]:
    """Alert name -> expression, from the rules file (one-line ``expr:`` each)."""
    text = ALERTS.read_text()
    found = dict(re.findall(r"- alert: (\S+)\n\s+expr: (.+)", text))
    assert len(found) == text.count("- alert:") > 0
    assert not any(expr.startswith((">", "|")) for expr in found.values())
    return found


# -- tests ------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_with_the_variables_and_rows() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"]
    assert board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["type"] == variables["instance"]["type"] == "query"
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == list(ROWS)
    for panel in graphs(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert panel.get("description"), panel["title"]


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    board = dashboard()
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    for panel in graphs(board):
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_metric_name_exists() -> None:
    known = agent_series() | REGISTRY_SERIES | PROMETHEUS_SERIES
    used = set().union(*(metric_names(e) for e in expressions(dashboard())))
    assert used, "no expressions found"
    assert used - known == set()


def test_every_agent_metric_has_a_panel() -> None:
    text = AgentMetrics().render().decode()
    families = {
        family.name
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")  # prometheus_client's start timestamps
    }
    used = " ".join(expressions(dashboard()))
    assert {name for name in families if name not in used} == set()


def test_every_alert_has_a_panel_showing_its_metrics() -> None:
    shown = [
        (panel, set().union(*(metric_names(t["expr"]) for t in panel["targets"])))
        for panel in graphs(dashboard())
    ]
    for alert, expr in alerts().items():
        needed = metric_names(expr)
        assert needed, alert
        showing = [panel for panel, names in shown if needed <= names]
        assert showing, f"no panel shows {sorted(needed)} for {alert}"
        assert any(alert in panel["description"] for panel in showing), alert


def test_metric_name_tokenizer() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, instance) (rate(talos_x_bucket{job=~"$job",'
        'le="+Inf"}[$__rate_interval]))) / on (instance) group_left up{job="a b"} > 1e3'
    )
    assert metric_names(expr) == {"talos_x_bucket", "up"}
    assert metric_names("talos_registry_up == 0 or up == 0") == {"talos_registry_up", "up"}


def test_expressions_parse_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian package `prometheus`)")
    rules = ["groups:", "  - name: talos-dashboard", "    rules:"]
    for index, expr in enumerate(expressions(dashboard())):
        for name, value in VARIABLES.items():
            expr = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value, expr)
        assert "$" not in expr, expr
        rules += [
            f"      - record: talos_dashboard:expr_{index}",
            f"        expr: {json.dumps(expr)}",
        ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    result = subprocess.run(  # noqa: S603 -- promtool found on PATH, our own file
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
