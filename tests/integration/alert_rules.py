"""The shipped alert rules, as the recorded-run promtool tests need them.

Used by test_anchor_alert.py and test_equivocation_alert.py.
"""

from __future__ import annotations

from pathlib import Path

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "talos-alerts.yml"


def description(alert: str) -> str:
    """The folded ``description`` of ``alert``, escaped for a double-quoted YAML string."""
    text = RULES.read_text()
    block = text[text.index(f"alert: {alert}") :]
    block = block[block.index("description: >-") + len("description: >-") :]
    lines = []
    for line in block.splitlines()[1:]:
        if not line.startswith("            "):
            break
        lines.append(line.strip())
    return " ".join(lines).replace("\\", "\\\\").replace('"', '\\"')
