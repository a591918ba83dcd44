"""Split-brain detection: the overlap rule, the store applying it, and its SQL twin."""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_fixtures import Agent

from talos.core.peer_record import PeerRecord
from talos.registry import store as store_module
from talos.registry.duplicates import Activity, duplicated, newly_overlapping, overlap
from talos.registry.store import MAX_LISTED_DUPLICATES, RegistryStore
from talos.testing import FakeClock

A, B, C = b"\x0a" * 16, b"\x0b" * 16, b"\x0c" * 16
MINUTE = 60.0
#: What TalosClient does: a record an hour long, announced again every 15 minutes.
LIFETIME, EVERY = 60 * MINUTE, 15 * MINUTE


# -- the rule ---------------------------------------------------------------------------


def test_a_restart_never_overlaps_its_successor() -> None:
    old = Activity(A, first_sequence=1, sequence=3)  # announced at 1, 2, 3, then stopped
    new = Activity(B, first_sequence=4, sequence=9)  # started after, keeps announcing
    assert not overlap(old, new)
    assert not overlap(new, old)
    assert not duplicated([old, new])


def test_instances_announcing_concurrently_overlap() -> None:
    first = Activity(A, first_sequence=1, sequence=5)  # announced again after B appeared
    second = Activity(B, first_sequence=4, sequence=6)
    assert overlap(first, second)
    assert overlap(second, first)
    assert duplicated([second, first])


def test_one_announcement_each_is_not_yet_an_overlap() -> None:
    # Two instances started a minute apart: not provable until the first one re-announces.
    assert not duplicated([Activity(A, 1, 1), Activity(B, 2, 2)])
    assert duplicated([Activity(A, 1, 3), Activity(B, 2, 2)])


def test_an_instance_never_overlaps_itself() -> None:
    assert not overlap(Activity(A, 1, 5), Activity(A, 1, 5))


def test_instances_first_seen_together_overlap_once_both_go_on() -> None:
    assert not duplicated([Activity(A, 5, 5), Activity(B, 5, 9)])
    assert duplicated([Activity(A, 5, 6), Activity(B, 5, 9)])


def test_an_activity_cannot_end_before_it_starts() -> None:
    with pytest.raises(ValueError, match="precede"):
        Activity(A, 5, 4)


def test_newly_overlapping_reports_each_new_pair_once() -> None:
    a, b, c = Activity(A, 1, 1), Activity(B, 2, 2), Activity(C, 10, 10)
    assert newly_overlapping(None, b, [a]) == ()  # a new instance proves nothing yet
    a_again = Activity(A, 1, 3)
    assert newly_overlapping(a, a_again, [b]) == (A, B)
    b_again = Activity(B, 2, 4)
    assert newly_overlapping(b, b_again, [a_again]) == ()  # already known
    # A third instance appearing (then overlapping) is news again.
    a_later = Activity(A, 1, 11)
    assert newly_overlapping(a_again, a_later, [b_again, c]) == (A, C)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=0, max_size=8))
def test_duplicated_is_any_overlapping_pair(spans: list[tuple[int, int]]) -> None:
    live = [
        Activity(bytes([i]) * 16, first, first + extra) for i, (first, extra) in enumerate(spans)
    ]
    pairwise = any(overlap(a, b) for a in live for b in live)
    assert duplicated(live) == pairwise


# -- the store --------------------------------------------------------------------------


def announce(
    store: RegistryStore, agent: Agent, clock: FakeClock, instance: bytes, port: int = 9000
) -> tuple[bytes, ...]:
    """An announcement the way TalosClient makes it: sequence = issue time in ms."""
    now = clock.time()
    record = PeerRecord.create(
        agent.identity.signing_key,
        agent_id=agent.agent_id,
        key_sequence=agent.identity.sequence,
        instance_id=instance,
        endpoint=f"ws://127.0.0.1:{port}",
        sequence=int(now * 1000),
        now=now,
        lifetime=LIFETIME,
    )
    return store.put_record(record, now=now)


def now_ms(clock: FakeClock) -> int:
    return int(clock.time() * 1000)


def test_store_restart_with_the_old_record_still_live_is_not_a_duplicate(
    store: RegistryStore, alice: Agent, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=now_ms(clock))
    for _ in range(4):  # an hour of announcements
        assert announce(store, alice, clock, A) == ()
        clock.advance(EVERY)
    restarted_at = now_ms(clock)
    for _ in range(4):  # restarted: a new instance id; the old one never announces again
        assert announce(store, alice, clock, B) == ()
        status = store.duplicate_status(alice.agent_id, now_ms=now_ms(clock))
        assert not status.duplicate
        clock.advance(EVERY / 3)
    live = store.instances(alice.agent_id, now_ms=now_ms(clock))
    assert {i.instance_id for i in live} == {A, B}  # two live records, yet no duplicate
    assert [i.first_seen_ms for i in live if i.instance_id == B] == [restarted_at]
    assert store.live_counts(now_ms=now_ms(clock)).duplicate_identities == 0
    assert store.duplicate_statuses(now_ms=now_ms(clock)) == ([], False)
    assert "split brain" not in caplog.text


def test_store_quick_restart_with_the_agent_clock_ahead_is_not_a_duplicate(
    store: RegistryStore, alice: Agent, clock: FakeClock
) -> None:
    registry_now = clock.time()
    store.put_keylog(alice.identity.keylog, now_ms=int(registry_now * 1000))
    clock.advance(30)  # the agent's clock runs 30 s ahead: within the 60 s tolerated
    store.put_record(alice.record(instance=A, sequence=now_ms(clock)), now=registry_now)
    registry_now += 5  # it crashes and restarts 5 s later
    clock.advance(5)
    store.put_record(alice.record(instance=B, sequence=now_ms(clock)), now=registry_now)
    status = store.duplicate_status(alice.agent_id, now_ms=int(registry_now * 1000))
    old, new = sorted(status.instances, key=lambda i: i.first_seen_ms)
    # Comparing timestamps from the two clocks would say A announced after B appeared:
    assert old.issued_ms > new.first_seen_ms
    assert not status.duplicate


def test_store_concurrent_instances_are_detected_once_and_logged(
    store: RegistryStore, alice: Agent, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=now_ms(clock))
    started = now_ms(clock)
    assert announce(store, alice, clock, A, 9001) == ()
    clock.advance(5 * MINUTE)
    assert announce(store, alice, clock, B, 9002) == ()  # a second host starts
    assert not store.duplicate_status(alice.agent_id, now_ms=now_ms(clock)).duplicate
    clock.advance(10 * MINUTE)
    with caplog.at_level(logging.WARNING, logger="talos.registry"):
        assert announce(store, alice, clock, A, 9001) == (A, B)  # A re-announces: caught
    [warning] = [r for r in caplog.records if getattr(r, "event", None) == "duplicate_instance"]
    assert warning.levelno == logging.WARNING
    assert getattr(warning, "peer_id", None) == alice.agent_id
    assert getattr(warning, "instances", None) == [A.hex(), B.hex()]
    status = store.duplicate_status(alice.agent_id, now_ms=now_ms(clock))
    assert status.duplicate
    assert [(i.instance_id, i.endpoint) for i in status.instances] == [
        (A, "ws://127.0.0.1:9001"),
        (B, "ws://127.0.0.1:9002"),
    ]
    assert [i.first_seen_ms for i in status.instances] == [started, started + 5 * 60_000]
    clock.advance(EVERY)
    assert announce(store, alice, clock, B, 9002) == ()  # still duplicated: not news
    clock.advance(1)
    assert announce(store, alice, clock, A, 9001) == ()
    listed, truncated = store.duplicate_statuses(now_ms=now_ms(clock))
    assert [s.agent_id for s in listed] == [alice.agent_id]
    assert not truncated
    assert store.live_counts(now_ms=now_ms(clock)).duplicate_identities == 1


def test_store_duplicate_ends_when_the_extra_instance_expires(
    store: RegistryStore, alice: Agent, bob: Agent, clock: FakeClock
) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=now_ms(clock))
    announce(store, alice, clock, A)
    clock.advance(1)
    announce(store, alice, clock, B)
    clock.advance(1)
    announce(store, alice, clock, A)
    assert store.duplicate_status(alice.agent_id, now_ms=now_ms(clock)).duplicate
    clock.advance(LIFETIME)  # B stopped; A kept announcing
    announce(store, alice, clock, A)
    assert not store.duplicate_status(alice.agent_id, now_ms=now_ms(clock)).duplicate
    unknown = store.duplicate_status(bob.agent_id, now_ms=now_ms(clock))
    assert (unknown.duplicate, unknown.instances) == (False, ())


# -- the SQL twin of the rule -----------------------------------------------------------

_activity_sets = st.lists(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 30), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(agents=_activity_sets)
def test_sql_and_python_rules_agree(agents: list[list[tuple[int, int, bool]]]) -> None:
    now = 1_000
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "registry.db"
        RegistryStore.open(path).close()
        expected: dict[str, bool] = {}
        with sqlite3.connect(path) as db:
            for n, instances in enumerate(agents):
                agent = f"did:talos:zAgent{n}"
                live = []
                for i, (first, extra, alive) in enumerate(instances):
                    activity = Activity(bytes([i]) * 16, first, first + extra)
                    expires = now + 1 if alive else now
                    db.execute(
                        "INSERT INTO records (agent_id, instance_id, sequence, endpoint, issued_ms,"
                        " expires_ms, record, first_seen_ms, first_sequence)"
                        " VALUES (?, ?, ?, 'ws://h:1', 0, ?, x'', 0, ?)",
                        (agent, activity.instance_id, activity.sequence, expires, first),
                    )
                    if alive:
                        live.append(activity)
                expected[agent] = duplicated(live)
        with RegistryStore.open(path) as store:
            listed, truncated = store.duplicate_statuses(now_ms=now)
            counts = store.live_counts(now_ms=now)
            for agent, duplicate in expected.items():
                assert store.duplicate_status(agent, now_ms=now).duplicate == duplicate
    assert sorted(s.agent_id for s in listed) == sorted(a for a, d in expected.items() if d)
    assert counts.duplicate_identities == sum(expected.values())
    assert counts.agents == sum(1 for instances in agents if any(i[2] for i in instances))
    assert counts.instances == sum(i[2] for instances in agents for i in instances)
    assert not truncated


def test_the_listing_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    RegistryStore.open(path).close()
    with sqlite3.connect(path) as db:
        for n in range(MAX_LISTED_DUPLICATES + 1):
            for instance, (first, sequence) in ((A, (1, 3)), (B, (2, 4))):
                db.execute(
                    "INSERT INTO records VALUES (?, ?, ?, 'ws://h:1', 0, 10, x'', 0, ?)",
                    (f"did:talos:z{n:05d}", instance, sequence, first),
                )
    with RegistryStore.open(path) as store:
        listed, truncated = store.duplicate_statuses(now_ms=5)
        assert (len(listed), truncated) == (MAX_LISTED_DUPLICATES, True)
        assert store.live_counts(now_ms=5).duplicate_identities == MAX_LISTED_DUPLICATES + 1


def test_the_listing_is_bounded_by_instances_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_MAX_LISTED_TOTAL", 5)
    path = tmp_path / "registry.db"
    RegistryStore.open(path).close()
    with sqlite3.connect(path) as db:
        for n in range(3):
            for instance, (first, sequence) in ((A, (1, 3)), (B, (2, 4))):
                db.execute(
                    "INSERT INTO records VALUES (?, ?, ?, 'ws://h:1', 0, 10, x'', 0, ?)",
                    (f"did:talos:z{n:05d}", instance, sequence, first),
                )
    with RegistryStore.open(path) as store:
        listed, truncated = store.duplicate_statuses(now_ms=5)
    assert ([s.agent_id for s in listed], truncated) == (
        ["did:talos:z00000", "did:talos:z00001"],
        True,
    )
