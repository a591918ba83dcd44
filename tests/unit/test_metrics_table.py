"""docs/metrics.md, "What moves each metric": every agent series has a row naming the
code that moves it and a system test that shows it moving, and only exported series do.

The system tests themselves check the values (``tests/integration/test_metrics_moved.py``
is the shared scenario); this test keeps the table honest: a series added to
:class:`talos.metrics.AgentMetrics` without a row, a row for a removed series, or a
row naming a test that never mentions the series fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from talos.metrics import AgentMetrics

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
SCENARIO = ROOT / "tests" / "integration" / "test_metrics_moved.py"
#: Series no system test shows moving yet, each with the reason (the report says so).
PENDING: dict[str, str] = {}
_ROW = re.compile(r"^\| `(talos_\w+)` \| (.+?) \| (.+) \|$")


def rows() -> dict[str, tuple[str, str]]:
    text = DOC.read_text()
    section = text.split("## What moves each metric", 1)[1].split("\n## ", 1)[0]
    found: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        match = _ROW.match(line)
        if match:
            name, moved_by, test = match.groups()
            assert name not in found, f"{name} twice"
            found[name] = (moved_by, test)
    return found


def exported() -> set[str]:
    names = set()
    for family in text_string_to_metric_families(AgentMetrics().render().decode()):
        if family.name.endswith("_created"):  # prometheus_client's timestamps of counters
            continue
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_every_exported_series_has_a_row_and_every_row_is_exported() -> None:
    assert set(rows()) == exported()


def test_every_row_names_a_system_test_that_names_the_series() -> None:
    for name, (moved_by, test) in rows().items():
        assert moved_by.strip(), name
        if name in PENDING:
            assert test.startswith("—"), name
            continue
        path = ROOT / test.strip("`")
        assert path.parent == ROOT / "tests" / "integration", (name, test)
        assert name in path.read_text(), f"{test} does not name {name}"


def test_the_shared_scenario_checks_every_series_it_is_named_for() -> None:
    """A row naming the scenario is backed by an entry of its ``SCENARIO`` table."""
    scenario = SCENARIO.read_text().split("SCENARIO:", 1)[1].split("\n}\n", 1)[0]
    named = {name for name, (_, test) in rows().items() if test.strip("`").endswith(SCENARIO.name)}
    for name in named:
        base = name.removesuffix("_bucket")
        assert re.search(rf'\("{base}(_count)?", ', scenario), name


def test_every_series_is_in_the_reference() -> None:
    text = DOC.read_text().split("## What moves each metric", 1)[0]
    for name in exported():
        assert f"`{name}`" in text, name
