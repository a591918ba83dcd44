"""What an agent reports about itself: ``talos status`` and ``talos peers``."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from talos.client.clocks import ClockWatch
from talos.core.peer_record import PeerRecord
from talos.errors import MalformedFrame, UnsupportedVersion
from talos.storage.agent_state import AgentState
from talos.transport import Link


def status_report(
    state: AgentState,
    *,
    agent_id: str,
    instance: bytes,
    endpoint: str,
    offline: bool,
    links: Mapping[str, Link],
    registry: str | None,
    registry_reachable: bool | None,
    dht: str | None,
    clocks: ClockWatch,
    now: float,
    duplicates: Mapping[str, int],
) -> dict[str, Any]:
    """See :meth:`TalosClient.status`."""
    return {
        "agent_id": agent_id,
        "instance_id": instance.hex(),
        "endpoint": endpoint,
        "offline_mode": offline,
        "queue_depth": state.outbox_count(),
        "queued_by_peer": {peer: len(state.pending(peer)) for peer in state.peers_with_pending()},
        "inbox_depth": state.inbox_count(),
        "sessions": sorted(state.session_peers()),
        "connected": sorted(peer for peer, link in links.items() if link.is_open),
        "registry": registry,
        "registry_reachable": registry_reachable,
        "dht": dht,
        "clock_offset_s": clocks.registry_offset,
        "peer_clock": {
            peer: {
                "offset_s": round(sample.offset, 6),
                "delay_s": round(sample.delay, 6),
                "age_s": round(max(0.0, now - sample.at), 3),
            }
            for peer, sample in clocks.peers.estimates().items()
        },
        "duplicate_instances": dict(duplicates),
    }


def known_peer_rows(state: AgentState, links: Mapping[str, Link]) -> list[dict[str, Any]]:
    """See :meth:`TalosClient.known_peers`."""
    rows = []
    for data in state.peer_records():
        with contextlib.suppress(MalformedFrame, UnsupportedVersion):
            record = PeerRecord.from_bytes(data)
            link = links.get(record.agent_id)
            rows.append(
                {
                    "agent_id": record.agent_id,
                    "endpoint": record.endpoint,
                    "instance_id": record.instance_id.hex(),
                    "expires_ms": record.expires_ms,
                    "session": state.session(record.agent_id) is not None,
                    "connected": link is not None and link.is_open,
                }
            )
    return rows
