"""talos.audit.head_check: the O(log n) start-up check on real LMDB files."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.head_check import RESTORE_HINT, check_head, refuse_damaged_head
from talos.audit.store import AuditStore, node_key
from talos.core.audit.merkle import NodeID
from talos.core.crypto import SigningKey
from talos.errors import StoreCorrupted
from talos.storage.lmdb import u64
from talos.testing import FakeClock, SeededRng
from talos.testing.damage import flip_stored_bit, put_stored

KEY = SigningKey.generate(SeededRng(13))
OTHER = SigningKey.generate(SeededRng(14))


def _build(path: Path, size: int, *, block_entries: int = 4) -> None:
    signer = LogSigner(KEY, name="tester")
    with AuditLog.open(path, clock=FakeClock(), signer=signer, block_entries=block_entries) as log:
        log.append_many([("TEST", {"i": i}, None) for i in range(size)])


def _problems(path: Path, keys: list[object] | None = None) -> tuple[str | None, str | None]:
    """(check_head's problem, verify_chain's problem) as text."""
    trusted = None if keys is None else [KEY.public_key]
    with AuditLog.open(path, readonly=True) as log:
        quick = check_head(AuditStore(log.environment), trusted)
        full = log.verify_chain(trusted_keys=trusted).problem
    return (None if quick is None else str(quick), None if full is None else str(full))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 7, 8, 9, 16, 33])
def test_an_intact_log_passes(tmp_path: Path, size: int) -> None:
    _build(tmp_path / "log", size)
    assert _problems(tmp_path / "log", [KEY]) == (None, None)


@pytest.mark.parametrize(
    ("db", "offset"),
    [(b"entries", 40), (b"entries", -1), (b"entries", 3)],
    ids=["entry-bytes", "entry-end", "stored-leaf-hash"],
)
@pytest.mark.parametrize("size", [1, 8, 15, 33])
def test_damage_to_the_last_entry_is_what_the_full_scan_says(
    tmp_path: Path, size: int, db: bytes, offset: int
) -> None:
    path = tmp_path / "log"
    _build(path, size)
    flip_stored_bit(path, db, u64(size - 1), offset)
    quick, full = _problems(path, [KEY])
    assert quick is not None
    assert quick == full
    assert f"seq {size - 1}" in quick


def test_a_node_on_the_path_from_the_last_leaf_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _build(path, 16)  # the last leaf (15) climbs to the root node (level 4, index 0)
    flip_stored_bit(path, b"nodes", node_key(NodeID(2, 3)), 0)
    quick, full = _problems(path)
    assert (
        quick
        == full
        == "node, seq 15, node level 2 index 3 [12, 16): "
        + ("stored node does not match the entries")
    )


def test_an_entry_beyond_the_head_is_found(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _build(path, 9)
    with AuditLog.open(path, readonly=True) as log:
        with log.snapshot() as txn:
            row = bytes(txn.get(u64(8), db=log.environment.audit.entries) or b"")
    put_stored(path, b"entries", u64(9), row)
    quick, full = _problems(path)
    assert quick == "meta: metadata says 9 entries, found more"
    assert full is not None


def test_a_stored_root_that_does_not_fold_is_found(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _build(path, 9)
    flip_stored_bit(path, b"meta", b"root", 0)
    assert _problems(path) == ("meta: stored root does not match the entries",) * 2


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(-1, "block, height 1: signature"), (0, "block, height 1: block does not decode")],
)
def test_damage_to_the_last_block_is_found(tmp_path: Path, offset: int, expected: str) -> None:
    path = tmp_path / "log"
    _build(path, 9)  # blocks at 4 and 8: heights 0 and 1
    flip_stored_bit(path, b"blocks", u64(1), offset)
    quick, full = _problems(path)
    assert str(quick).startswith(expected)
    assert str(full).startswith(expected)


def test_the_last_block_hash_must_match_the_metadata(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _build(path, 9)
    flip_stored_bit(path, b"meta", b"block_hash", 0)
    assert _problems(path) == ("meta: last block hash does not match",) * 2


def test_a_block_signed_by_another_key_is_refused_when_keys_are_trusted(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _build(path, 8)
    with AuditLog.open(path, readonly=True) as log:
        store = AuditStore(log.environment)
        assert check_head(store, [OTHER.public_key]) is not None
        assert check_head(store, [KEY.public_key]) is None


def test_damage_deep_inside_is_left_to_the_full_scan(tmp_path: Path) -> None:
    # What start-up does not read it cannot see: the cost stays O(log n).
    path = tmp_path / "log"
    _build(path, 33)
    flip_stored_bit(path, b"entries", u64(5), 40)
    quick, full = _problems(path)
    assert quick is None
    assert full == "entry, seq 5: entry bytes do not match the stored leaf hash"


def test_refusal_names_the_data_file_with_the_restore_hint(tmp_path: Path) -> None:
    path = tmp_path / "log"
    _build(path, 8)
    flip_stored_bit(path, b"entries", u64(7), 40)
    with AuditLog.open(path, readonly=True) as log:
        with pytest.raises(StoreCorrupted) as caught:
            refuse_damaged_head(log.environment, [KEY.public_key])
    error = caught.value
    assert str(path / "data.mdb") in str(error)
    assert "entry, seq 7: entry bytes do not match the stored leaf hash" in str(error)
    assert error.where == "seq 7"
    assert error.hint == RESTORE_HINT
    assert "talos audit restore --backup DIR" in error.diagnostics()
