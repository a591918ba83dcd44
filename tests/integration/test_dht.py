"""The DHT fallback over real UDP sockets on 127.0.0.1: validation, replacement, deadlines.

Only time (record expiry) and randomness (node ids, keys) are faked. The
attacker is a stock ``kademlia`` node, which stores and sends anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from kademlia.network import Server
from kademlia.node import Node

from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.x3dh import PrekeyBundle, PrekeyStore
from talos.discovery.dht import (
    MAX_VALUE_SIZE,
    DhtNode,
    ValidatingStorage,
    dht_key,
    encode_value,
    verify_value,
)
from talos.errors import KeyLogInvalid, LocalProtocolError, PeerNotFound
from talos.testing import FakeClock, SeededRng

NOW = 1_700_000_000.0
_rng = SeededRng(17)
ALICE = Identity.create("alice", rng=_rng, clock=FakeClock(NOW))
ALICE_ROTATED = ALICE.rotate(rng=_rng, clock=FakeClock(NOW))
MALLORY = Identity.create("mallory", rng=_rng, clock=FakeClock(NOW))
KEY = dht_key(ALICE.agent_id)


def record(
    identity: Identity = ALICE,
    *,
    sequence: int = 1,
    now: float = NOW,
    lifetime: float = 300.0,
    signer: Identity | None = None,
    port: int = 9000,
) -> PeerRecord:
    signer = signer or identity
    return PeerRecord.create(
        signer.signing_key,
        agent_id=identity.agent_id,
        key_sequence=signer.sequence,
        instance_id=b"\x07" * 16,
        endpoint=f"ws://127.0.0.1:{port}",
        sequence=sequence,
        now=now,
        lifetime=lifetime,
    )


def value(rec: PeerRecord, log: KeyLog | None = None) -> bytes:
    return encode_value(rec.to_bytes(), (log or ALICE.keylog).to_bytes())


def prekeys(identity: Identity) -> PrekeyStore:
    return PrekeyStore.create(
        agent_id=identity.agent_id,
        signing_key=identity.signing_key,
        identity_dh=identity.dh_key,
        rng=_rng,
    ).add_one_time_prekeys(1, _rng)


ALICE_PREKEYS = prekeys(ALICE)
ALICE_BUNDLE = ALICE_PREKEYS.bundle(None)


def with_bundle(rec: PeerRecord, bundle: PrekeyBundle, log: KeyLog | None = None) -> bytes:
    return encode_value(rec.to_bytes(), (log or ALICE.keylog).to_bytes(), bundle.to_bytes())


GOOD = value(record(sequence=5))
BAD_VALUES = {
    "forged: signed by another key": value(record(sequence=9, signer=MALLORY)),
    "another agent's log": value(record(sequence=9), MALLORY.keylog),
    "another agent's record under this key": value(record(MALLORY, sequence=9), MALLORY.keylog),
    "expired": value(record(sequence=9, now=NOW - 1000)),
    "issued in the future": value(record(sequence=9, now=NOW + 1000)),
    "lower sequence": value(record(sequence=4)),
    "same sequence, other content": value(record(sequence=5, port=9001)),
    "old key with the rotated log": value(record(sequence=9), ALICE_ROTATED.keylog),
    "bare peer record": record(sequence=9).to_bytes(),
    "garbage": b"\x00garbage\xff" * 10,
    "empty": b"",
    "truncated": GOOD[:-1],
    "oversized": b"\x00" * (MAX_VALUE_SIZE + 1),
    "another agent's prekey bundle": with_bundle(record(sequence=9), prekeys(MALLORY).bundle()),
    "a bundle with a one-time prekey": with_bundle(
        record(sequence=9), ALICE_PREKEYS.bundle(next(iter(ALICE_PREKEYS.one_time_prekeys)))
    ),
    "a bundle of superseded keys": with_bundle(
        record(ALICE_ROTATED, sequence=9), ALICE_BUNDLE, ALICE_ROTATED.keylog
    ),
    "a bundle with a forged signed prekey": with_bundle(
        record(sequence=9),
        dataclasses.replace(ALICE_BUNDLE, signed_prekey_signature=bytes(64)),
    ),
}


# -- the storage on its own --------------------------------------------------------


@pytest.fixture
def storage(clock: FakeClock) -> ValidatingStorage:
    clock.set_time(NOW)
    store = ValidatingStorage(clock)
    assert store.put(KEY, GOOD)
    return store


def test_dht_key_is_domain_separated_sha256() -> None:
    expected = hashlib.sha256(b"talos/dht/v1\x00" + ALICE.agent_id.encode()).digest()[:20]
    assert dht_key(ALICE.agent_id) == expected


def test_storage_serves_what_it_accepted(storage: ValidatingStorage) -> None:
    assert storage.get(KEY) == GOOD
    assert storage[KEY] == GOOD
    assert list(storage) == [(KEY, GOOD)]
    entry = storage.entry(KEY)
    assert entry is not None
    assert entry.record.sequence == 5


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_storage_refuses_and_keeps_the_old_value(storage: ValidatingStorage, name: str) -> None:
    assert not storage.put(KEY, BAD_VALUES[name])
    storage[KEY] = BAD_VALUES[name]  # kademlia's interface: refused silently
    assert storage.get(KEY) == GOOD


@pytest.mark.parametrize("bad", [None, "text", 5, ["list"], {"v": 1}])
def test_storage_refuses_values_that_are_not_bytes(storage: ValidatingStorage, bad: object) -> None:
    assert not storage.put(KEY, bad)
    assert storage.get(KEY) == GOOD


def test_storage_refuses_a_value_under_the_wrong_key(clock: FakeClock) -> None:
    clock.set_time(NOW)
    store = ValidatingStorage(clock)
    assert not store.put(dht_key(MALLORY.agent_id), GOOD)
    assert not store.put(KEY[:19], GOOD)
    assert not store.put(KEY.hex(), GOOD)
    assert list(store) == []


def test_storage_accepts_identical_and_higher(storage: ValidatingStorage) -> None:
    assert storage.put(KEY, GOOD)
    newer = value(record(sequence=6))
    assert storage.put(KEY, newer)
    assert storage.get(KEY) == newer
    assert not storage.put(KEY, GOOD)


def test_storage_follows_a_rotation_and_refuses_a_rollback(storage: ValidatingStorage) -> None:
    rotated = value(record(sequence=6, signer=ALICE_ROTATED), ALICE_ROTATED.keylog)
    assert storage.put(KEY, rotated)
    # Someone holding only the superseded key signs a higher sequence with the old log.
    assert not storage.put(KEY, value(record(sequence=7)))
    assert storage.get(KEY) == rotated


def test_expired_record_is_not_served_but_still_sets_the_floor(
    storage: ValidatingStorage, clock: FakeClock
) -> None:
    clock.advance(400)
    assert storage.get(KEY) is None
    assert list(storage) == []
    assert storage.iter_older_than(0) == []
    assert not storage.put(KEY, value(record(sequence=4, now=NOW + 400)))
    fresh = value(record(sequence=6, now=NOW + 400))
    assert storage.put(KEY, fresh)
    assert storage.get(KEY) == fresh


def test_iter_older_than_measures_time_in_storage(
    storage: ValidatingStorage, clock: FakeClock
) -> None:
    assert storage.iter_older_than(10) == []
    clock.advance(11)
    assert storage.iter_older_than(10) == [(KEY, GOOD)]


def test_storage_is_bounded(clock: FakeClock) -> None:
    clock.set_time(NOW)
    store = ValidatingStorage(clock, max_entries=1)
    assert store.put(KEY, GOOD)
    mallory = value(record(MALLORY), MALLORY.keylog)
    assert store.put(dht_key(MALLORY.agent_id), mallory)
    assert list(store) == [(dht_key(MALLORY.agent_id), mallory)]


def test_reader_refuses_a_log_older_than_the_one_it_knows() -> None:
    with pytest.raises(KeyLogInvalid):
        verify_value(GOOD, now=NOW, known_log=ALICE_ROTATED.keylog)
    rotated = value(record(signer=ALICE_ROTATED), ALICE_ROTATED.keylog)
    entry = verify_value(rotated, now=NOW, key=KEY, known_log=ALICE.keylog)
    assert entry.log.state.sequence == 1


# -- nodes over UDP -------------------------------------------------------------------


def make_node(seed: int, *, rpc_timeout: float = 0.5, lookup_timeout: float = 3.0) -> DhtNode:
    return DhtNode(
        clock=FakeClock(NOW),
        rng=SeededRng(seed),
        rpc_timeout=rpc_timeout,
        lookup_timeout=lookup_timeout,
    )


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[list[DhtNode]]:
    nodes = [make_node(i) for i in range(4)]
    await nodes[0].start()
    for node in nodes[1:]:
        await node.start(bootstrap=[nodes[0].address])
    yield nodes
    for node in nodes:
        await node.stop()


async def publish(node: DhtNode, rec: PeerRecord, log: KeyLog | None = None) -> int:
    return await node.publish(rec.to_bytes(), (log or ALICE.keylog).to_bytes())


@pytest.mark.asyncio
async def test_publish_on_one_node_resolve_on_another(cluster: list[DhtNode]) -> None:
    rec = record(sequence=5)
    assert await publish(cluster[1], rec) == 3
    for node in cluster:
        assert node.storage.get(KEY) == GOOD
    assert await cluster[3].resolve(ALICE.agent_id, now=NOW) == rec
    entry = await cluster[2].lookup(ALICE.agent_id, now=NOW, known_log=ALICE.keylog)
    assert entry.record == rec
    assert entry.log.agent_id == ALICE.agent_id


@pytest.mark.asyncio
async def test_a_prekey_bundle_travels_with_the_record(cluster: list[DhtNode]) -> None:
    """A signed-prekey-only bundle is published, stored and verified with the record."""
    rec = record(sequence=6)
    accepted = await cluster[1].publish(
        rec.to_bytes(), ALICE.keylog.to_bytes(), ALICE_BUNDLE.to_bytes()
    )
    assert accepted == 3
    entry = await cluster[3].lookup(ALICE.agent_id, now=NOW, known_log=ALICE.keylog)
    assert entry.record == rec
    assert entry.bundle == ALICE_BUNDLE
    plain = await publish(cluster[0], record(sequence=7))
    assert plain >= 1
    assert (await cluster[2].lookup(ALICE.agent_id, now=NOW)).bundle is None


@pytest.mark.asyncio
async def test_every_node_refuses_bad_values_sent_over_the_wire(cluster: list[DhtNode]) -> None:
    await publish(cluster[0], record(sequence=5))
    attacker = Server()  # stock kademlia: stores and forwards anything
    await attacker.listen(0, "127.0.0.1")
    try:
        await attacker.bootstrap([cluster[0].address])
        for name, bad in BAD_VALUES.items():
            if len(bad) > MAX_VALUE_SIZE:
                continue  # rpcudp cannot even send it
            for node in cluster:
                contact = Node(node.node_id, *node.address)
                answered, accepted = await attacker.protocol.call_store(contact, KEY, bad)
                assert answered, (name, node.address)
                assert accepted is False, (name, node.address)
        # The attacker also serves its forgery to lookups; readers skip it.
        attacker.storage[KEY] = BAD_VALUES["forged: signed by another key"]
        for node in cluster:
            assert node.storage.get(KEY) == GOOD
            assert (await node.resolve(ALICE.agent_id, now=NOW)).sequence == 5
    finally:
        attacker.stop()


@pytest.mark.asyncio
async def test_a_newer_record_replaces_an_older_one_everywhere(cluster: list[DhtNode]) -> None:
    await publish(cluster[0], record(sequence=1))
    newer = record(sequence=2, signer=ALICE_ROTATED, port=9002)
    assert await publish(cluster[2], newer, ALICE_ROTATED.keylog) == 3
    for node in cluster:
        assert (await node.resolve(ALICE.agent_id, now=NOW)) == newer
        entry = node.storage.entry(KEY)
        assert entry is not None
        assert entry.record == newer
    with pytest.raises(LocalProtocolError, match="not higher"):
        await publish(cluster[2], record(sequence=1, signer=ALICE_ROTATED), ALICE_ROTATED.keylog)
    # A reader that knows the rotation refuses records under the old key.
    with pytest.raises(KeyLogInvalid):
        verify_value(value(record(sequence=3)), now=NOW, known_log=ALICE_ROTATED.keylog)


@pytest.mark.asyncio
async def test_a_reader_with_a_newer_log_refuses_a_stale_key(cluster: list[DhtNode]) -> None:
    await publish(cluster[0], record(sequence=1))
    with pytest.raises(PeerNotFound):
        await cluster[3].resolve(ALICE.agent_id, now=NOW, known_log=ALICE_ROTATED.keylog)
    assert (await cluster[3].resolve(ALICE.agent_id, now=NOW, known_log=ALICE.keylog)).sequence == 1


@pytest.mark.asyncio
async def test_expired_records_are_not_resolved(cluster: list[DhtNode]) -> None:
    await publish(cluster[0], record(sequence=1))
    with pytest.raises(PeerNotFound):
        await cluster[1].resolve(ALICE.agent_id, now=NOW + 3600)


@pytest.mark.asyncio
async def test_publish_refuses_an_invalid_record(cluster: list[DhtNode]) -> None:
    with pytest.raises(LocalProtocolError, match="refusing to publish"):
        await publish(cluster[0], record(sequence=9, signer=MALLORY))
    with pytest.raises(LocalProtocolError, match="refusing to publish"):
        await cluster[0].publish(b"junk", ALICE.keylog.to_bytes())
    for node in cluster:
        assert node.storage.get(KEY) is None


@pytest.mark.asyncio
async def test_unknown_agent_is_not_found_within_the_deadline(cluster: list[DhtNode]) -> None:
    start = time.monotonic()
    with pytest.raises(PeerNotFound):
        await cluster[2].resolve(MALLORY.agent_id, now=NOW)
    assert time.monotonic() - start < 10


@pytest.mark.asyncio
async def test_a_dead_node_does_not_stall_lookups_past_the_deadline(
    cluster: list[DhtNode],
) -> None:
    rec = record(sequence=5)
    await publish(cluster[0], rec)
    # Each RPC may wait 30 s; only the 1 s lookup deadline can end these lookups early.
    patient = make_node(10, rpc_timeout=30.0, lookup_timeout=1.0)
    doomed = make_node(11)
    await doomed.start(bootstrap=[cluster[1].address])
    await patient.start(bootstrap=[cluster[0].address, doomed.address])
    assert doomed.address in patient.neighbours()
    await doomed.stop()
    try:
        start = time.monotonic()
        with pytest.raises(PeerNotFound):
            await patient.resolve(MALLORY.agent_id, now=NOW)
        # The best record found before the deadline is still returned.
        assert await patient.resolve(ALICE.agent_id, now=NOW) == rec
        assert time.monotonic() - start < 10
    finally:
        await patient.stop()


@pytest.mark.asyncio
async def test_rpcs_abandoned_at_the_deadline_time_out_quietly(
    cluster: list[DhtNode], caplog: pytest.LogCaptureFixture
) -> None:
    patient = make_node(12, rpc_timeout=1.0, lookup_timeout=0.3)
    doomed = make_node(13)
    await doomed.start(bootstrap=[cluster[1].address])
    await patient.start(bootstrap=[cluster[0].address, doomed.address])
    await doomed.stop()
    try:
        with caplog.at_level(logging.ERROR):
            with pytest.raises(PeerNotFound):
                await patient.resolve(MALLORY.agent_id, now=NOW)
            await asyncio.sleep(1.0)  # the cancelled RPC's timer fires now
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        await patient.stop()


@pytest.mark.asyncio
async def test_unreachable_bootstrap_is_not_fatal() -> None:
    dead = make_node(20)
    await dead.start()
    address = dead.address
    await dead.stop()
    node = make_node(21)
    await node.start(bootstrap=[address])
    try:
        assert node.neighbours() == []
        assert await node.bootstrap([address]) == 0
        with pytest.raises(PeerNotFound):
            await node.resolve(ALICE.agent_id, now=NOW)
    finally:
        await node.stop()


@pytest.mark.asyncio
async def test_hostile_datagrams_are_ignored(
    cluster: list[DhtNode], caplog: pytest.LogCaptureFixture
) -> None:
    await publish(cluster[0], record(sequence=5))
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=cluster[3].address
    )
    msg_id = b"\x01" * 20
    hostile = [
        b"short",
        b"\x00" + msg_id + b"\xc1",  # reserved msgpack code
        b"\x00" + msg_id + b"\x92\xa5store\x90",  # store with no arguments
        b"\x00" + msg_id + b"\x92\xa4ping\x91\x05",  # node id not bytes
        b"\x01" + msg_id + b"\xc0",  # response nobody asked for
        b"\x07" + msg_id + b"\xc0",  # unknown kind
    ]
    with caplog.at_level(logging.ERROR):
        for datagram in hostile:
            transport.sendto(datagram)
        transport.close()
        await asyncio.sleep(0.1)
        assert (await cluster[3].resolve(ALICE.agent_id, now=NOW)).sequence == 5
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
