"""PeerDirectory and rotations: the on_rotated hook, extend-only learning, revoked keys."""

from __future__ import annotations

from typing import Any

import pytest

from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.errors import KeyLogInvalid, KeyRevoked, PeerNotFound
from talos.peers import PeerDirectory
from talos.testing import FakeClock, SeededRng


class _Cache:
    def __init__(self) -> None:
        self.logs: dict[str, bytes] = {}

    def keylog(self, agent_id: str, /) -> bytes | None:
        return self.logs.get(agent_id)

    def put_keylog(self, agent_id: str, data: bytes, /) -> None:
        self.logs[agent_id] = data

    def peer_record(self, agent_id: str, /) -> bytes | None:
        return None

    def put_peer_record(self, record: bytes, /) -> None:
        return None

    def put_contact(self, agent_id: str, keylog: bytes, record: bytes | None, /) -> None:
        self.logs[agent_id] = keylog


class _Registry:
    """A discovery source that serves one log."""

    name = "registry"

    def __init__(self) -> None:
        self.log: KeyLog | None = None
        self.served: PeerRecord | None = None

    async def keylog(self, agent_id: str, known: KeyLog | None) -> KeyLog:
        assert self.log is not None
        return self.log

    async def record(self, agent_id: str, keys: Any, now: float) -> PeerRecord:
        assert self.served is not None
        self.served.verify(keys, now=now)
        return self.served


@pytest.fixture
def world() -> tuple[PeerDirectory, _Registry, list[tuple[int, int]], Identity]:
    rng, clock = SeededRng(3), FakeClock()
    me = Identity.create("me", rng=rng, clock=clock)
    registry = _Registry()
    directory = PeerDirectory(_Cache(), [registry], clock=clock, own=me.keylog)
    seen: list[tuple[int, int]] = []
    directory.on_rotated = lambda old, new: seen.append((len(old), len(new)))
    return directory, registry, seen, Identity.create("alice", rng=rng, clock=clock)


@pytest.mark.asyncio
async def test_a_newer_log_from_any_path_calls_on_rotated_once(world: Any) -> None:
    directory, registry, seen, alice = world
    rng, clock = SeededRng(4), FakeClock()
    directory.learn_log(alice.keylog)
    assert seen == []  # first sight: no rotation
    rotated = alice.rotate(rng=rng, clock=clock)
    registry.log = rotated.keylog
    learned = await directory.keylog(alice.agent_id, refresh=True)
    assert learned.events == rotated.keylog.events
    assert seen == [(1, 2)]
    directory.learn_log(rotated.keylog)  # the same log again
    directory.learn_log(alice.keylog)  # an older prefix: kept the newer one
    assert seen == [(1, 2)]
    known = directory.known_log(alice.agent_id)
    assert known is not None
    assert known.events == rotated.keylog.events
    fork = alice.rotate(rng=SeededRng(5), clock=clock, reason="other")
    with pytest.raises(KeyLogInvalid):
        directory.learn_log(fork.keylog)
    assert seen == [(1, 2)]


def test_a_revoked_key_is_never_handed_out(world: Any) -> None:
    directory, _, _, alice = world
    directory.learn_log(alice.keylog)
    assert directory.signing_key(alice.agent_id, 0) == alice.signing_key.public_key
    rotated = alice.rotate(rng=SeededRng(6), clock=FakeClock(), emergency=True, revoke_old=True)
    directory.learn_log(rotated.keylog)
    with pytest.raises(KeyRevoked, match="emergency rotation to key sequence 1"):
        directory.signing_key(alice.agent_id, 0)
    assert directory.signing_key(alice.agent_id, 1) == rotated.signing_key.public_key
    assert directory.signing_key(alice.agent_id, 2) is None


def _record(identity: Identity, clock: FakeClock) -> PeerRecord:
    return PeerRecord.create(
        identity.signing_key,
        agent_id=identity.agent_id,
        key_sequence=identity.sequence,
        instance_id=b"\x01" * 16,
        endpoint="ws://127.0.0.1:9001",
        sequence=1,
        now=clock.time(),
        lifetime=300,
    )


@pytest.mark.asyncio
async def test_a_record_under_a_newer_key_fetches_the_newer_log_first(world: Any) -> None:
    """A peer that rotated while we were not talking, back on a new endpoint: its record
    is signed under a key sequence our log lacks. We follow, then find it."""
    directory, registry, seen, alice = world
    clock = FakeClock()
    directory.learn_log(alice.keylog)
    rotated = alice.rotate(rng=SeededRng(7), clock=clock)
    registry.log, registry.served = rotated.keylog, _record(rotated, clock)
    record = await directory.endpoint(alice.agent_id)
    assert record.endpoint == "ws://127.0.0.1:9001"
    assert seen == [(1, 2)]
    # A record under a sequence the source's log does not reach either: still refused.
    registry.log, registry.served = rotated.keylog, _record(rotated.rotate(
        rng=SeededRng(8), clock=clock), clock)  # fmt: skip
    with pytest.raises(PeerNotFound):
        await directory.endpoint(alice.agent_id, refresh=True)
    assert seen == [(1, 2)]


class _RecordingCache(_Cache):
    def __init__(self) -> None:
        super().__init__()
        self.contacts: list[tuple[str, bytes, bytes | None]] = []
        self.at_once: list[str] = []

    def put_keylog(self, agent_id: str, data: bytes, /) -> None:
        self.at_once.append(agent_id)
        super().put_keylog(agent_id, data)

    def put_contact(self, agent_id: str, keylog: bytes, record: bytes | None, /) -> None:
        self.contacts.append((agent_id, keylog, record))
        self.logs[agent_id] = keylog


def test_a_first_contact_is_cached_in_one_write() -> None:
    """learn_contact: the key log and a record that verifies under it in one write;
    a record that does not verify (another key, expired) is left out, the log kept;
    a peer already known goes through learn_log (extend-only) instead."""
    rng, clock = SeededRng(3), FakeClock()
    me = Identity.create("me", rng=rng, clock=clock)
    alice, bob, carol = (Identity.create(n, rng=rng, clock=clock) for n in ("a", "b", "c"))
    cache = _RecordingCache()
    directory = PeerDirectory(cache, [], clock=clock, own=me.keylog)
    record = _record(alice, clock)
    assert directory.learn_contact(alice.keylog, record).events == alice.keylog.events
    assert cache.contacts == [(alice.agent_id, alice.keylog.to_bytes(), record.to_bytes())]
    known = directory.known_log(alice.agent_id)
    assert known is not None
    assert directory.signing_key(alice.agent_id, 0) == alice.signing_key.public_key

    forged = PeerRecord.create(
        bob.signing_key,
        agent_id=carol.agent_id,
        key_sequence=0,
        instance_id=b"\x02" * 16,
        endpoint="ws://127.0.0.1:9002",
        sequence=1,
        now=clock.time(),
        lifetime=300,
    )
    directory.learn_contact(carol.keylog, forged)
    assert cache.contacts[-1] == (carol.agent_id, carol.keylog.to_bytes(), None)

    stale = _record(bob, clock)
    clock.advance(3600)  # far past its lifetime and any allowed skew
    directory.learn_contact(bob.keylog, stale)
    assert cache.contacts[-1] == (bob.agent_id, bob.keylog.to_bytes(), None)

    rotated = alice.rotate(rng=SeededRng(9), clock=clock)
    assert directory.learn_contact(rotated.keylog, None).events == rotated.keylog.events
    assert len(cache.contacts) == 3  # known already: learn_log, not a first contact
    assert cache.logs[alice.agent_id] == rotated.keylog.to_bytes()


def test_a_first_key_log_may_wait_and_a_rotation_is_written_at_once() -> None:
    """learn_log: a peer's first log goes through put_contact (its write may wait for
    the next commit: it is fetched again if lost); a longer log of a known peer
    (a rotation, perhaps revoking a stolen key) through put_keylog, at once."""
    rng, clock = SeededRng(4), FakeClock()
    me = Identity.create("me", rng=rng, clock=clock)
    alice = Identity.create("a", rng=rng, clock=clock)
    cache = _RecordingCache()
    directory = PeerDirectory(cache, [], clock=clock, own=me.keylog)
    directory.learn_log(alice.keylog)
    assert cache.contacts == [(alice.agent_id, alice.keylog.to_bytes(), None)]
    assert cache.at_once == []
    rotated = alice.rotate(rng=SeededRng(9), clock=clock)
    directory.learn_log(rotated.keylog)
    assert cache.at_once == [alice.agent_id]
    assert cache.logs[alice.agent_id] == rotated.keylog.to_bytes()
    assert len(cache.contacts) == 1
