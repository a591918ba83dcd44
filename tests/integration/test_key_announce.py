"""KeyLogs.announce(): a running agent pushes its rotated key log over open links.

In process, two TalosClients without a registry (so the push is the only way
Bob can learn): Alice rotates with ``rotate_keys`` (what ``talos
emergency-rotate`` does through the control socket), Bob follows at once
over the open link, and messages flow both ways under the new keys.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.core.keylog import KeyLog
from talos.storage.agent_state import AgentState

pytestmark = pytest.mark.asyncio


def audit(home: Path, kind: str) -> list[dict[str, object]]:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        return [dict(entry.data) for entry in log.query() if entry.kind == kind]


async def _texts(client: TalosClient, n: int) -> list[object]:
    texts = []
    for _ in range(n):
        message = await client.receive(timeout=10)
        assert message is not None
        texts.append(message.data)
    return texts


async def test_announce_pushes_the_rotated_log_to_connected_peers(tmp_path: Path) -> None:
    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], accept_policy="open") as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        assert (await a.send(b.agent_id, "before", timeout=10)).status == "delivered"
        assert (await b.send(a.agent_id, "back", timeout=10)).status == "delivered"

        learned = asyncio.Event()
        follow = b._peers.on_rotated
        assert follow is not None

        def rotated_hook(before: KeyLog, after: KeyLog) -> None:
            follow(before, after)
            learned.set()

        b._peers.on_rotated = rotated_hook
        await a.rotate_keys(reason="laptop stolen", emergency=True, revoke_old=True)
        await asyncio.wait_for(learned.wait(), 10)
        known = b._peers.known_log(a.agent_id)
        assert known is not None
        assert known.state.sequence == 1
        assert b"talos_peer_key_updates_total 1.0" in b.metrics.render()
        # No registry here: new sessions from the bundles by hand, under the new keys.
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        # Both sides sign and agree under the new keys: nothing refused as revoked.
        assert (await a.send(b.agent_id, "after", timeout=20)).status == "delivered"
        assert (await b.send(a.agent_id, "after back", timeout=20)).status == "delivered"
        assert await _texts(b, 2) == ["before", "after"]
        assert await _texts(a, 2) == ["back", "after back"]
        assert b'talos_signature_failures_total{reason="revoked_key"} 0.0' in b.metrics.render()
    rotated = audit(tmp_path / "b", "PEER_KEY_ROTATED")
    assert rotated == [
        {"from": 0, "to": 1, "emergency": True, "revoked_below": 1, "reason": "laptop stolen"}
    ]
    resets = [
        e for e in audit(tmp_path / "b", "SESSION_RESET") if e["reason"] == "peer_key_rotated"
    ]
    assert len(resets) == 1
