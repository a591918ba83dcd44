"""Helpers for the registry tests: agents that publish, and the app served in-process."""

from __future__ import annotations

from dataclasses import dataclass, replace

import httpx
from fastapi import FastAPI

from talos.core.identity import Identity
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import RevocationList
from talos.core.x3dh import PrekeyStore
from talos.registry import RegistryStore
from talos.testing import FakeClock, SeededRng

CBOR = {"content-type": "application/cbor"}


@dataclass
class Agent:
    """An identity plus the prekey store and counters it publishes from."""

    identity: Identity
    prekeys: PrekeyStore
    rng: SeededRng
    clock: FakeClock
    upload_sequence: int = 0
    record_sequence: int = 0

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id

    def rotate(self) -> None:
        self.identity = self.identity.rotate(rng=self.rng, clock=self.clock)
        # The identity DH key changes with the rotation: the signed prekey must vouch for it.
        prekeys = replace(self.prekeys, identity_dh=self.identity.dh_key)
        self.prekeys = prekeys.rotate_signed_prekey(self.identity.signing_key, self.rng)

    def upload(self, opks: int = 0, *, sequence: int | None = None) -> PrekeyUpload:
        if opks:
            self.prekeys = self.prekeys.add_one_time_prekeys(opks, self.rng)
        self.upload_sequence = sequence if sequence is not None else self.upload_sequence + 1
        return PrekeyUpload.from_store(
            self.prekeys,
            self.identity.signing_key,
            key_sequence=self.identity.sequence,
            sequence=self.upload_sequence,
        )

    def record(
        self,
        *,
        sequence: int | None = None,
        instance: bytes = b"\x01" * 16,
        lifetime: float = 300.0,
        endpoint: str = "ws://127.0.0.1:9000",
    ) -> PeerRecord:
        self.record_sequence = sequence if sequence is not None else self.record_sequence + 1
        return PeerRecord.create(
            self.identity.signing_key,
            agent_id=self.agent_id,
            key_sequence=self.identity.sequence,
            instance_id=instance,
            endpoint=endpoint,
            sequence=self.record_sequence,
            now=self.clock.time(),
            lifetime=lifetime,
        )

    def revocations(self, version: int = 1, ids: tuple[bytes, ...] = ()) -> RevocationList:
        lst = RevocationList.create(self.agent_id, now=self.clock.time())
        lst = replace(lst, version=version, revoked_ids=frozenset(ids))
        return lst.signed_by(self.identity.signing_key, self.identity.sequence)


def make_agent(name: str, seed: int, clock: FakeClock) -> Agent:
    rng = SeededRng(seed)
    identity = Identity.create(name, rng=rng, clock=clock)
    store = PrekeyStore.create(
        agent_id=identity.agent_id,
        signing_key=identity.signing_key,
        identity_dh=identity.dh_key,
        rng=rng,
    )
    return Agent(identity, store, rng, clock)


@dataclass
class Served:
    """The registry app running in-process, with an HTTP client bound to it."""

    app: FastAPI
    http: httpx.AsyncClient
    transport: httpx.ASGITransport

    @property
    def store(self) -> RegistryStore:
        store: RegistryStore = self.app.state.store
        return store
