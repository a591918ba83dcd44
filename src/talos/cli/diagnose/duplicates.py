"""``talos diagnose --check-duplicates``: one identity running as several instances.

The registry lists the live instances of an identity (``--all``: of every
identity with duplicates); a running agent reports the peers it saw speak
from two instances at once.
"""

from __future__ import annotations

from datetime import UTC, datetime

from talos.cli.diagnose.agent_view import AgentView
from talos.cli.diagnose.findings import Finding, counted, registry_hint
from talos.cli.diagnose.presence import LiveCheck
from talos.discovery.registry_client import DuplicateReport, RegistryClient
from talos.errors import PeerNotFound, TalosError

__all__ = ["duplicate_checks"]

_SPLIT_BRAIN_HINT = (
    "stop every instance, decide which one's state is authoritative, rotate the keys "
    "(`talos rotate`), then run that one instance only"
)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _report_finding(report: DuplicateReport, agent: AgentView) -> Finding:
    status = agent.status or {}
    own_instance = status.get("instance_id") if status.get("agent_id") == report.agent_id else None
    instances = [
        {
            "instance_id": i.instance_id,
            "endpoint": i.endpoint,
            "first_seen": _iso(i.first_seen_ms),
            "issued": _iso(i.issued_ms),
            "expires": _iso(i.expires_ms),
            "this_agent": i.instance_id == own_instance,
        }
        for i in report.instances
    ]
    data = {"agent_id": report.agent_id, "duplicate": report.duplicate, "instances": instances}
    if not report.duplicate:
        count = len(instances)
        return Finding(
            "registry",
            "ok",
            f"{report.agent_id}: {counted(count, 'live instance')}, no duplicate",
            data=data,
        )
    listed = "; ".join(
        f"{i.instance_id[:12]} at {i.endpoint} (first seen {_iso(i.first_seen_ms)}"
        + (", this agent)" if i.instance_id == own_instance else ")")
        for i in report.instances
    )
    return Finding(
        "registry",
        "fail",
        f"{report.agent_id} runs as {len(instances)} live instances: {listed}",
        _SPLIT_BRAIN_HINT,
        data,
    )


async def duplicate_checks(
    registry: RegistryClient | None,
    agent_id: str | None,
    every: bool,
    agent: AgentView,
    live: LiveCheck | None = None,
) -> list[Finding]:
    """The registry's view, the live challenge of each listed instance (``live``), the agent's."""
    findings: list[Finding] = []
    if registry is None:
        findings.append(Finding("registry", "skip", "no registry known", registry_hint()))
    else:
        findings += await _registry_duplicates(registry, agent_id, every, agent, live)
    return findings + _seen_duplicates(agent)


async def _registry_duplicates(
    registry: RegistryClient,
    agent_id: str | None,
    every: bool,
    agent: AgentView,
    live: LiveCheck | None,
) -> list[Finding]:
    findings: list[Finding] = []
    try:
        if agent_id is None:
            findings.append(Finding("registry", "skip", "no (valid) identity in this home"))
        else:
            report = await registry.duplicates(agent_id)
            findings.append(_report_finding(report, agent))
            if live is not None:
                findings += await live(report)
        if every:
            reports = [r for r in await registry.all_duplicates() if r.duplicate]
            findings += [_report_finding(r, agent) for r in reports]
            if not reports:
                findings.append(
                    Finding("registry", "ok", "no identity the registry knows has duplicates")
                )
    except PeerNotFound as exc:
        findings.append(
            Finding(
                "registry",
                "warn",
                f"the registry does not report duplicates (an older version?): {exc}",
            )
        )
    except TalosError as exc:
        findings.append(
            Finding(
                "registry",
                "fail",
                f"duplicates not checked: {type(exc).__name__}: {exc}",
                "retry when the registry answers (see --network)",
            )
        )
    return findings


def _seen_duplicates(agent: AgentView) -> list[Finding]:
    if not agent.running:
        return [Finding("agent", "skip", "agent not running: no observations of peer instances")]
    seen: dict[str, int] = (agent.status or {}).get("duplicate_instances") or {}
    if not seen:
        return [Finding("agent", "ok", "the agent saw no peer speak from two instances at once")]
    return [
        Finding(
            "agent",
            "fail",
            f"{peer} spoke from two instances at once ({counted(count, 'time')})",
            f"tell {peer}'s operator: {_SPLIT_BRAIN_HINT}",
            {"agent_id": peer, "count": count},
        )
        for peer, count in sorted(seen.items())
    ]
