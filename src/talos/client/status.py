"""What an agent reports about itself: ``talos status`` and ``talos peers``.

Gathered here from the agent's :class:`~talos.client.resources.Resources`
and what they opened, so that ``TalosClient.status()`` only delegates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from talos.client.resources import Opened, Resources
from talos.core.peer_record import PeerRecord
from talos.errors import MalformedFrame, UnsupportedVersion
from talos.storage.agent_state import AgentState
from talos.transport import Link


def status_report(resources: Resources, agent: Opened) -> dict[str, Any]:
    """See :meth:`TalosClient.status`."""
    state, links, clocks = agent.state, agent.parts.deliverer.links, resources.clocks
    registry = None if resources.discovery is None else resources.discovery.registry
    dht, now = resources.dht_address, resources.config.clock.time()
    return {
        "agent_id": agent.own.current.agent_id,
        "instance_id": resources.instance.hex(),
        "endpoint": agent.endpoint,
        "offline_mode": resources.config.offline,
        "queue_depth": state.outbox_count(),
        "queued_by_peer": {peer: len(state.pending(peer)) for peer in state.peers_with_pending()},
        "inbox_depth": state.inbox_count(),
        "sessions": sorted(state.session_peers()),
        "connected": sorted(peer for peer, link in links.items() if link.is_open),
        "registry": None if registry is None else registry.current_url,
        "registry_reachable": resources.registry_reachable,
        "dht": None if dht is None else "{}:{}".format(*dht),
        "clock_offset_s": clocks.registry_offset,
        "peer_clock": {
            peer: {
                "offset_s": round(sample.offset, 6),
                "delay_s": round(sample.delay, 6),
                "age_s": round(max(0.0, now - sample.at), 3),
            }
            for peer, sample in clocks.peers.estimates().items()
        },
        "duplicate_instances": dict(agent.parts.receiver.instances.duplicates),
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
