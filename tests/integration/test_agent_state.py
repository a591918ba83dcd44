"""AgentState on real LMDB files: one transaction per change, sealing, replay, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from written_databases import record_written

from talos.audit import AuditFull, AuditKind, AuditLog, AuditRecord
from talos.core.agent_id import agent_id_from_digest
from talos.core.clock import time_ms
from talos.core.crypto import SigningKey
from talos.core.peer_record import PeerRecord
from talos.errors import (
    ConfigurationError,
    DuplicateMessage,
    LocalProtocolError,
    MalformedFrame,
    QueueFull,
    StaleMessage,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.storage.agent_state import (
    MAX_DEFERRED,
    AgentState,
    Enqueue,
    InboxMessage,
    Received,
)
from talos.storage.lmdb import MIN_SIZE_BYTES
from talos.storage.state.inbox import NEXT_KEY as INBOX_NEXT
from talos.storage.state.outbox import NEXT_KEY as OUTBOX_NEXT
from talos.storage.state.replay import FLOOR_STEP_MS
from talos.testing import FakeClock, SeededRng

KEY = bytes(range(32))
ALICE = agent_id_from_digest(b"\x01" * 32)
BOB = agent_id_from_digest(b"\x02" * 32)
SECRET = b"TOP-SECRET-PLAINTEXT-do-not-store-in-the-clear"


def _open(path: Path, clock: FakeClock, **options: Any) -> AuditLog:
    return AuditLog.open(path, clock=clock, extra_databases=AgentState.DATABASES, **options)


def _state(log: AuditLog, clock: FakeClock, key: bytes = KEY, **options: Any) -> AgentState:
    return AgentState(log, storage_key=key, clock=clock, rng=SeededRng(7), **options)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "audit"


@pytest.fixture
def log(home: Path, clock: FakeClock) -> Iterator[AuditLog]:
    with _open(home, clock) as opened:
        yield opened


@pytest.fixture
def state(log: AuditLog, clock: FakeClock) -> AgentState:
    return _state(log, clock)


def _sent(mid: bytes, peer: str = BOB) -> list[AuditRecord]:
    return [AuditRecord(AuditKind.MESSAGE_SENT, {"id": mid}, peer)]


def _received(mid: bytes, peer: str = BOB) -> list[AuditRecord]:
    return [AuditRecord(AuditKind.MESSAGE_RECEIVED, {"id": mid}, peer)]


def _message(clock: FakeClock, mid: bytes, data: bytes, sender: str = BOB) -> InboxMessage:
    now = time_ms(clock)
    return InboxMessage(sender, mid, data, now - 5, now, None)


def _receive(state: AgentState, clock: FakeClock, mid: bytes, data: bytes = b"hi") -> int:
    return state.commit_receive(
        BOB,
        session=b"session after " + mid,
        replay_id=mid,
        timestamp_ms=time_ms(clock),
        message=_message(clock, mid, data),
        audit=_received(mid),
    )


def _receive_again(
    state: AgentState, clock: FakeClock, mid: bytes, timestamp_ms: int, data: bytes = b"replayed"
) -> int:
    """A message ``mid`` stamped ``timestamp_ms`` (a replay, when ``mid`` was seen)."""
    return state.commit_receive(
        BOB,
        session=b"s",
        replay_id=mid,
        timestamp_ms=timestamp_ms,
        message=_message(clock, mid, data),
    )


def _replay_keys(home: Path) -> list[bytes]:
    """The keys of the stored replay rows, read through LMDB directly."""
    env = _raw_env(home)
    try:
        with env.begin() as txn:
            return list(txn.cursor(db=env.open_db(b"x:replay", txn=txn)).iternext(values=False))
    finally:
        env.close()


def _enqueue(state: AgentState, peer: str, mid: bytes, payload: bytes = b"x", **kw: Any) -> None:
    kw.setdefault("queue_limit", 100)
    state.enqueue(peer, mid, payload, capability=None, audit=_sent(mid, peer), **kw)


def _raw_env(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), max_dbs=32)


def _rewrite(path: Path, db: str, key: bytes, value: bytes | None) -> None:
    """Replace (or with None flip one bit of) a stored value, writing through LMDB directly."""
    env = _raw_env(path)
    try:
        handle = env.open_db(b"x:" + db.encode())
        with env.begin(write=True) as txn:
            old = txn.get(key, db=handle)
            assert old is not None
            if value is None:
                raw = bytearray(old)
                raw[len(raw) // 2] ^= 0x01
                value = bytes(raw)
            txn.put(key, value, db=handle)
    finally:
        env.close()


def _peer_record(clock: FakeClock, sequence: int) -> bytes:
    return PeerRecord.create(
        SigningKey(bytes(32)),
        agent_id=BOB,
        key_sequence=0,
        instance_id=bytes(16),
        endpoint="ws://127.0.0.1:9000",
        sequence=sequence,
        now=clock.time(),
        lifetime=3600,
    ).to_bytes()


# -- everything survives a reopen ------------------------------------------------------


def test_state_survives_close_and_reopen(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        state.put_session(ALICE, b"alice session")
        state.put_prekeys(b"prekey store")
        _enqueue(state, ALICE, b"m1", b"payload one")
        seq = _receive(state, clock, b"r1", b"received one")
        assert state.put_peer_record(_peer_record(clock, 1))
        state.put_keylog(BOB, b"bob key log")
        size = log.size
    with _open(home, clock) as log:
        state = _state(log, clock)
        assert log.size == size
        assert state.session(ALICE) == b"alice session"
        assert state.session(BOB) == b"session after r1"
        assert state.session_peers() == sorted([ALICE, BOB])
        assert state.prekeys() == b"prekey store"
        [item] = state.pending()
        assert (item.peer, item.message_id, item.payload) == (ALICE, b"m1", b"payload one")
        [(got_seq, message)] = state.inbox()
        assert got_seq == seq
        assert message == _message(clock, b"r1", b"received one")
        assert state.peer_record(BOB) == _peer_record(clock, 1)
        assert state.peer_records() == [_peer_record(clock, 1)]
        assert state.keylog(BOB) == b"bob key log"
        assert b"r1" in state.replay_window
        assert log.verify_chain().ok


def test_empty_state_reads_as_empty(state: AgentState) -> None:
    assert state.session(BOB) is None
    assert state.prekeys() is None
    assert state.pending() == []
    assert state.peers_with_pending() == []
    assert state.outbox_count() == 0
    assert state.inbox() == []
    assert state.take() == []
    assert state.peer_record(BOB) is None
    assert state.keylog(BOB) is None


def test_log_without_the_databases_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    with AuditLog.open(tmp_path / "plain", clock=clock) as log:
        with pytest.raises(ConfigurationError, match="extra_databases"):
            _state(log, clock)
        with pytest.raises(ConfigurationError, match="32 bytes"):
            AgentState(log, storage_key=b"short", clock=clock)


# -- one transaction: audit entry and rows together, or neither --------------------------


def _mutations(clock: FakeClock) -> dict[str, Any]:
    """Each mutating method, called with one audit record; a function of (state, audit)."""
    return {
        "put_session": lambda s, a: s.put_session(BOB, b"s", audit=a),
        "put_prekeys": lambda s, a: s.put_prekeys(b"p", audit=a),
        "enqueue": lambda s, a: s.enqueue(
            BOB, b"new", b"x", capability=None, queue_limit=10, audit=a
        ),
        "commit_receive": lambda s, a: s.commit_receive(
            BOB,
            session=b"s2",
            replay_id=b"new",
            timestamp_ms=time_ms(clock),
            message=_message(clock, b"new", b"d"),
            audit=a,
        ),
        "commit_duplicate": lambda s, a: s.commit_duplicate(audit=a),
        "remove": lambda s, a: s.remove(b"queued", audit=a),
        "record_attempt": lambda s, a: s.record_attempt(b"queued", 5.0, session=b"s3", audit=a),
        "take": lambda s, a: s.take(audit=a),
        "acknowledge": lambda s, a: s.acknowledge(0, audit=a),
        "drop_session": lambda s, a: s.drop_session(ALICE, audit=a),
        "put_peer_record": lambda s, a: s.put_peer_record(_peer_record(clock, 1), audit=a),
        "put_keylog": lambda s, a: s.put_keylog(BOB, b"log", audit=a),
    }


def _prepared(state: AgentState, clock: FakeClock) -> None:
    state.put_session(ALICE, b"alice")
    _enqueue(state, BOB, b"queued", b"queued payload")
    _receive(state, clock, b"waiting")


def _snapshot(state: AgentState) -> tuple[Any, ...]:
    return (
        state.session(BOB),
        state.session(ALICE),
        state.prekeys(),
        state.pending(),
        state.inbox(),
        state.peer_record(BOB),
        state.keylog(BOB),
        len(state.replay_window),
    )


@pytest.mark.parametrize("method", sorted(_mutations(FakeClock())))
def test_each_mutation_commits_its_audit_entry_with_its_rows(
    method: str, log: AuditLog, state: AgentState, clock: FakeClock
) -> None:
    _prepared(state, clock)
    before, size = _snapshot(state), log.size
    _mutations(clock)[method](state, [AuditRecord("STATE_TEST", {"m": method}, None)])
    assert log.size == size + 1
    assert log.entry(size).kind == "STATE_TEST"
    assert _snapshot(state) != before or method == "commit_duplicate"


@pytest.mark.parametrize("method", sorted(_mutations(FakeClock())))
def test_invalid_audit_record_writes_nothing(
    method: str, home: Path, log: AuditLog, state: AgentState, clock: FakeClock
) -> None:
    _prepared(state, clock)
    before, size = _snapshot(state), log.size
    with pytest.raises(LocalProtocolError):
        _mutations(clock)[method](state, [AuditRecord("not a kind", {}, None)])
    assert (_snapshot(state), log.size) == (before, size)


def test_audit_full_mid_transaction_leaves_neither(home: Path, clock: FakeClock) -> None:
    with _open(home, clock, max_size_bytes=MIN_SIZE_BYTES) as log:
        state = _state(log, clock)
        stored = 0
        with pytest.raises(AuditFull):  # noqa: PT012 - fill until the map is full
            for i in range(200):
                _enqueue(state, BOB, b"m%d" % i, bytes([i]) * 8192, queue_limit=1000)
                stored += 1
        assert 0 < stored < 200
        size, before = log.size, _snapshot(state)
        assert size == stored
        with pytest.raises(AuditFull):
            _receive(state, clock, b"too big", b"y" * 64_000)
        assert b"too big" not in state.replay_window
        assert (log.size, _snapshot(state)) == (size, before)
    with _open(home, clock) as log:
        state = _state(log, clock)
        assert log.size == stored
        assert [item.message_id for item in state.pending()] == [b"m%d" % i for i in range(stored)]
        assert state.inbox() == []
        assert b"too big" not in state.replay_window
        assert log.verify_chain().ok


# -- the outbox ------------------------------------------------------------------------


def test_outbox_keeps_order_per_peer_across_reopen(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        for i in range(10):
            _enqueue(state, (ALICE, BOB)[i % 3 == 0], b"m%d" % i, b"p%d" % i)
            clock.advance(1)
    with _open(home, clock) as log:
        state = _state(log, clock)
        bob = [item.message_id for item in state.pending(BOB)]
        alice = [item.message_id for item in state.pending(ALICE)]
        assert bob == [b"m0", b"m3", b"m6", b"m9"]
        assert alice == [b"m1", b"m2", b"m4", b"m5", b"m7", b"m8"]
        assert [item.message_id for item in state.pending()] == [b"m%d" % i for i in range(10)]
        assert state.peers_with_pending() == sorted([ALICE, BOB])
        assert state.outbox_count() == 10
        assert [item.seq for item in state.pending()] == list(range(10))
        item = state.outbox_item(b"m3")
        assert item is not None
        assert (item.payload, item.enqueued_ms) == (b"p3", 1_700_000_003_000)
        assert state.remove(b"m3", audit=_sent(b"m3"))
        for mid in (b"m0", b"m6", b"m9"):
            state.remove(mid)
        assert state.peers_with_pending() == [ALICE]
        _enqueue(state, BOB, b"m10")
        assert [item.seq for item in state.pending(BOB)] == [10]


def test_queue_full_at_the_limit_writes_nothing(log: AuditLog, state: AgentState) -> None:
    for i in range(3):
        _enqueue(state, (ALICE, BOB)[i % 2], b"m%d" % i, queue_limit=3)
    size = log.size
    with pytest.raises(QueueFull, match="queue_limit 3"):
        _enqueue(state, BOB, b"m3", queue_limit=3)
    assert (log.size, state.outbox_count(), state.outbox_item(b"m3")) == (size, 3, None)
    state.remove(b"m0")
    _enqueue(state, BOB, b"m3", queue_limit=3)
    assert state.outbox_count() == 3


def test_enqueue_refuses_a_queued_message_id(log: AuditLog, state: AgentState) -> None:
    _enqueue(state, BOB, b"m1")
    size = log.size
    with pytest.raises(LocalProtocolError, match="queued already"):
        _enqueue(state, ALICE, b"m1")
    assert (log.size, state.outbox_count()) == (size, 1)


@pytest.mark.parametrize(
    ("peer", "mid", "payload"),
    [
        ("", b"m", b"x"),
        ("a\nb", b"m", b"x"),
        ("x" * 256, b"m", b"x"),
        (BOB, b"", b"x"),
        (BOB, b"m" * 65, b"x"),
        (BOB, b"m", "text"),
    ],
)
def test_enqueue_checks_its_arguments(
    state: AgentState, peer: str, mid: bytes, payload: Any
) -> None:
    with pytest.raises(LocalProtocolError):
        state.enqueue(peer, mid, payload, capability=None, queue_limit=5)
    assert state.outbox_count() == 0


def test_remove_is_idempotent_and_writes_no_audit_twice(log: AuditLog, state: AgentState) -> None:
    _enqueue(state, BOB, b"m1")
    size = log.size
    assert state.remove(b"m1", audit=_sent(b"m1"))
    assert not state.remove(b"m1", audit=_sent(b"m1"))
    assert log.size == size + 1
    assert state.pending() == []
    assert state.peers_with_pending() == []


def test_record_attempt_counts_attempts_and_stores_the_session(
    home: Path, clock: FakeClock
) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        state.enqueue(BOB, b"m1", b"p", capability=b"cap", queue_limit=5)
        first = state.record_attempt(b"m1", 10.5, session=b"after first")
        assert first is not None
        assert (first.attempts, first.last_attempt_ms) == (1, 10_500)
        state.record_attempt(b"m1", 12.0)
        size = log.size
        assert state.record_attempt(b"gone", 13.0, session=b"x") is None
        assert log.size == size
    with _open(home, clock) as log:
        state = _state(log, clock)
        item = state.outbox_item(b"m1")
        assert item is not None
        assert (item.attempts, item.last_attempt_ms, item.capability) == (2, 12_000, b"cap")
        assert item.payload == b"p"
        assert state.session(BOB) == b"after first"


# -- sealing at rest -------------------------------------------------------------------


def test_secrets_are_not_in_the_clear_on_disk(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        _enqueue(state, BOB, b"m1", SECRET + b"-outbox")
        state.commit_receive(
            BOB,
            session=SECRET + b"-session",
            replay_id=b"r1",
            timestamp_ms=time_ms(clock),
            message=_message(clock, b"r1", SECRET + b"-inbox"),
            prekeys=SECRET + b"-prekeys",
        )
        assert state.pending()[0].payload == SECRET + b"-outbox"
    data = (home / "data.mdb").read_bytes()
    assert SECRET[:16] not in data
    assert b"m1" in data  # the message id is metadata, kept in the clear


def test_wrong_storage_key_is_refused(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        _enqueue(_state(log, clock), BOB, b"m1", SECRET)
    with _open(home, clock) as log:
        with pytest.raises(ConfigurationError, match="storage_key does not open"):
            _state(log, clock, key=bytes(32))
        assert _state(log, clock).pending()[0].payload == SECRET


def test_sealed_value_moved_to_another_row_fails(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        state.put_session(ALICE, b"alice")
        state.put_session(BOB, b"bob")
    env = _raw_env(home)
    with env.begin() as txn:
        alice = txn.get(ALICE.encode(), db=env.open_db(b"x:sessions", txn=txn))
    env.close()
    assert alice is not None
    _rewrite(home, "sessions", BOB.encode(), alice)
    with _open(home, clock) as log, pytest.raises(StoreCorrupted, match="sessions"):
        _state(log, clock).session(BOB)


# -- receiving and the replay set --------------------------------------------------------


def test_duplicates_are_refused_before_and_after_restart(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        _receive(state, clock, b"r1")
        size = log.size
        with pytest.raises(DuplicateMessage):
            _receive(state, clock, b"r1")
        assert (log.size, state.inbox_count()) == (size, 1)
        state.commit_duplicate(audit=[AuditRecord(AuditKind.REPLAY_DROPPED, {"id": b"r1"}, BOB)])
        assert log.size == size + 1
    clock.advance(60)
    with _open(home, clock) as log:
        state = _state(log, clock)
        with pytest.raises(DuplicateMessage):
            state.replay_window.check(b"r1", time_ms(clock) - 60_000, time_ms(clock))
        with pytest.raises(DuplicateMessage):
            _receive_again(state, clock, b"r1", time_ms(clock) - 60_000, b"again")
        assert state.inbox_count() == 1


def test_replay_rows_are_pruned_and_the_floor_survives_a_clock_step(
    home: Path, clock: FakeClock
) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock, replay_window_ms=60_000)
        start = time_ms(clock)
        for i in range(5):
            _receive(state, clock, b"old%d" % i)
        clock.advance(120)
        _receive(state, clock, b"new")
    keys = _replay_keys(home)
    assert sorted(keys) == [b"t" + time_ms(clock).to_bytes(8, "big") + b"new"]
    clock.set_time(clock.time() - 90)  # back to 30 s after the old ones
    with _open(home, clock) as log:
        state = _state(log, clock, replay_window_ms=60_000)
        with pytest.raises(StaleMessage):
            _receive_again(state, clock, b"old0", start)
        assert state.inbox_count() == 6


def test_message_commits_leave_the_agent_database_alone(
    log: AuditLog, state: AgentState, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layout 2: the counters live beside their rows and the replay floor trails, so
    a queued or received message writes no row of ``agent`` (one page less a commit)."""
    _enqueue(state, ALICE, b"m0")
    _receive(state, clock, b"r0")  # the first receive stores the floor
    agent = log.database("agent")
    written = record_written(log.environment, monkeypatch)
    for n in range(1, 4):
        clock.advance(0.1)
        _enqueue(state, ALICE, b"m%d" % n)
        _receive(state, clock, b"r%d" % n)
        assert state.remove(b"m%d" % n, audit=_sent(b"m%d" % n, ALICE))
    assert log.database("outbox") in written
    assert log.database("inbox") in written
    assert agent not in written
    clock.advance(FLOOR_STEP_MS / 1000)
    _receive(state, clock, b"r9")
    assert agent in written  # the floor moved a step: stored


def test_sequence_numbers_never_repeat_after_emptying_and_reopening(
    home: Path, clock: FakeClock
) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        for n in range(3):
            _enqueue(state, ALICE, b"m%d" % n)
            assert _receive(state, clock, b"r%d" % n) == n
        for n in range(3):
            assert state.remove(b"m%d" % n)
        assert len(state.take(10)) == 3
        assert (state.outbox_count(), state.inbox_count()) == (0, 0)
    with _open(home, clock) as log:
        state = _state(log, clock)
        assert (state.outbox_count(), state.inbox_count()) == (0, 0)
        assert state.enqueue(ALICE, b"m9", b"x", capability=None, queue_limit=10).seq == 3
        assert _receive(state, clock, b"r9") == 3
        assert [m.message_id for m in state.take(10)] == [b"r9"]


def test_a_layout_1_state_keeps_its_counters_and_moves_to_layout_2(
    home: Path, clock: FakeClock
) -> None:
    """Written before layout 2: counters in ``agent``, none beside the rows."""
    with _open(home, clock) as log:
        state = _state(log, clock)
        _enqueue(state, ALICE, b"m0")
        _receive(state, clock, b"r0")
    env = _raw_env(home)
    with env.begin(write=True) as txn:
        agent = env.open_db(b"x:agent", txn=txn)
        txn.put(b"format", (1).to_bytes(8, "big"), db=agent)
        txn.put(b"outbox_next", (50).to_bytes(8, "big"), db=agent)
        txn.put(b"inbox_next", (70).to_bytes(8, "big"), db=agent)
        assert txn.delete(OUTBOX_NEXT, db=env.open_db(b"x:outbox_index", txn=txn))
        assert txn.delete(INBOX_NEXT, db=env.open_db(b"x:inbox", txn=txn))
    env.close()
    with _open(home, clock) as log:
        state = _state(log, clock)
        assert state.inbox_count() == 1
        assert state.enqueue(ALICE, b"m1", b"x", capability=None, queue_limit=10).seq == 50
        assert _receive(state, clock, b"r1") == 70
        assert state.enqueue(ALICE, b"m2", b"x", capability=None, queue_limit=10).seq == 51
        assert _receive(state, clock, b"r2") == 71
        assert [m.message_id for m in state.take(10)] == [b"r0", b"r1", b"r2"]
    env = _raw_env(home)
    with env.begin() as txn:
        assert txn.get(b"format", db=env.open_db(b"x:agent", txn=txn)) == (2).to_bytes(8, "big")
    env.close()


def test_a_newer_layout_is_refused(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        _enqueue(_state(log, clock), ALICE, b"m0")
    _rewrite(home, "agent", b"format", (3).to_bytes(8, "big"))
    with _open(home, clock) as log, pytest.raises(UnsupportedVersion, match="format 3"):
        _state(log, clock)


def test_a_trailing_replay_floor_never_lets_an_id_back_in(home: Path, clock: FakeClock) -> None:
    """Rows go only below the stored floor: an id the running window forgot, but the
    stored floor still covers, is refused after a restart with the clock stepped back."""
    with _open(home, clock) as log:
        state = _state(log, clock, replay_window_ms=60_000)
        start = time_ms(clock)
        _receive(state, clock, b"a")
        clock.advance(59.8)
        _receive(state, clock, b"c")  # stores the floor: start - 200 ms
        clock.advance(0.6)
        _receive(state, clock, b"b")  # the window's floor passes "a"; less than a step
        with pytest.raises(StaleMessage):
            state.replay_window.check(b"a", start, time_ms(clock))
    env = _raw_env(home)
    with env.begin() as txn:
        replay = env.open_db(b"x:replay", txn=txn)
        kept = b"t" + start.to_bytes(8, "big") + b"a"
        assert txn.get(kept, db=replay) is not None  # kept: above the stored floor
    env.close()
    clock.set_time(clock.time() - 30)
    with _open(home, clock) as log:
        state = _state(log, clock, replay_window_ms=60_000)
        with pytest.raises((DuplicateMessage, StaleMessage)):
            _receive_again(state, clock, b"a", start)


def test_an_id_accepted_again_after_the_window_forgot_it_reloads(
    home: Path, clock: FakeClock
) -> None:
    """Two time rows for one id (the older above the trailing stored floor): the
    state opens, and the later acceptance is the one remembered."""
    with _open(home, clock) as log:
        state = _state(log, clock, replay_window_ms=60_000)
        _receive(state, clock, b"x")
        clock.advance(59.8)
        _receive(state, clock, b"c")  # stores the floor just below "x"
        clock.advance(0.6)
        _receive(state, clock, b"d")  # the window's floor passes "x", which it forgets
        again = time_ms(clock)
        _receive(state, clock, b"x")  # a new message, for the window
    with _open(home, clock) as log:
        state = _state(log, clock, replay_window_ms=60_000)
        with pytest.raises(DuplicateMessage):
            state.replay_window.check(b"x", again, time_ms(clock))
        with pytest.raises(DuplicateMessage):
            _receive_again(state, clock, b"x", again)


def test_layout_1_replay_rows_load_and_expire(home: Path, clock: FakeClock) -> None:
    """Per-id rows written before layout 2 are read past and deleted with their ids."""
    with _open(home, clock) as log:
        state = _state(log, clock, replay_window_ms=60_000)
        start = time_ms(clock)
        _receive(state, clock, b"old")
    env = _raw_env(home)
    with env.begin(write=True) as txn:
        txn.put(b"iold", start.to_bytes(8, "big"), db=env.open_db(b"x:replay", txn=txn))
    env.close()
    with _open(home, clock) as log:
        state = _state(log, clock, replay_window_ms=60_000)
        with pytest.raises(DuplicateMessage):
            state.replay_window.check(b"old", start, time_ms(clock))
        clock.advance(120)
        _receive(state, clock, b"new")
    keys = _replay_keys(home)
    assert keys == [b"t" + time_ms(clock).to_bytes(8, "big") + b"new"]


def test_initial_message_commits_the_prekey_store(state: AgentState, clock: FakeClock) -> None:
    state.put_prekeys(b"before")
    state.commit_receive(
        BOB,
        session=b"s",
        replay_id=b"r1",
        timestamp_ms=time_ms(clock),
        message=_message(clock, b"r1", b"hello"),
        prekeys=b"after: one-time prekey used",
    )
    assert state.prekeys() == b"after: one-time prekey used"


# -- the inbox -------------------------------------------------------------------------


def test_take_is_durable(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        for i in range(5):
            assert _receive(state, clock, b"r%d" % i, b"d%d" % i) == i
        taken = state.take(2, audit=[AuditRecord("INBOX_TAKEN", {"n": 2}, None)])
        assert [m.data for m in taken] == [b"d0", b"d1"]
    with _open(home, clock) as log:
        state = _state(log, clock)
        assert [seq for seq, _ in state.inbox()] == [2, 3, 4]
        assert [seq for seq, _ in state.inbox(after=2, limit=1)] == [3]
        assert state.acknowledge(3)
        assert not state.acknowledge(3)
        assert [m.data for m in state.take(10)] == [b"d2", b"d4"]
        assert _receive(state, clock, b"r5") == 5  # sequence numbers never repeat
    with _open(home, clock) as log:
        assert [seq for seq, _ in _state(log, clock).inbox()] == [5]


# -- the peer cache --------------------------------------------------------------------


def test_peer_record_cache_keeps_the_newest(state: AgentState, clock: FakeClock) -> None:
    assert state.put_peer_record(_peer_record(clock, 2))
    assert not state.put_peer_record(_peer_record(clock, 1))
    assert not state.put_peer_record(_peer_record(clock, 2))
    assert state.put_peer_record(_peer_record(clock, 3))
    assert state.peer_record(BOB) == _peer_record(clock, 3)
    with pytest.raises(MalformedFrame):
        state.put_peer_record(b"not a record")


def test_a_first_contact_rides_with_the_next_commit(
    home: Path, state: AgentState, log: AuditLog, clock: FakeClock
) -> None:
    """put_contact writes nothing by itself: reads answer it, and the next commit (here
    the session's) carries it; the record only if newer than the cached one."""
    before = log.environment.last_transaction()
    state.put_contact(BOB, b"bob log", _peer_record(clock, 2))
    assert log.environment.last_transaction() == before
    assert state.keylog(BOB) == b"bob log"
    assert state.peer_record(BOB) == _peer_record(clock, 2)
    assert not state.remove(b"not queued")  # a commit that changes nothing carries nothing
    assert log.environment.last_transaction() == before
    state.put_session(BOB, b"session")
    assert log.environment.last_transaction() == before + 1
    reopened = _state(log, clock)  # reads the disk alone: nothing waits in it
    assert (reopened.keylog(BOB), reopened.peer_record(BOB)) == (b"bob log", _peer_record(clock, 2))
    state.put_contact(BOB, b"bob log 2", _peer_record(clock, 1))
    assert (state.keylog(BOB), state.peer_record(BOB)) == (b"bob log 2", _peer_record(clock, 2))
    state.put_contact(BOB, b"bob log 3", None)
    assert (state.keylog(BOB), state.peer_record(BOB)) == (b"bob log 3", _peer_record(clock, 2))
    with pytest.raises(MalformedFrame):
        state.put_contact(BOB, b"bob log 4", b"not a record")
    assert state.keylog(BOB) == b"bob log 3"  # nothing waits for it
    state.flush()
    assert log.environment.last_transaction() == before + 2
    reopened = _state(log, clock)
    assert (reopened.keylog(BOB), reopened.peer_record(BOB)) == (
        b"bob log 3",
        _peer_record(clock, 2),
    )
    state.flush()  # nothing waits: no commit
    assert log.environment.last_transaction() == before + 2


def test_a_confirmed_session_rides_with_the_next_commit(
    home: Path, state: AgentState, log: AuditLog, clock: FakeClock
) -> None:
    """confirm_session writes nothing by itself; session() answers it; the next commit
    writes it before its own rows, so a newer session or a reset still wins."""
    state.put_session(BOB, b"awaiting")
    before = log.environment.last_transaction()
    state.confirm_session(BOB, b"confirmed")
    assert log.environment.last_transaction() == before
    assert state.session(BOB) == b"confirmed"
    assert _state(log, clock).session(BOB) == b"awaiting"  # on disk: not yet
    _enqueue(state, ALICE, b"m0")
    assert _state(log, clock).session(BOB) == b"confirmed"
    state.confirm_session(BOB, b"confirmed again")
    state.put_session(BOB, b"newer")  # one commit: the deferred row, then this one
    assert log.environment.last_transaction() == before + 2
    assert _state(log, clock).session(BOB) == b"newer"
    state.confirm_session(BOB, b"confirmed, then reset")
    assert state.drop_session(BOB)
    assert state.session(BOB) is None
    assert _state(log, clock).session(BOB) is None


def test_first_contacts_waiting_are_bounded(state: AgentState, log: AuditLog) -> None:
    before = log.environment.last_transaction()
    peers = [agent_id_from_digest(bytes([n]) * 32) for n in range(MAX_DEFERRED + 1)]
    for peer in peers[:-1]:
        state.put_contact(peer, b"log " + peer.encode(), None)
    assert log.environment.last_transaction() == before
    state.put_contact(peers[-1], b"last", None)
    assert log.environment.last_transaction() == before + 1
    reopened = _state(log, FakeClock())
    assert reopened.keylog(peers[0]) == b"log " + peers[0].encode()
    assert reopened.keylog(peers[-1]) == b"last"


def test_what_waits_is_written_by_flush_and_lost_only_without_it(
    home: Path, clock: FakeClock
) -> None:
    """A first contact not yet written is lost to a crash (here: no flush) and fetched
    again; flush() writes it (the client calls it before its log closes)."""
    with _open(home, clock) as log:
        _state(log, clock).put_contact(BOB, b"bob log", None)
    with _open(home, clock) as log:
        assert _state(log, clock).keylog(BOB) is None  # no flush: a crash's outcome
        state = _state(log, clock)
        state.put_contact(BOB, b"bob log", None)
        state.flush()
    with _open(home, clock) as log:
        assert _state(log, clock).keylog(BOB) == b"bob log"


# -- corruption ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("db", "key", "value", "read"),
    [
        ("outbox", (0).to_bytes(8, "big"), None, lambda s: s.pending()),
        ("outbox", (0).to_bytes(8, "big"), b"\xa0", lambda s: s.pending(BOB)),
        ("inbox", (0).to_bytes(8, "big"), None, lambda s: s.inbox()),
        ("inbox", (0).to_bytes(8, "big"), b"garbage", lambda s: s.take()),
        ("sessions", BOB.encode(), None, lambda s: s.session(BOB)),
        ("agent", b"prekeys", None, lambda s: s.prekeys()),
        ("peers", b"r" + BOB.encode(), b"\x00", lambda s: s.peer_record(BOB)),
    ],
)
def test_corrupt_row_raises_store_corrupted(
    home: Path, clock: FakeClock, db: str, key: bytes, value: bytes | None, read: Any
) -> None:
    with _open(home, clock) as log:
        state = _state(log, clock)
        _enqueue(state, BOB, b"m1", b"payload")
        _receive(state, clock, b"r1")
        state.put_prekeys(b"prekeys")
        state.put_peer_record(_peer_record(clock, 1))
    _rewrite(home, db, key, value)
    with _open(home, clock) as log:
        state = _state(log, clock)
        with pytest.raises(StoreCorrupted, match=f"'{db}'") as caught:
            read(state)
        assert db in caught.value.where
        assert state.outbox_count() + state.inbox_count() >= 1  # nothing was removed


def test_corrupt_replay_index_is_reported_on_open(home: Path, clock: FakeClock) -> None:
    with _open(home, clock) as log:
        _receive(_state(log, clock), clock, b"r1")
    env = _raw_env(home)
    with env.begin(write=True) as txn:
        txn.put(b"t\x00", b"", db=env.open_db(b"x:replay", txn=txn))
    env.close()
    with _open(home, clock) as log, pytest.raises(StoreCorrupted, match="replay"):
        _state(log, clock)


# -- crash safety: kill -9 in the middle of a stream of commits ---------------------------

_CHILD = """
import sys
from pathlib import Path

from talos.audit import AuditLog, AuditRecord
from talos.core.clock import time_ms
from talos.storage.agent_state import AgentState, InboxMessage
from talos.testing import FakeClock, SeededRng

peer = sys.argv[2]
clock = FakeClock()
log = AuditLog.open(Path(sys.argv[1]), clock=clock, extra_databases=AgentState.DATABASES)
start = log.size
clock.set_time(1_700_000_000 + start)
state = AgentState(log, storage_key=bytes(range(32)), clock=clock, rng=SeededRng(start))
i = start
while sys.stdin.readline():
    mid = i.to_bytes(16, "big")
    payload = b"payload %d" % i
    if i % 2 == 0:
        record = AuditRecord("MESSAGE_SENT", {"id": mid}, peer)
        state.enqueue(peer, mid, payload, capability=None, queue_limit=10**6, audit=[record])
    else:
        now = time_ms(clock)
        state.commit_receive(
            peer,
            session=b"session %d" % i,
            replay_id=mid,
            timestamp_ms=now,
            message=InboxMessage(peer, mid, payload, now, now),
            audit=[AuditRecord("MESSAGE_RECEIVED", {"id": mid}, peer)],
        )
    print(i, flush=True)
    clock.advance(1)
    i += 1
"""


def _run_until_killed(home: Path, script: Path, commits: int, delay: float) -> int:
    """Let the child report ``commits`` commits, start one more, SIGKILL it; return the count."""
    child = subprocess.Popen(
        [sys.executable, str(script), str(home), BOB],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    reported = 0
    try:
        for _ in range(commits):
            child.stdin.write(b"go\n")
            child.stdin.flush()
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else b""
            reported += 1
        child.stdin.write(b"go\n")
        child.stdin.flush()
        if delay:
            time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    return reported


def _check_state(home: Path, committed: int) -> None:
    clock = FakeClock(1_700_000_000 + committed)
    with _open(home, clock) as log:
        state = _state(log, clock)
        assert log.verify_chain().ok
        assert log.size == committed  # one audit entry per commit: none partial
        sends = [i for i in range(committed) if i % 2 == 0]
        receives = [i for i in range(committed) if i % 2 == 1]
        pending = state.pending(BOB)
        assert [int.from_bytes(item.message_id, "big") for item in pending] == sends
        assert all(
            item.payload == b"payload %d" % int.from_bytes(item.message_id, "big")
            for item in pending
        )
        inbox = state.inbox(limit=10_000)
        assert [int.from_bytes(m.message_id, "big") for _, m in inbox] == receives
        assert all(m.data == b"payload %d" % int.from_bytes(m.message_id, "big") for _, m in inbox)
        assert all(i.to_bytes(16, "big") in state.replay_window for i in receives)
        if receives:
            assert state.session(BOB) == b"session %d" % receives[-1]
        kinds = [entry.kind for entry in log.entries()]
        assert kinds == [("MESSAGE_SENT", "MESSAGE_RECEIVED")[i % 2] for i in range(committed)]


def test_kill_9_mid_stream_keeps_whole_commits_only(tmp_path: Path) -> None:
    home = tmp_path / "audit"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    committed = 0
    for delay in (0.0, 0.0001, 0.0002, 0.0003, 0.0004, 0.0006, 0.0008, 0.002):
        reported = committed + _run_until_killed(home, script, 7, delay)
        clock = FakeClock()
        with _open(home, clock) as log:
            committed = log.size
        assert committed in (reported, reported + 1)
        _check_state(home, committed)


# -- group commits ------------------------------------------------------------------


def test_enqueue_many_commits_the_acceptable_ones_together(
    log: AuditLog, state: AgentState
) -> None:
    """One transaction for the batch; the request past the limit and the repeated
    id get their own errors and leave nothing behind."""
    _enqueue(state, BOB, b"m0")
    size = log.size
    requests = [
        Enqueue(BOB, b"m1", b"one", None, _sent(b"m1")),
        Enqueue(BOB, b"m0", b"again", None, _sent(b"m0")),  # queued already
        Enqueue(ALICE, b"m2", b"two", b"cap", _sent(b"m2", ALICE)),
        Enqueue(BOB, b"m3", b"three", None, _sent(b"m3")),  # past the limit of 3
    ]
    results = state.enqueue_many(requests, queue_limit=3)
    assert [type(r).__name__ for r in results] == [
        "OutboxItem",
        "LocalProtocolError",
        "OutboxItem",
        "QueueFull",
    ]
    assert [i.message_id for i in state.pending()] == [b"m0", b"m1", b"m2"]
    assert state.pending(ALICE)[0].capability == b"cap"
    assert log.size == size + 2  # the audit entries of the two committed ones only
    assert [e.data["id"] for e in log.entries(size)] == [b"m1", b"m2"]


def test_remove_many_skips_what_is_not_queued(log: AuditLog, state: AgentState) -> None:
    for mid in (b"a", b"b", b"c"):
        _enqueue(state, BOB, mid)
    size = log.size
    removed = state.remove_many([(b"a", _sent(b"a")), (b"x", _sent(b"x")), (b"c", _sent(b"c"))])
    assert removed == [True, False, True]
    assert [i.message_id for i in state.pending()] == [b"b"]
    assert log.size == size + 2
    assert state.remove_many([(b"a", _sent(b"a"))]) == [False]
    assert log.size == size + 2


def test_record_attempts_counts_a_window_and_stores_the_session(state: AgentState) -> None:
    for mid in (b"a", b"b"):
        _enqueue(state, BOB, mid)
    counted = state.record_attempts(BOB, [b"a", b"b", b"gone"], 12.5, session=b"after two")
    assert counted == [b"a", b"b"]
    assert [(i.attempts, i.last_attempt_ms) for i in state.pending()] == [(1, 12500)] * 2
    assert state.session(BOB) == b"after two"


def test_commit_receive_many_is_all_or_nothing(
    log: AuditLog, state: AgentState, clock: FakeClock
) -> None:
    now = time_ms(clock)

    def received(mid: bytes, session: bytes) -> Received:
        return Received(
            BOB, session, mid, now, _message(clock, mid, b"data " + mid), audit=_received(mid)
        )

    seqs = state.commit_receive_many([received(b"r1", b"s1"), received(b"r2", b"s2")])
    assert seqs == [0, 1]
    assert state.session(BOB) == b"s2"  # the last one given for the peer
    assert [m.data for _, m in state.inbox()] == [b"data r1", b"data r2"]
    size = log.size
    with pytest.raises(DuplicateMessage):
        state.commit_receive_many([received(b"r3", b"s3"), received(b"r3", b"s4")])
    with pytest.raises(DuplicateMessage):
        state.commit_receive_many([received(b"r4", b"s4"), received(b"r1", b"s5")])
    assert log.size == size
    assert state.session(BOB) == b"s2"
    assert b"r3" not in state.replay_window
    assert b"r4" not in state.replay_window


def test_acknowledge_removes_several_in_one_commit(
    log: AuditLog, state: AgentState, clock: FakeClock
) -> None:
    for mid in (b"r1", b"r2", b"r3"):
        _receive(state, clock, mid)
    size = log.size
    assert state.acknowledge(0, 2, 7, audit=_received(b"ack"))
    assert [seq for seq, _ in state.inbox()] == [1]
    assert log.size == size + 1
    assert not state.acknowledge(0, 2)


def test_is_queued_for_names_the_peer(state: AgentState) -> None:
    _enqueue(state, BOB, b"m1")
    assert state.is_queued_for(b"m1", BOB)
    assert not state.is_queued_for(b"m1", ALICE)
    assert not state.is_queued_for(b"m2", BOB)
    state.remove(b"m1")
    assert not state.is_queued_for(b"m1", BOB)


def test_commit_receive_many_can_take_the_first_messages(
    log: AuditLog, state: AgentState, clock: FakeClock
) -> None:
    now = time_ms(clock)
    batch = [
        Received(BOB, b"s" + mid, mid, now, _message(clock, mid, mid), audit=_received(mid))
        for mid in (b"r1", b"r2", b"r3")
    ]
    size = log.size
    assert state.commit_receive_many(batch, taken=2) == [0]
    assert [m.data for _, m in state.inbox()] == [b"r3"]  # the first two were handed over
    assert log.size == size + 3  # every receipt is audited
    assert all(mid in state.replay_window for mid in (b"r1", b"r2", b"r3"))
    assert state.session(BOB) == b"sr3"
    for taken in (-1, 4, True):
        with pytest.raises(LocalProtocolError):
            state.commit_receive_many(batch, taken=taken)


def test_enqueue_many_can_count_the_first_attempt_and_store_the_session(
    log: AuditLog, state: AgentState, clock: FakeClock
) -> None:
    size = log.size
    items = state.enqueue_many(
        [Enqueue(BOB, b"m1", b"x", None, _sent(b"m1")), Enqueue(ALICE, b"m2", b"y", None)],
        queue_limit=10,
        attempted={BOB: b"session after m1"},
        attempt_at=clock.time(),
    )
    assert [(i.message_id, i.attempts) for i in items] == [(b"m1", 1), (b"m2", 0)]  # type: ignore[union-attr]
    assert items[0].last_attempt_ms == time_ms(clock)  # type: ignore[union-attr]
    assert state.session(BOB) == b"session after m1"
    assert state.session(ALICE) is None
    assert log.size == size + 1
    assert [(i.message_id, i.attempts) for i in state.pending(BOB)] == [(b"m1", 1)]
    with pytest.raises(LocalProtocolError):
        state.enqueue_many([Enqueue(BOB, b"m3", b"x", None)], queue_limit=10, attempted={BOB: b"s"})


def test_pending_reads_one_peers_queue_after_a_sequence_number(state: AgentState) -> None:
    for n in range(6):
        _enqueue(state, BOB if n % 2 == 0 else ALICE, b"m%d" % n)
    bob = state.pending(BOB)
    assert [i.message_id for i in bob] == [b"m0", b"m2", b"m4"]
    assert [i.message_id for i in state.pending(BOB, after=bob[0].seq)] == [b"m2", b"m4"]
    assert [i.message_id for i in state.pending(BOB, after=bob[0].seq, limit=1)] == [b"m2"]
    assert state.pending(BOB, after=bob[-1].seq) == []
    assert state.pending(BOB, limit=0) == []
    with pytest.raises(LocalProtocolError):
        state.pending(None, limit=1)


def test_queued_for_answers_for_several_ids_at_once(state: AgentState) -> None:
    _enqueue(state, BOB, b"m1")
    _enqueue(state, BOB, b"m2")
    _enqueue(state, ALICE, b"m3")
    assert state.queued_for(BOB, [b"m1", b"m2", b"m3", b"m4"]) == {b"m1", b"m2"}
    assert state.queued_for(ALICE, [b"m1", b"m3"]) == {b"m3"}
    assert state.queued_for(BOB, []) == set()
