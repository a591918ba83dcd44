"""KeyLogs.announce(): a running agent pushes its rotated key log over open links.

In process, two TalosClients without a registry (so the push is the only way
Bob can learn). What the rotation path will do after ``talos emergency-rotate``
on a running agent is stood in for by pointing Alice's key log source and
signer at her rotated identity (the seams the rotation wires), then calling
``announce()``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.storage.agent_state import AgentState
from talos.system import SYSTEM_CLOCK
from talos.testing import SeededRng

pytestmark = pytest.mark.asyncio


def audit(home: Path, kind: str) -> list[dict[str, object]]:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        return [dict(entry.data) for entry in log.query() if entry.kind == kind]


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

        old: Identity = a._identity
        new = old.rotate(
            rng=SeededRng(8), clock=SYSTEM_CLOCK, reason="laptop stolen", emergency=True,
            revoke_old=True,
        )  # fmt: skip
        keylogs = a._parts.keylogs
        keylogs._own = lambda: new.keylog
        keylogs._signer._identity = new
        learned = asyncio.Event()
        follow = b._peers.on_rotated
        assert follow is not None

        def rotated_hook(before: KeyLog, after: KeyLog) -> None:
            follow(before, after)
            learned.set()

        b._peers.on_rotated = rotated_hook
        await keylogs.announce()
        await asyncio.wait_for(learned.wait(), 10)
        known = b._peers.known_log(a.agent_id)
        assert known is not None
        assert known.state.sequence == 1
        assert b"talos_peer_key_updates_total 1.0" in b.metrics.render()
    rotated = audit(tmp_path / "b", "PEER_KEY_ROTATED")
    assert rotated == [
        {"from": 0, "to": 1, "emergency": True, "revoked_below": 1, "reason": "laptop stolen"}
    ]
    resets = [
        e for e in audit(tmp_path / "b", "SESSION_RESET") if e["reason"] == "peer_key_rotated"
    ]
    assert len(resets) == 1
