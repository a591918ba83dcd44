"""The registry store: check-and-set rules, single-use one-time prekeys, evidence of forks."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from registry_fixtures import Agent, make_agent

from talos.core.peer_record import PeerRecord
from talos.errors import StorageError, StoreCorrupted
from talos.registry.answers import REFUSAL_STATUS
from talos.registry.store import Refused, RegistryStore
from talos.testing import FakeClock

NOW_MS = 1_700_000_000_000


def refused(status: int, kind: str) -> pytest.RaisesExc[Refused]:
    """The store refuses with ``kind``, which the API answers with ``status``."""
    return pytest.raises(
        Refused, check=lambda e: (REFUSAL_STATUS[e.kind], e.kind) == (status, kind)
    )


# -- key logs -------------------------------------------------------------------------


def test_keylog_is_stored_extended_and_idempotent(store: RegistryStore, alice: Agent) -> None:
    assert store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    assert not store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    alice.rotate()
    assert store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    assert store.keylog(alice.agent_id) == alice.identity.keylog.to_bytes()
    assert store.keylog("did:talos:zunknown") is None


def test_keylog_rollback_is_refused_without_event(store: RegistryStore, alice: Agent) -> None:
    old = alice.identity.keylog
    alice.rotate()
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    with refused(409, "KeyLogRollback"):
        store.put_keylog(old, now_ms=NOW_MS)
    assert store.security_events() == []


def test_keylog_fork_is_refused_and_recorded(store: RegistryStore, alice: Agent) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    twin = replace(alice, rng=type(alice.rng)(99))
    alice.rotate()
    twin.rotate()  # the same pre-committed key, a different rotation: a fork
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    with refused(409, "KeyLogInvalid"):
        store.put_keylog(twin.identity.keylog, now_ms=NOW_MS + 1)
    assert store.keylog(alice.agent_id) == alice.identity.keylog.to_bytes()
    [event] = store.security_events(alice.agent_id)
    assert event.kind == "keylog-fork"
    assert "fork at key event sequence 1" in event.reason
    assert event.offered == twin.identity.keylog.to_bytes()
    assert event.known == alice.identity.keylog.to_bytes()
    assert event.at_ms == NOW_MS + 1


# -- prekeys -------------------------------------------------------------------------


def test_prekeys_need_a_known_current_key_and_a_higher_sequence(
    store: RegistryStore, alice: Agent
) -> None:
    upload = alice.upload(3)
    with refused(409, "UnknownAgent"):
        store.put_prekeys(upload, now_ms=NOW_MS)
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    assert store.put_prekeys(upload, now_ms=NOW_MS) == 3
    with refused(409, "StaleSequence"):
        store.put_prekeys(upload, now_ms=NOW_MS)
    alice.rotate()
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    with refused(409, "NotCurrentKey"):
        store.put_prekeys(upload, now_ms=NOW_MS)
    assert store.put_prekeys(alice.upload(), now_ms=NOW_MS) == 3


def test_prekeys_signed_by_someone_else_are_refused(
    store: RegistryStore, alice: Agent, clock: FakeClock
) -> None:
    mallory = make_agent("mallory", 66, clock)
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    forged = replace(alice.upload(1), signature=mallory.upload(1).signature)
    with refused(403, "SignatureInvalid"):
        store.put_prekeys(forged, now_ms=NOW_MS)
    # A correctly signed upload carrying a signed prekey the identity never signed.
    bad_spk = alice.upload(1)
    bad_spk = type(bad_spk).create(
        alice.identity.signing_key,
        agent_id=alice.agent_id,
        key_sequence=0,
        sequence=9,
        signed_prekey_id=bad_spk.signed_prekey_id,
        signed_prekey=bytes(32),
        signed_prekey_signature=bad_spk.signed_prekey_signature,
    )
    with refused(403, "SignatureInvalid"):
        store.put_prekeys(bad_spk, now_ms=NOW_MS)


def test_each_one_time_prekey_is_handed_out_once(store: RegistryStore, alice: Agent) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    upload = alice.upload(3)
    store.put_prekeys(upload, now_ms=NOW_MS)
    bundles = [store.take_bundle(alice.agent_id) for _ in range(5)]
    assert [b.one_time_prekey_id for b in bundles if b] == [0, 1, 2, None, None]
    for bundle in bundles:
        assert bundle is not None
        bundle.verify()
        assert bundle.identity_dh_key == alice.identity.dh_key.public
    # Re-publishing the same keys (the agent has not seen them used) does not revive them.
    assert store.put_prekeys(alice.upload(2), now_ms=NOW_MS) == 2
    assert store.prekey_status(alice.agent_id) == (2, 2)
    assert store.take_bundle("did:talos:zunknown") is None


def test_concurrent_takes_never_share_a_prekey(store: RegistryStore, alice: Agent) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    store.put_prekeys(alice.upload(10), now_ms=NOW_MS)
    taken: list[int | None] = []
    barrier = threading.Barrier(20)

    def take() -> None:
        barrier.wait()
        bundle = store.take_bundle(alice.agent_id)
        assert bundle is not None
        taken.append(bundle.one_time_prekey_id)

    threads = [threading.Thread(target=take) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(i for i in taken if i is not None) == list(range(10))
    assert taken.count(None) == 10


def test_two_store_handles_on_one_database_share_the_pool(
    database: Path | str, alice: Agent
) -> None:
    with RegistryStore.open(database) as one, RegistryStore.open(database) as two:
        one.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
        one.put_prekeys(alice.upload(2), now_ms=NOW_MS)
        ids = [s.take_bundle(alice.agent_id) for s in (one, two, one)]
        assert [b.one_time_prekey_id for b in ids if b] == [0, 1, None]


# -- peer records ----------------------------------------------------------------------


def test_records_per_instance_highest_sequence_live_only(
    store: RegistryStore, alice: Agent, clock: FakeClock
) -> None:
    now = clock.time()
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    first = alice.record(instance=b"\x01" * 16, lifetime=100)
    store.put_record(first, now=now)
    second = alice.record(instance=b"\x02" * 16, lifetime=300)
    store.put_record(second, now=now)
    with refused(409, "StaleSequence"):
        store.put_record(first, now=now)
    with refused(409, "StaleSequence"):
        store.put_record(alice.record(sequence=2, instance=b"\x03" * 16), now=now)
    live = store.instances(alice.agent_id, now_ms=int(now * 1000))
    assert [i.instance_id for i in live] == [b"\x02" * 16, b"\x01" * 16]
    assert store.record(alice.agent_id, now_ms=int(now * 1000)) == second.to_bytes()
    later = int((now + 200) * 1000)
    assert [i.instance_id for i in store.instances(alice.agent_id, now_ms=later)] == [b"\x02" * 16]
    assert store.record(alice.agent_id, now_ms=int((now + 400) * 1000)) is None


def test_record_checks(store: RegistryStore, alice: Agent, clock: FakeClock) -> None:
    now = clock.time()
    record = alice.record(lifetime=10)
    with refused(409, "UnknownAgent"):
        store.put_record(record, now=now)
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    with refused(422, "StaleMessage"):
        store.put_record(record, now=now + 10 + 61)
    with refused(403, "SignatureInvalid"):
        store.put_record(replace(record, endpoint="ws://10.0.0.1:1"), now=now)
    alice.rotate()
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    with refused(409, "NotCurrentKey"):
        store.put_record(record, now=now)
    store.put_record(alice.record(), now=now)


def test_a_refused_record_changes_nothing(
    store: RegistryStore, alice: Agent, clock: FakeClock
) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    bad: PeerRecord = replace(alice.record(sequence=50), endpoint="ws://10.0.0.1:1")
    with refused(403, "SignatureInvalid"):
        store.put_record(bad, now=clock.time())
    store.put_record(alice.record(sequence=2), now=clock.time())


# -- revocation lists ------------------------------------------------------------------


def test_revocations_merge(store: RegistryStore, alice: Agent) -> None:
    v1 = alice.revocations(1)
    with refused(409, "UnknownAgent"):
        store.put_revocations(v1, now_ms=NOW_MS)
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    assert store.put_revocations(v1, now_ms=NOW_MS).value == "adopted"
    assert store.put_revocations(v1, now_ms=NOW_MS).value == "unchanged"
    v2 = alice.revocations(2, ids=(b"\x07" * 16,))
    assert store.put_revocations(v2, now_ms=NOW_MS).value == "adopted"
    with refused(409, "StaleSequence"):
        store.put_revocations(v1, now_ms=NOW_MS)
    assert store.revocations(alice.agent_id) == v2.to_bytes()
    assert store.security_events() == []


def test_revocation_fork_keeps_the_list_revoking_more(store: RegistryStore, alice: Agent) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    small = alice.revocations(2)
    large = alice.revocations(2, ids=(b"\x01" * 16,))
    store.put_revocations(small, now_ms=NOW_MS)
    with refused(409, "RevocationListForked"):
        store.put_revocations(large, now_ms=NOW_MS)
    assert store.revocations(alice.agent_id) == large.to_bytes()
    [event] = store.security_events(alice.agent_id)
    assert event.kind == "revocation-forked"
    assert (event.known, event.offered) == (small.to_bytes(), large.to_bytes())


def test_revocation_list_dropping_revocations_is_refused(
    store: RegistryStore, alice: Agent
) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    v2 = alice.revocations(2, ids=(b"\x01" * 16,))
    store.put_revocations(v2, now_ms=NOW_MS)
    with refused(409, "RevocationListNotAppendOnly"):
        store.put_revocations(alice.revocations(3), now_ms=NOW_MS)
    assert store.revocations(alice.agent_id) == v2.to_bytes()
    assert [e.kind for e in store.security_events()] == ["revocation-not-append-only"]


def test_revocations_signed_by_another_key(
    store: RegistryStore, alice: Agent, clock: FakeClock
) -> None:
    store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    mallory = make_agent("mallory", 66, clock)
    forged = replace(alice.revocations(1), signature=mallory.revocations(1).signature)
    with refused(403, "SignatureInvalid"):
        store.put_revocations(forged, now_ms=NOW_MS)


# -- the file ---------------------------------------------------------------------------


def test_state_survives_reopening(tmp_path: Path, alice: Agent) -> None:
    path = tmp_path / "r.db"
    with RegistryStore.open(path) as first:
        first.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
        first.put_prekeys(alice.upload(1), now_ms=NOW_MS)
        first.take_bundle(alice.agent_id)
    with RegistryStore.open(path) as second:
        assert second.keylog(alice.agent_id) == alice.identity.keylog.to_bytes()
        assert second.prekey_status(alice.agent_id) == (1, 0)
    journal = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


def test_foreign_file_is_reported_as_corrupted(tmp_path: Path) -> None:
    path = tmp_path / "not-a-db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreCorrupted):
        RegistryStore.open(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StorageError, match="schema 99"):
        RegistryStore.open(path)


def test_unopenable_path(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        RegistryStore.open(tmp_path / "missing" / "dir" / "r.db")


def test_damaged_stored_log_is_store_corruption(tmp_path: Path, alice: Agent) -> None:
    path = tmp_path / "r.db"
    with RegistryStore.open(path) as store:
        store.put_keylog(alice.identity.keylog, now_ms=NOW_MS)
    db = sqlite3.connect(path)
    db.execute("UPDATE keylogs SET log = x'00'")
    db.commit()
    db.close()
    with RegistryStore.open(path) as store, pytest.raises(StoreCorrupted):
        store.put_prekeys(alice.upload(1), now_ms=NOW_MS)
