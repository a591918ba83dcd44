"""``talos diagnose --check-clock``: this host's clock against the registry's and the peers'.

The registry's offset is the best of :data:`CLOCK_SAMPLES` NTP-style round
trips (:func:`best_sample`); the peers' offsets are the ones the running
agent measured from signed ACKs. Beyond :data:`REJECT_TOLERANCE` envelopes
and capabilities are refused, so that is a ``fail``.
"""

from __future__ import annotations

from typing import Final

from talos.cli.diagnose.agent_view import AgentView
from talos.cli.diagnose.findings import Finding, Status, registry_hint
from talos.core.capability import DEFAULT_CLOCK_SKEW
from talos.core.clock import Clock
from talos.core.clocksync import ClockSample, offset_from
from talos.core.replay import DEFAULT_MAX_SKEW_MS
from talos.discovery.registry_client import RegistryClient
from talos.errors import TalosError

__all__ = ["CLOCK_SAMPLES", "REJECT_TOLERANCE", "best_sample", "clock_checks", "clock_status"]

#: Beyond this offset (seconds) envelopes (replay window) and capabilities are refused.
REJECT_TOLERANCE: Final = min(DEFAULT_MAX_SKEW_MS / 1000, DEFAULT_CLOCK_SKEW)
#: Round trips to the registry's clock; the one with the shortest delay is kept.
CLOCK_SAMPLES: Final = 5
_CLOCK_HINT = "synchronize the host clock (NTP), then restart the agent"


def clock_status(offset: float, *, warn: float, tolerance: float = REJECT_TOLERANCE) -> Status:
    """``fail`` beyond the rejection tolerance, ``warn`` beyond ``warn``, else ``ok``."""
    if abs(offset) > tolerance:
        return "fail"
    if abs(offset) > warn:
        return "warn"
    return "ok"


def best_sample(samples: list[ClockSample]) -> ClockSample:
    """The sample with the shortest round trip: its offset has the smallest error bound.

    Raises:
        ValueError: no samples.
    """
    return min(samples, key=lambda sample: sample.delay)


async def _registry_offset(registry: RegistryClient, clock: Clock) -> ClockSample:
    """Best of :data:`CLOCK_SAMPLES` NTP exchanges; the sample's offset is registry - local.

    Raises:
        TalosError: the registry does not answer (or not with a time).
    """
    samples = []
    for _ in range(CLOCK_SAMPLES):
        t1 = clock.time()
        server = await registry.time_ms() / 1000  # one timestamp: t2 = t3
        samples.append(offset_from(t1, server, server, clock.time()))
    return best_sample(samples)


def _describe_offset(ahead: float) -> str:
    return f"{abs(ahead):.3f} s {'ahead of' if ahead >= 0 else 'behind'}"


async def clock_checks(
    registry: RegistryClient | None, clock: Clock, agent: AgentView, warn: float
) -> list[Finding]:
    findings: list[Finding] = []
    if registry is None:
        findings.append(Finding("registry", "skip", "no registry known", registry_hint()))
    else:
        findings.append(await _registry_clock(registry, clock, warn))
    return findings + _peer_clocks(agent, warn)


async def _registry_clock(registry: RegistryClient, clock: Clock, warn: float) -> Finding:
    try:
        sample = await _registry_offset(registry, clock)
    except TalosError as exc:
        return Finding(
            "registry",
            "fail",
            f"not measured: {type(exc).__name__}: {exc}",
            "retry when the registry answers (see --network)",
        )
    ours = -sample.offset  # positive: this host is ahead
    status = clock_status(ours, warn=warn)
    detail = (
        f"this host's clock is {_describe_offset(ours)} the registry's "
        f"(± {sample.delay / 2 * 1000:.1f} ms, best of {CLOCK_SAMPLES})"
    )
    return Finding(
        "registry",
        status,
        detail + _consequence(status, warn),
        _CLOCK_HINT if status != "ok" else "",
        {
            "url": registry.base_url,
            "offset_s": round(ours, 6),
            "delay_s": round(sample.delay, 6),
            "samples": CLOCK_SAMPLES,
        },
    )


def _consequence(status: Status, warn: float) -> str:
    if status == "fail":
        return (
            f"; beyond the {REJECT_TOLERANCE:g} s clock-skew tolerance, envelopes and "
            "capabilities are refused"
        )
    if status == "warn":
        return f"; above the {warn:g} s warning threshold"
    return ""


def _peer_clocks(agent: AgentView, warn: float) -> list[Finding]:
    if not agent.running:
        return [Finding("peers", "skip", "agent not running: peer clocks are measured by it")]
    status = agent.status or {}
    findings = []
    if status.get("clock_offset_s") is not None:
        ours = float(status["clock_offset_s"])
        findings.append(
            Finding(
                "agent",
                "info",
                f"at its last announcement the agent found this host {_describe_offset(ours)} "
                "the registry",
                data={"offset_s": ours},
            )
        )
    measured: dict[str, dict[str, float]] = status.get("peer_clock") or {}
    if not measured:
        findings.append(
            Finding("peers", "info", "no peer measured yet (from signed ACKs to sent messages)")
        )
    for peer, sample in sorted(measured.items()):
        theirs = float(sample["offset_s"])  # positive: the peer is ahead
        verdict = clock_status(theirs, warn=warn)
        detail = (
            f"{peer}'s clock is {_describe_offset(theirs)} this host's "
            f"(± {float(sample['delay_s']) / 2 * 1000:.1f} ms, {float(sample['age_s']):.0f} s ago)"
        )
        findings.append(
            Finding(
                "peer",
                verdict,
                detail + _consequence(verdict, warn),
                "the host that is off must synchronize (NTP)" if verdict != "ok" else "",
                {"agent_id": peer, **sample},
            )
        )
    return findings
