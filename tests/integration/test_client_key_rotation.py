"""``TalosClient.rotate_keys`` in process: real sockets and LMDB, no registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.core.crypto import VerifyKey
from talos.errors import ConfigurationError
from talos.storage.agent_state import AgentState
from talos.storage.home import AgentHome
from talos.testing.processes import RegistryProcess

pytestmark = pytest.mark.asyncio

#: Small blocks, so that blocks before and after the rotation are sealed.
SMALL_BLOCKS = {"block_entries": 2, "block_seconds": 0.05}


@asynccontextmanager
async def introduced(tmp_path: Path) -> AsyncIterator[tuple[TalosClient, TalosClient]]:
    async with (
        TalosClient.create(
            "alice", home=tmp_path / "a", discovery=[], accept_policy="open",
            audit_config=SMALL_BLOCKS,
        ) as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):  # fmt: skip
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        yield a, b


def sample(client: TalosClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.metrics.render().decode()):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"no {name} series")


def rotations(client: TalosClient, kind: str) -> float:
    return sample(client, "talos_key_rotations_total", kind=kind)


async def test_rotate_keys_while_running(tmp_path: Path) -> None:
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "before", timeout=10)).status == "delivered"
        assert (await b.send(a.agent_id, "to alice", timeout=10)).status == "delivered"
        old_bundle = a.get_prekey_bundle()
        with pytest.raises(ConfigurationError):
            await a.rotate_keys(reason="", emergency=True)
        with pytest.raises(ConfigurationError):
            await a.rotate_keys(revoke_old=True)  # only an emergency revokes
        assert rotations(a, "routine") == rotations(a, "emergency") == 0
        rotated = await a.rotate_keys(reason="quarterly")
        assert rotated["sequence"] == 1
        assert rotated["agent_id"] == a.agent_id
        assert rotations(a, "routine") == 1
        # Persisted before use: the key file and public log hold the new key.
        home = AgentHome(tmp_path / "a")
        assert home.load_identity(passphrase=None).fingerprint == rotated["fingerprint"]
        public = home.load_public_keylog()
        assert public is not None
        assert len(public) == 2
        # Sessions discarded, prekeys renewed under the new key.
        assert a.status()["sessions"] == []
        assert a.get_prekey_bundle().signed_prekey != old_bundle.signed_prekey
        assert a.peer_record().key_sequence == 1
        # Bob learns the new key log by himself (offered on alice's next link); messages
        # flow again.
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        assert (await a.send(b.agent_id, "after", timeout=10)).status == "delivered"
        assert (await b.send(a.agent_id, "back", timeout=10)).status == "delivered"
        got = [await b.receive(timeout=5) for _ in range(2)]
        assert sample(b, "talos_peer_key_updates_total") == 1  # bob followed by himself
        assert [m.data for m in got if m is not None] == ["before", "after"]
        back = [await a.receive(timeout=5) for _ in range(2)]
        assert [m.data for m in back if m is not None] == ["to alice", "back"]
        await a.rotate_keys(reason="compromise", emergency=True, revoke_old=True)
        assert rotations(a, "emergency") == 1
    keys = [VerifyKey(e.signing_key) for e in AgentHome(tmp_path / "a").load_identity(
        passphrase=None).keylog.events]  # fmt: skip
    with AuditLog.open(
        tmp_path / "a" / "audit", readonly=True, extra_databases=AgentState.DATABASES
    ) as log:
        report = log.verify_chain(trusted_keys=keys)
        assert report.ok
        assert len(report.signers) == 3  # blocks sealed under each of the three keys
        records = [e.data for e in log.query(kind="KEY_ROTATED")]
    assert [(r["sequence"], r["reason"], r["emergency"], r["revoke_old"]) for r in records] == [
        (1, "quarterly", False, False),
        (2, "compromise", True, True),
    ]


async def test_messages_in_flight_during_a_rotation_arrive_once(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    options: dict[str, Any] = {"registry_url": registry.url, "accept_policy": "open"}
    async with (
        TalosClient.create("alice", home=tmp_path / "a", **options) as a,
        TalosClient.create("bob", home=tmp_path / "b", **options) as b,
    ):
        assert (await a.send(b.agent_id, "hello", timeout=10)).status == "delivered"
        hello = await b.receive(timeout=10)
        assert hello is not None
        assert hello.data == "hello"
        texts = [f"m{n}" for n in range(30)]
        sends = [asyncio.create_task(a.send(b.agent_id, t, timeout=60)) for t in texts]
        first = await b.receive(timeout=10)  # the first arrived, the others are on their way
        assert first is not None
        assert a.queue_depth() > 0
        await a.rotate_keys(reason="in flight", emergency=True, revoke_old=True)
        results = await asyncio.gather(*sends)
        assert {r.status for r in results} == {"delivered"}
        got = [first] + [await b.receive(timeout=10) for _ in range(30)]
        assert a.queue_depth() == 0
        assert await b.receive(timeout=0.5) is None  # nothing twice
        assert sample(b, "talos_peer_key_updates_total") == 1  # bob followed by himself
    data = [m.data for m in got if m is not None]
    assert sorted(data) == sorted(texts)
