"""What the demo prints: step headings, checkpoints, commands, metric changes, logs.

The stable markers that tests and scripts read are printed here: ``STEP n``
headings, ``ok [n.name]`` checkpoints and ``metric n AGENT SERIES BEFORE ->
AFTER`` lines. Paths under the demo directory are shown as ``$DEMO``, agent
ids as ``<name>`` and capability tokens cut short.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.markup import escape

from talos.demo import DemoFailure
from talos.testing.cli import CliResult

console = Console(highlight=False, soft_wrap=True)

_TOKEN = re.compile(r"tcap1\.[A-Za-z0-9_-]{40,}")


class Named(Protocol):
    """Anything with a name and (once known) an agent id."""

    name: str
    agent_id: str


@dataclass
class Narrator:
    """Prints the story of the demo in ``root`` about ``agents``; knows the current step."""

    root: Path
    agents: Sequence[Named]
    step_label: str = "setup"

    def step(self, number: int, title: str, story: str) -> None:
        self.step_label = f"step {number} ({title})"
        console.print()
        console.rule(f"[bold]STEP {number}[/] {escape(title)}", align="left")
        console.print(story)

    def shown(self, text: str) -> str:
        """``text`` with the demo directory and agent ids in short form."""
        text = _TOKEN.sub(lambda m: m.group(0)[:24] + "...", text.replace(str(self.root), "$DEMO"))
        for agent in self.agents:
            if agent.agent_id:
                text = text.replace(agent.agent_id, f"<{agent.name}>")
        return text

    def check(self, name: str, what: str) -> None:
        console.print(f"  [green]ok[/] [{escape(name)}] {escape(what)}", markup=True)

    def fail(self, what: str) -> DemoFailure:
        """A failure of the current step (to raise)."""
        return DemoFailure(f"{self.step_label}: {what}")

    def rule(self, title: str) -> None:
        console.rule(title, align="left")

    def say(self, text: str) -> None:
        """Print ``text`` (with rich markup)."""
        console.print(text)

    def metric_changes(
        self,
        number: int,
        agent: str,
        before: Mapping[str, float],
        after: Mapping[str, float],
        series: Sequence[str],
    ) -> None:
        """Print ``series`` as ``before -> after`` (and the change, when there is one)."""
        for name in series:
            old, new = before.get(name, math.nan), after.get(name, math.nan)
            change = new - old
            moved = "" if change == 0 or math.isnan(change) else f" ({change:+g})"
            console.print(f"  [magenta]metric[/] {number} {agent} {name} {old:g} -> {new:g}{moved}")

    def command(self, result: CliResult) -> None:
        """Show a ``talos`` command line and what it printed."""
        console.print(f"  [dim]$[/] [bold]{escape(self.shown(shlex.join(result.argv[2:])))}[/]")
        for line in (result.stdout + result.stderr).strip().splitlines():
            console.print(f"    [dim]{escape(self.shown(line))}[/]")

    def log(self, name: str, text: str) -> None:
        """The last lines of a process's log, after a failure."""
        console.print(f"[dim]--- {name} log (last lines) ---[/]")
        console.print(f"[dim]{escape(self.shown(text))}[/]")
