"""talos.storage.lmdb: the one safe open, and how LMDB errors become Talos ones."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import lmdb
import pytest

from talos.errors import AuditFull, StorageError, StoreCorrupted
from talos.storage.lmdb import (
    DATA_FILE,
    LOCK_FILE,
    ReadTransaction,
    lmdb_errors,
    open_environment,
    translate,
)
from talos.storage.tokens import TokenStore


@pytest.mark.parametrize(
    "error",
    [
        lmdb.BadTxnError("mdb_cursor_get: MDB_BAD_TXN: Transaction must abort"),
        lmdb.CursorFullError("mdb_cursor_get: MDB_CURSOR_FULL: cursor stack limit reached"),
        lmdb.CorruptedError("mdb_cursor_get: MDB_CORRUPTED: Located page was wrong type"),
        lmdb.PageNotFoundError("mdb_cursor_get: MDB_PAGE_NOTFOUND: Requested page not found"),
        lmdb.InvalidError("mdb_env_open: MDB_INVALID: File is not an LMDB file"),
        lmdb.BadChecksumError("mdb_page_get: MDB_BAD_CHECKSUM: Page checksum incorrect"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_damage_is_store_corrupted_naming_the_data_file(tmp_path: Path, error: lmdb.Error) -> None:
    found = translate(error, tmp_path / "audit")
    assert isinstance(found, StoreCorrupted)
    assert found.where == str(tmp_path / "audit" / DATA_FILE)
    assert str(tmp_path / "audit" / DATA_FILE) in str(found)


@pytest.mark.parametrize(
    "error",
    [
        lmdb.MapFullError("mdb_put: MDB_MAP_FULL: Environment mapsize limit reached"),
        lmdb.DiskError("mdb_txn_commit: " + os.strerror(errno.ENOSPC)),
        lmdb.Error("mdb_txn_commit: " + os.strerror(errno.EDQUOT)),
        lmdb.Error("mdb_txn_commit", errno.ENOSPC),  # py-lmdb's cffi form keeps the number
    ],
    ids=["map", "ENOSPC", "EDQUOT", "cffi-ENOSPC"],
)
def test_full_is_audit_full_with_its_hint(tmp_path: Path, error: lmdb.Error) -> None:
    found = translate(error, tmp_path, store="capabilities store")
    assert isinstance(found, AuditFull)
    assert "capabilities store" in str(found)
    assert "free disk space" in found.hint


def test_eio_with_room_on_the_disk_stays_an_io_error(tmp_path: Path) -> None:
    """EIO is a full disk only when the file system is (nearly) full; here it is not."""
    found = translate(lmdb.Error("mdb_txn_commit: " + os.strerror(errno.EIO)), tmp_path)
    assert type(found) is StorageError
    assert "Input/output error" in str(found)


def test_a_truncated_capabilities_store_is_named_before_it_is_mapped(tmp_path: Path) -> None:
    path = tmp_path / "caps"
    with TokenStore.open(path) as store:
        for n in range(40):
            store.add_granted(n.to_bytes(16, "big"), bytes([n]) * 2000)
    os.truncate(path / DATA_FILE, 2 * 4096)
    with pytest.raises(StoreCorrupted) as caught:
        TokenStore.open(path)
    assert caught.value.where == str(path / DATA_FILE)
    assert caught.value.what == "truncated"


def test_new_store_files_are_0600_and_old_ones_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "store"
    env = open_environment(path, store="test store", max_dbs=2)
    env.close()
    modes = {name: stat.S_IMODE((path / name).stat().st_mode) for name in (DATA_FILE, LOCK_FILE)}
    assert modes == {DATA_FILE: 0o600, LOCK_FILE: 0o600}
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for name in (DATA_FILE, LOCK_FILE):
        (path / name).chmod(0o644)  # as an older Talos left them
    open_environment(path, store="test store", max_dbs=2).close()
    assert {stat.S_IMODE((path / n).stat().st_mode) for n in (DATA_FILE, LOCK_FILE)} == {0o600}


def test_a_read_transaction_translates_errors_and_always_aborts(tmp_path: Path) -> None:
    env = open_environment(tmp_path / "db", store="capabilities store", max_dbs=2)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"k", b"v")
        read = ReadTransaction(env, str(tmp_path / "db"), store="capabilities store")
        with read as txn:
            assert txn.get(b"k") == b"v"
        with pytest.raises(StoreCorrupted, match="capabilities store"), read as txn:
            raise lmdb.CorruptedError("damaged page")
        with pytest.raises(KeyError), read as txn:  # other errors pass unchanged
            raise KeyError("x")
        with read as txn:  # each use is a new transaction, none left open
            assert txn.get(b"k") == b"v"
        with pytest.raises(StoreCorrupted), lmdb_errors(tmp_path, store="capabilities store"):
            raise lmdb.CorruptedError("damaged page")
    finally:
        env.close()
    with pytest.raises(StorageError):  # opening on a closed environment is translated too
        with ReadTransaction(env, str(tmp_path / "db")):
            pass
