"""Two store handles on one database behave as one registry (both backends).

Each handle stands for a replica: its own connections (PostgreSQL) or its
own connection and lock (SQLite). What one handle's check read must still be
true when it writes, whichever handle wrote in between.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from registry_fixtures import Agent

from talos.registry.admission import Refused
from talos.registry.store import RegistryStore
from talos.testing import FakeClock

NOW_MS = 1_700_000_000_000


@pytest.fixture
def pair(database: Path | str) -> Iterator[tuple[RegistryStore, RegistryStore]]:
    with RegistryStore.open(database) as one, RegistryStore.open(database) as two:
        yield one, two


def together(calls: list[Callable[[], None]]) -> None:
    """Run every call in its own thread, released at once; re-raise the first failure."""
    barrier = threading.Barrier(len(calls))
    failures: list[BaseException] = []

    def run(call: Callable[[], None]) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def test_concurrent_bundles_through_two_handles_serve_each_key_once(
    pair: tuple[RegistryStore, RegistryStore], alice: Agent
) -> None:
    one, two = pair
    one.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    one.put_prekeys(alice.upload(30), now_ms=NOW_MS)
    served: list[int | None] = []

    def take(store: RegistryStore) -> None:
        bundle = store.take_bundle(alice.agent_id)
        assert bundle is not None
        served.append(bundle.one_time_prekey_id)

    together([lambda s=s: take(s) for s in (one, two) * 20])  # type: ignore[misc]
    keys = [k for k in served if k is not None]
    assert len(keys) == len(set(keys)) == 30  # none twice, none falsely missing
    assert served.count(None) == 10
    assert one.one_time_prekeys_left(alice.agent_id) == 0


def test_interleaved_announcements_never_regress_the_sequence(
    pair: tuple[RegistryStore, RegistryStore], alice: Agent, clock: FakeClock
) -> None:
    one, two = pair
    one.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    records = [alice.record(sequence=s, instance=bytes([s % 4]) * 16) for s in range(1, 41)]
    random.Random(7).shuffle(records)  # noqa: S311 - an order, not a secret
    accepted: list[int] = []

    def put(store: RegistryStore, sequence: int) -> None:
        record = next(r for r in records if r.sequence == sequence)
        try:
            store.put_record(record, now=clock.time())
        except Refused:
            return
        accepted.append(sequence)

    together([lambda i=i, r=r: put((one, two)[i % 2], r.sequence) for i, r in enumerate(records)])  # type: ignore[misc]
    top = max(accepted)
    now_ms = int(clock.time() * 1000)
    assert max(i.sequence for i in two.instances(alice.agent_id, now_ms=now_ms)) == top
    for record in records:  # every sequence up to the highest accepted is spent for good
        if record.sequence <= top:
            with pytest.raises(Refused):
                (one, two)[record.sequence % 2].put_record(record, now=clock.time())


def test_sweep_deletes_expired_records_but_keeps_what_prevents_replays(
    store: RegistryStore, alice: Agent, clock: FakeClock
) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    upload = alice.upload(2)
    store.put_prekeys(upload, now_ms=NOW_MS)
    handed = store.take_bundle(alice.agent_id)
    assert handed is not None
    assert handed.one_time_prekey_id == 0
    old = alice.record(sequence=5, lifetime=10)
    store.put_record(old, now=clock.time())
    later_ms = int((clock.time() + 11) * 1000)
    assert store.sweep(now_ms=later_ms) == 1
    assert store.instances(alice.agent_id, now_ms=int(clock.time() * 1000)) == []
    with pytest.raises(Refused):  # the sequence outlives its record
        store.put_record(old, now=clock.time())
    # An upload listing the handed-out key again does not get it served twice.
    store.put_prekeys(alice.upload(sequence=upload.sequence + 1), now_ms=NOW_MS)
    again = store.take_bundle(alice.agent_id)
    assert again is not None
    assert again.one_time_prekey_id == 1


def test_drain_shares_allow_a_share_then_withhold(store: RegistryStore, clock: FakeClock) -> None:
    shares = store.drain_shares(3)
    assert [shares.allow("10.0.0.1", "agent", clock) for _ in range(4)] == [True] * 3 + [False]
    assert shares.allow("10.0.0.2", "agent", clock)  # another client has its own share
    clock.advance(20)  # a third of a minute: one more
    assert shares.allow("10.0.0.1", "agent", clock)
    assert not shares.allow("10.0.0.1", "agent", clock)
