"""``talos diagnose --network``: registry, DHT nodes, listener, peers and queues."""

from __future__ import annotations

import time
from typing import Any, Final

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from talos.cli.diagnose.agent_view import AgentView, LazyDiskState, agent_finding
from talos.cli.diagnose.findings import Address, Finding, Status, registry_hint
from talos.discovery.dht import DhtNode
from talos.discovery.registry_client import RegistryClient
from talos.errors import DiscoveryError, TalosError

__all__ = ["CONNECT_TIMEOUT", "DHT_TIMEOUT", "LATENCY_SAMPLES", "network_checks"]

#: Round trips timed for the registry's latency.
LATENCY_SAMPLES: Final = 3
CONNECT_TIMEOUT: Final = 5.0
DHT_TIMEOUT: Final = 2.0


async def _registry_reachability(registry: RegistryClient | None, source: str) -> Finding:
    if registry is None:
        return Finding("registry", "skip", "none known", registry_hint())
    latencies = []
    try:
        for _ in range(LATENCY_SAMPLES):
            started = time.monotonic()
            await registry.time_ms()
            latencies.append(time.monotonic() - started)
    except TalosError as exc:
        return Finding(
            "registry",
            "fail",
            f"{registry.base_url} does not answer: {exc}",
            "established peers keep working; new peers need the registry or the DHT",
            {"url": registry.base_url, "source": source},
        )
    best = min(latencies)
    return Finding(
        "registry",
        "ok",
        f"{registry.base_url} answers in {best * 1000:.1f} ms (best of {len(latencies)})",
        data={"url": registry.base_url, "source": source, "latency_ms": round(best * 1000, 3)},
    )


async def _listener(endpoint: str) -> Finding:
    started = time.monotonic()
    try:
        async with connect(endpoint, open_timeout=CONNECT_TIMEOUT, compression=None):
            elapsed = time.monotonic() - started
    except (OSError, TimeoutError, WebSocketException) as exc:
        return Finding(
            "listener",
            "fail",
            f"{endpoint} does not accept WebSocket connections: {type(exc).__name__}: {exc}",
            "peers cannot reach this agent; see the agent's log",
            {"endpoint": endpoint},
        )
    return Finding(
        "listener",
        "ok",
        f"{endpoint} accepts WebSocket connections ({elapsed * 1000:.1f} ms)",
        data={"endpoint": endpoint, "latency_ms": round(elapsed * 1000, 3)},
    )


async def _dht_nodes(targets: list[tuple[str, Address]]) -> list[Finding]:
    """Ping each DHT node from a short-lived node of our own."""
    if not targets:
        return []
    node = DhtNode(rpc_timeout=DHT_TIMEOUT, lookup_timeout=2 * DHT_TIMEOUT)
    try:
        # Any interface: the answers must reach us from wherever the nodes are.
        await node.start(0, "0.0.0.0")  # noqa: S104 -- an ephemeral client socket
    except DiscoveryError as exc:
        return [Finding(label, "fail", f"not checked: {exc}") for label, _ in targets]
    try:
        return [await _dht_ping(node, label, address) for label, address in targets]
    finally:
        await node.stop()


async def _dht_ping(node: DhtNode, label: str, address: Address) -> Finding:
    where = f"{address[0]}:{address[1]}"
    try:
        answered = await node.bootstrap([address]) > 0
    except DiscoveryError as exc:
        answered, where = False, f"{where} ({exc})"
    if answered:
        return Finding(label, "ok", f"{where} answers", data={"address": where})
    return Finding(
        label,
        "fail",
        f"{where} does not answer",
        "the DHT is the fallback when the registry is down; check the address and UDP port",
        {"address": where},
    )


def _peer_findings(agent: AgentView, disk: LazyDiskState) -> list[Finding]:
    if agent.running:
        rows = _running_peers(agent)
    elif agent.problem:
        return [Finding("peers", "skip", "the agent does not answer")]
    else:
        state = disk.get()
        if state.status != "ok":
            return [Finding("peers", "skip", f"agent not running; {state.detail}", state.hint)]
        rows = state.peers
    if not rows:
        return [Finding("peers", "info", "no known peers")]
    return [_peer_finding(row) for row in rows]


def _running_peers(agent: AgentView) -> list[dict[str, Any]]:
    status = agent.status or {}
    queued: dict[str, int] = status.get("queued_by_peer", {})
    connected = set(status.get("connected", []))
    sessions = set(status.get("sessions", []))
    endpoints = {row["agent_id"]: row.get("endpoint") for row in agent.peers}
    return [
        {
            "agent_id": peer,
            "endpoint": endpoints.get(peer),
            "session": peer in sessions,
            "connected": peer in connected,
            "queued": int(queued.get(peer, 0)),
        }
        for peer in sorted(set(endpoints) | set(queued) | connected | sessions)
    ]


def _peer_finding(row: dict[str, Any]) -> Finding:
    connected = row["connected"]
    state = {
        True: "connected",
        False: "not connected",
        None: "not connected (agent not running)",
    }[connected]
    parts = [row["agent_id"], state, "session" if row["session"] else "no session"]
    parts.append(f"{row['queued']} queued")
    if row.get("endpoint"):
        parts.append(str(row["endpoint"]))
    status: Status = "warn" if row["queued"] and connected is False else "info"
    hint = "queued messages are delivered, in order, when the peer is reachable"
    return Finding("peer", status, ", ".join(parts), hint if status == "warn" else "", row)


async def network_checks(
    agent: AgentView,
    registry: RegistryClient | None,
    source: str,
    bootstrap: list[Address],
    disk: LazyDiskState,
) -> list[Finding]:
    findings = [await _registry_reachability(registry, source)]
    targets = [("dht bootstrap", address) for address in bootstrap]
    status = agent.status or {}
    if agent.running and status.get("dht"):
        host, _, port = str(status["dht"]).rpartition(":")
        targets.append(("agent dht node", (host, int(port))))
    findings += await _dht_nodes(targets)
    findings.append(agent_finding(agent))
    if agent.running and status.get("endpoint"):
        findings.append(await _listener(str(status["endpoint"])))
    if agent.running and status.get("registry_reachable") is False:
        findings.append(
            Finding(
                "agent registry",
                "warn",
                f"the agent could not reach {status.get('registry')} at its last attempt",
                "it retries; established peers keep working meanwhile",
            )
        )
    return findings + _peer_findings(agent, disk)
