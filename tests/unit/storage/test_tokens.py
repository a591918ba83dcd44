"""The token store on a real LMDB environment."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from talos.errors import StoreCorrupted, UnsupportedVersion
from talos.storage.tokens import TokenStore


def test_tokens_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "caps"
    with TokenStore.open(path) as store:
        store.add_granted(b"\x02" * 16, b"granted-2")
        store.add_granted(b"\x01" * 16, b"granted-1")
        store.add_held(b"\x03" * 16, b"held-3")
    with TokenStore.open(path) as store:
        assert list(store.granted()) == [b"granted-1", b"granted-2"]
        assert list(store.held()) == [b"held-3"]
        assert store.find(b"\x03" * 16) == b"held-3"
        assert store.find(b"\x01" * 16) == b"granted-1"
        assert store.find(b"\x09" * 16) is None


def test_revocation_lists_keep_sync_time(tmp_path: Path) -> None:
    with TokenStore.open(tmp_path / "caps") as store:
        store.put_revocation_list("did:talos:zA", b"v1", synced_at=100.5)
        store.put_revocation_list("did:talos:zA", b"v2", synced_at=200.25)
        store.put_revocation_list("did:talos:zB", b"b1", synced_at=50.0)
    with TokenStore.open(tmp_path / "caps") as store:
        assert list(store.revocation_lists()) == [
            ("did:talos:zA", b"v2", 200.25),
            ("did:talos:zB", b"b1", 50.0),
        ]


def test_damaged_revocation_record_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "caps"
    with TokenStore.open(path) as store:
        store.put_revocation_list("did:talos:zA", b"v1", synced_at=1.0)
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"revocations")) as txn:
        txn.put(b"did:talos:zA", b"\xff\x00garbage")
    env.close()
    with TokenStore.open(path) as store, pytest.raises(StoreCorrupted, match="damaged"):
        list(store.revocation_lists())


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "caps"
    TokenStore.open(path).close()
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"version", b"2")
    env.close()
    with pytest.raises(UnsupportedVersion):
        TokenStore.open(path)


def test_not_an_lmdb_directory(tmp_path: Path) -> None:
    path = tmp_path / "caps"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"this is not lmdb" * 512)
    with pytest.raises(StoreCorrupted):
        TokenStore.open(path)


def test_one_revocation_list_by_issuer(tmp_path: Path) -> None:
    with TokenStore.open(tmp_path / "caps") as store:
        assert store.revocation_list("did:talos:zA") is None
        store.put_revocation_list("did:talos:zA", b"v1", synced_at=7.5)
        assert store.revocation_list("did:talos:zA") == (b"v1", 7.5)


def test_every_write_bumps_the_generation_and_tells_watchers_after_commit(tmp_path: Path) -> None:
    path = tmp_path / "caps"
    seen: list[tuple[int, int]] = []
    with TokenStore.open(path) as store:
        assert store.generation() == 0
        # The watcher reads the store: the write it is told about is committed.
        store.watch(lambda generation: seen.append((generation, store.generation())))
        store.add_granted(b"\x01" * 16, b"g")
        store.add_held(b"\x02" * 16, b"h")
        store.put_revocation_list("did:talos:zA", b"v1", synced_at=1.0)
        store.put_reason(b"\x01" * 16, "why")
        store.put_keylog("did:talos:zA", b"log")
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
    with TokenStore.open(path) as store:
        assert store.generation() == 5


def test_a_store_written_before_the_generation_counter_starts_at_one(tmp_path: Path) -> None:
    path = tmp_path / "caps"
    with TokenStore.open(path) as store:
        store.add_granted(b"\x01" * 16, b"g")
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.delete(b"generation", db=env.open_db(b"meta", txn=txn))
    env.close()
    with TokenStore.open(path) as store:
        assert store.generation() == 1
    with TokenStore.open(tmp_path / "empty") as store:
        assert store.generation() == 0
