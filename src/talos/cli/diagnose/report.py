"""The diagnosis as a report on stdout: one section per check, or one JSON object."""

from __future__ import annotations

from typing import Any, Final

from rich.console import Console
from rich.markup import escape

from talos.cli.context import CliContext
from talos.cli.diagnose.agent_view import AgentView
from talos.cli.diagnose.findings import Finding, Status, counted

__all__ = ["CHECKS", "json_report", "print_report", "tally"]

CHECKS: Final = ("network", "storage", "duplicates", "clock")
_MARKS: Final[dict[Status, str]] = {
    "ok": "green",
    "info": "cyan",
    "skip": "dim",
    "warn": "yellow",
    "fail": "bold red",
}


def print_report(
    ctx: CliContext, agent: AgentView, url: tuple[str | None, str], results: dict[str, Any]
) -> None:
    console = Console(highlight=False, soft_wrap=True)
    registry = "none known" if url[0] is None else f"{url[0]} (from {url[1]})"
    state = (
        f"running (pid {agent.pid})"
        if agent.running
        else ("not answering" if agent.problem else "not running")
    )
    for label, value in (("home", str(ctx.home)), ("agent", state), ("registry", registry)):
        console.print(f"{label:<10}{escape(value)}")
    for check in CHECKS:
        if check in results:
            console.print(f"\n[bold]{check}[/]")
            for finding in results[check]:
                _print_finding(console, finding)
    problems, warnings = tally(results)
    console.print()
    if problems:
        console.print(
            f"[bold red]{counted(problems, 'problem')} found[/]"
            + (f", {counted(warnings, 'warning')}" if warnings else "")
        )
    elif warnings:
        console.print(f"[yellow]no problem found; {counted(warnings, 'warning')}[/]")
    else:
        console.print("[green]no problem found[/]")


def _print_finding(console: Console, finding: Finding) -> None:
    mark = f"[{_MARKS[finding.status]}]{finding.status.upper():<5}[/]"
    console.print(f"  {mark} {escape(finding.subject):<15} {escape(finding.detail)}")
    if finding.hint:
        console.print(f"  {'':<5} {'':<15} [dim]hint: {escape(finding.hint)}[/]")


def tally(results: dict[str, list[Finding]]) -> tuple[int, int]:
    findings = [f for check in results.values() for f in check]
    return sum(f.status == "fail" for f in findings), sum(f.status == "warn" for f in findings)


def json_report(
    ctx: CliContext, agent: AgentView, url: tuple[str | None, str], results: dict[str, Any]
) -> dict[str, Any]:
    problems, warnings = tally(results)
    return {
        "ok": problems == 0,
        "problems": problems,
        "warnings": warnings,
        "home": str(ctx.home),
        "agent": {
            "running": agent.running,
            "pid": agent.pid,
            "problem": agent.problem or None,
        },
        "registry": {"url": url[0], "source": url[1] or None},
        "checks": {
            check: [finding.to_json() for finding in findings]
            for check, findings in results.items()
        },
    }
