"""The registry as a real ``talos registry serve`` process, used through RegistryClient."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from talos.core.identity import Identity
from talos.core.keylog import IssuerKeys
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import RevocationList
from talos.core.x3dh import PrekeyStore
from talos.discovery import RegistryClient, RegistryRejected
from talos.errors import RegistryUnavailable
from talos.registry.store import RegistryStore
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG
from talos.testing.cli import TalosCli
from talos.testing.processes import RegistryProcess, free_port, start_registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    base = tmp_path_factory.mktemp("registry")
    served = start_registry(base / "registry.db", base / "stderr.log")
    try:
        yield served
    finally:
        served.stop()


@dataclass
class Agent:
    identity: Identity
    prekeys: PrekeyStore

    @classmethod
    def create(cls, name: str) -> Agent:
        identity = Identity.create(name, rng=SYSTEM_RNG, clock=SYSTEM_CLOCK)
        store = PrekeyStore.create(
            agent_id=identity.agent_id,
            signing_key=identity.signing_key,
            identity_dh=identity.dh_key,
            rng=SYSTEM_RNG,
        )
        return cls(identity, store)

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id

    def record(self, sequence: int, instance: bytes, lifetime: float = 300) -> PeerRecord:
        return PeerRecord.create(
            self.identity.signing_key,
            agent_id=self.agent_id,
            key_sequence=self.identity.sequence,
            instance_id=instance,
            endpoint=f"ws://127.0.0.1:{9000 + sequence}",
            sequence=sequence,
            now=time.time(),
            lifetime=lifetime,
        )


@pytest.mark.asyncio
async def test_key_log_publish_rotate_and_fork(registry: RegistryProcess) -> None:
    alice = Agent.create("alice")
    next_key = alice.identity.next_signing_key
    async with RegistryClient(registry.url) as client:
        await client.publish_keylog(alice.identity.keylog)
        known = await client.fetch_keylog(alice.agent_id)
        rotated = alice.identity.rotate(rng=SYSTEM_RNG, clock=SYSTEM_CLOCK)
        await client.publish_keylog(rotated.keylog)
        assert len(await client.fetch_keylog(alice.agent_id, known)) == 2
        fork = alice.identity.rotate(rng=SYSTEM_RNG, clock=SYSTEM_CLOCK)
        assert fork.signing_key.seed() == next_key.seed()
        with pytest.raises(RegistryRejected) as caught:
            await client.publish_keylog(fork.keylog)
        assert (caught.value.status, caught.value.kind) == (409, "KeyLogInvalid")
        assert "fork" in caught.value.reason
    with RegistryStore.open(registry.db) as store:
        assert [e.kind for e in store.security_events(alice.agent_id)] == ["keylog-fork"]


@pytest.mark.asyncio
async def test_each_one_time_prekey_once_under_concurrency(registry: RegistryProcess) -> None:
    bob = Agent.create("bob")
    store = bob.prekeys.add_one_time_prekeys(10, SYSTEM_RNG)
    upload = PrekeyUpload.from_store(store, bob.identity.signing_key, key_sequence=0, sequence=1)
    async with RegistryClient(registry.url) as client:
        await client.publish_keylog(bob.identity.keylog)
        assert await client.publish_prekeys(upload) == 10
        with pytest.raises(RegistryRejected, match="StaleSequence"):
            await client.publish_prekeys(upload)
        clients = [RegistryClient(registry.url) for _ in range(20)]
        try:
            bundles = await asyncio.gather(*(c.fetch_bundle(bob.agent_id) for c in clients))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
    ids = [b.one_time_prekey_id for b in bundles]
    assert sorted(i for i in ids if i is not None) == list(range(10))
    assert ids.count(None) == 10
    assert {b.one_time_prekey for b in bundles if b.one_time_prekey} == {
        store.one_time_prekey_publics()[i] for i in range(10)
    }


@pytest.mark.asyncio
async def test_records_stale_expired_and_instances(registry: RegistryProcess) -> None:
    carol = Agent.create("carol")
    keys = IssuerKeys([carol.identity.keylog])
    async with RegistryClient(registry.url) as client:
        await client.publish_keylog(carol.identity.keylog)
        short = carol.record(1, b"\x01" * 16, lifetime=1.0)
        await client.publish_record(short)
        long = carol.record(2, b"\x02" * 16)
        await client.publish_record(long)
        with pytest.raises(RegistryRejected, match="StaleSequence"):
            await client.publish_record(carol.record(2, b"\x03" * 16))
        live = await client.instances(carol.agent_id, keys, now=time.time())
        assert [r.instance_id for r in live] == [b"\x02" * 16, b"\x01" * 16]
        await asyncio.sleep(max(0.0, short.expires_ms / 1000 - time.time()) + 0.05)
        assert await client.instances(carol.agent_id, keys, now=time.time()) == [long]
        assert await client.fetch_record(carol.agent_id, keys, time.time()) == long
        with pytest.raises(RegistryRejected, match="StaleMessage"):
            await client.publish_record(carol.record(3, b"\x01" * 16, lifetime=0))


@pytest.mark.asyncio
async def test_revocation_merge_and_fork(registry: RegistryProcess) -> None:
    dave = Agent.create("dave")
    key = dave.identity.signing_key
    v1 = RevocationList.create(dave.agent_id, now=time.time()).signed_by(key, 0)
    v2 = v1.revise(now=time.time(), token_ids=[b"\x01" * 16]).signed_by(key, 0)
    fork = v1.revise(now=time.time(), token_ids=[b"\x02" * 16]).signed_by(key, 0)
    async with RegistryClient(registry.url) as client:
        await client.publish_keylog(dave.identity.keylog)
        assert await client.publish_revocations(v1) == "adopted"
        assert await client.publish_revocations(v2) == "adopted"
        with pytest.raises(RegistryRejected, match="StaleSequence"):
            await client.publish_revocations(v1)
        with pytest.raises(RegistryRejected, match="RevocationListForked"):
            await client.publish_revocations(fork)
        kept = await client.fetch_revocations(dave.agent_id, IssuerKeys([dave.identity.keylog]))
        assert kept is not None
        assert kept.version == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [b"", b"\x00", b"\xa1\x61v\x01", b"\xff" * 1000, b"\x9f" * 64],
)
async def test_malformed_and_unsigned_bodies_are_4xx(
    registry: RegistryProcess, body: bytes
) -> None:
    erin = Agent.create("erin")
    unsigned = PeerRecord.create(
        erin.identity.signing_key,
        agent_id=erin.agent_id,
        key_sequence=0,
        instance_id=b"\x01" * 16,
        endpoint="ws://127.0.0.1:1",
        sequence=1,
        now=time.time(),
        lifetime=60,
    ).to_bytes()[:-64] + bytes(64)
    async with httpx.AsyncClient(base_url=registry.url) as http:
        headers = {"content-type": "application/cbor"}
        await http.put(
            f"/v1/agents/{erin.agent_id}/keylog",
            content=erin.identity.keylog.to_bytes(),
            headers=headers,
        )
        for kind in ("keylog", "prekeys", "record"):
            for payload in (body, unsigned):
                answer = await http.put(
                    f"/v1/agents/{erin.agent_id}/{kind}", content=payload, headers=headers
                )
                assert 400 <= answer.status_code < 500, answer.text
                assert set(answer.json()) == {"error", "reason"}
        answer = await http.put(f"/v1/revocations/{erin.agent_id}", content=body, headers=headers)
        assert 400 <= answer.status_code < 500


@pytest.mark.asyncio
async def test_stopped_registry_is_unavailable(tmp_path: Path) -> None:
    served = start_registry(tmp_path / "r.db", tmp_path / "stderr.log")
    try:
        async with RegistryClient(served.url, timeout=2.0) as client:
            assert await client.time_ms() > 0
            served.stop()
            with pytest.raises(RegistryUnavailable):
                await client.time_ms()
            with pytest.raises(RegistryUnavailable):
                await client.fetch_bundle(Agent.create("frank").agent_id)
    finally:
        served.stop()
    assert b"Uvicorn running" in (tmp_path / "stderr.log").read_bytes()


def test_serve_refuses_a_damaged_database(tmp_path: Path) -> None:
    db = tmp_path / "damaged.db"
    db.write_bytes(b"not sqlite at all" * 200)
    result = TalosCli().run(None, "registry", "serve", "--port", str(free_port()), "--db", str(db))
    assert result.returncode == 3, result.stderr
    assert "not a registry database" in result.stderr
