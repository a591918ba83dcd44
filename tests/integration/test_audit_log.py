"""The audit log on real LMDB files: durability, proofs, tampering, truncation, full disks."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest

from talos.audit import (
    AuditEntry,
    AuditFull,
    AuditKind,
    AuditLog,
    Checkpoint,
    LogSigner,
    verify_consistency,
    verify_inclusion,
)
from talos.audit.store import node_key
from talos.core.audit.merkle import NodeID, leaf_hash, root_from_leaves
from talos.core.crypto import SigningKey
from talos.core.encoding import canonical_dumps
from talos.errors import (
    BackupInvalid,
    ConfigurationError,
    LocalProtocolError,
    SignatureInvalid,
    StoreCorrupted,
)
from talos.storage.environment import Environment
from talos.storage.lmdb import MAX_EXTRA_DATABASES, u64
from talos.testing import FakeClock
from talos.testing.damage import flip_stored_bit

KEY = SigningKey(bytes(range(32)))
SIGNER = LogSigner(KEY, "alice.example", "talos/alice/audit")


def _open(path: Path, clock: FakeClock, **options: Any) -> AuditLog:
    options.setdefault("signer", SIGNER)
    return AuditLog.open(path, clock=clock, **options)


def _fill(log: AuditLog, n: int, clock: FakeClock | None = None) -> list[int]:
    seqs = []
    for i in range(n):
        kind = AuditKind.MESSAGE_SENT if i % 3 else AuditKind.SIGNATURE_FAILURE
        peer = f"peer{i % 4}" if i % 2 else None
        seqs.append(log.append(kind, {"hash": bytes([i % 256]) * 32, "n": i}, peer=peer))
        if clock is not None:
            clock.advance(1)
    return seqs


def _leaves(log: AuditLog) -> list[bytes]:
    return [entry.leaf_hash() for entry in log.entries()]


def _stored(log: AuditLog, seq: int) -> bytes:
    """The entry bytes as stored (after the 32-byte leaf hash)."""
    with log.snapshot() as txn:
        value = txn.get(u64(seq), db=log.environment.audit.entries)
    assert value is not None
    return bytes(value[32:])


def _canonical(entry: AuditEntry) -> bytes:
    """The entry in canonical CBOR, by the general encoder (not the log's hand encoding)."""
    fields = {"v": 1, "s": entry.seq, "t": entry.time_ms, "k": entry.kind, "p": entry.peer}
    return canonical_dumps({**fields, "d": dict(entry.data)})


# -- basics --------------------------------------------------------------------------


def test_append_reopen_root_is_stored(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        assert log.size == 0
        assert _fill(log, 50) == list(range(50))
        root = log.root()
        assert root == root_from_leaves(_leaves(log))
    with _open(tmp_path / "log", clock) as log:
        assert log.size == 50
        assert log.root() == root
        assert log.append("KEY_ROTATED", {}) == 50
        assert log.root() == root_from_leaves(_leaves(log))


def test_entry_round_trip_and_time_never_goes_backwards(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        log.append(AuditKind.SESSION_ESTABLISHED, {"session": b"s" * 16}, peer="bob")
        clock.set_time(clock.time() - 3600)
        log.append(AuditKind.SESSION_RESET, {})
        first, second = log.entry(0), log.entry(1)
        assert (first.kind, first.peer, first.data) == (
            "SESSION_ESTABLISHED",
            "bob",
            {"session": b"s" * 16},
        )
        assert second.time_ms == first.time_ms
        with pytest.raises(LocalProtocolError):
            log.entry(2)
        with pytest.raises(LocalProtocolError):
            log.append("not a kind", {})
        with pytest.raises(LocalProtocolError):
            log.append("MESSAGE_SENT", {"plaintext": b"x" * 500})
        assert log.size == 2


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 31, 33])
def test_inclusion_proofs_verify_at_several_sizes(
    tmp_path: Path, clock: FakeClock, size: int
) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 33)
        leaves = _leaves(log)
        root = log.root_at(size)
        assert root == root_from_leaves(leaves[:size])
        for seq in {0, size // 2, size - 1}:
            proof = log.prove_inclusion(seq, size=size)
            assert proof.leaf_hash == leaves[seq]
            verify_inclusion(proof.leaf_hash, seq, size, proof.hashes, root)


def test_consistency_proofs_verify(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 40)
        for old in (0, 1, 5, 8, 17, 32, 40):
            for new in (old, 33, 40):
                if new < old:
                    continue
                proof = log.prove_consistency(old, new)
                verify_consistency(old, new, proof.hashes, log.root_at(old), log.root_at(new))
        with pytest.raises(LocalProtocolError):
            log.prove_consistency(41)
        with pytest.raises(LocalProtocolError):
            log.prove_inclusion(40)


def test_query_by_kind_peer_time_and_last(tmp_path: Path, clock: FakeClock) -> None:
    start = int(clock.time() * 1000)
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 30, clock)
        failures = log.query(kind="SIGNATURE_FAILURE")
        assert [e.seq for e in failures] == list(range(0, 30, 3))
        assert [e.seq for e in log.query(kind="SIGNATURE_FAILURE", last=2)] == [24, 27]
        assert [e.seq for e in log.query(peer="peer1")] == list(range(1, 30, 4))
        assert [e.seq for e in log.query(peer="peer1", kind="MESSAGE_SENT", last=3)] == [17, 25, 29]
        window = log.query(since=start + 10_000, until=start + 15_000)
        assert [e.seq for e in window] == [10, 11, 12, 13, 14]
        assert [e.seq for e in log.query(last=2)] == [28, 29]
        assert log.query(kind="ANCHOR_FAILED") == []
        assert log.query(since=start + 10**9) == []


# -- blocks and checkpoints ------------------------------------------------------------


def test_blocks_every_n_entries(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock, block_entries=10) as log:
        _fill(log, 35)
        assert log.block_count == 3
        blocks = [log.block(h) for h in range(3)]
        assert [(b.first_seq, b.last_seq) for b in blocks] == [(0, 9), (10, 19), (20, 29)]
        assert blocks[1].previous == blocks[0].block_hash()
        assert blocks[2].root == log.root_at(30)
        for block in blocks:
            block.verify_signature(KEY.public_key)


def test_blocks_every_t_seconds(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock, block_seconds=5) as log:
        log.append("MESSAGE_SENT", {})
        clock.advance(4)
        log.append("MESSAGE_SENT", {})
        assert log.block_count == 0
        clock.advance(2)
        log.append("MESSAGE_SENT", {})  # the oldest unsealed entry is 6 s old: seal first
        assert log.block_count == 1
        assert (log.block(0).first_seq, log.block(0).last_seq) == (0, 1)
        clock.advance(10)
        log.flush()
        assert log.block_count == 2
        assert log.block(1).tree_size == 3
        log.flush()
        assert log.block_count == 2
        assert log.seal_block() is None


def test_checkpoint_is_signed_and_tampering_detected(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 12)
        checkpoint = log.checkpoint()
        text = checkpoint.to_text()
        parsed = Checkpoint.verify_text(text, KEY.public_key, SIGNER.name)
        assert (parsed.origin, parsed.size, parsed.root) == (SIGNER.origin, 12, log.root())
        with pytest.raises(SignatureInvalid):
            Checkpoint.verify_text(text.replace("\n12\n", "\n13\n"), KEY.public_key, SIGNER.name)
    with (
        AuditLog.open(tmp_path / "log", clock=clock) as unsigned,
        pytest.raises(ConfigurationError),
    ):
        unsigned.checkpoint()


# -- verification and tampering ------------------------------------------------------


def test_verify_chain_intact(tmp_path: Path, clock: FakeClock) -> None:
    seen: list[tuple[int, int]] = []
    with _open(tmp_path / "log", clock, block_entries=8) as log:
        _fill(log, 70)
        report = log.verify_chain(progress=lambda done, total: seen.append((done, total)))
        assert report.ok, report.problem
        assert (report.entries, report.blocks, report.root) == (70, 8, log.root())
        assert report.signers == (KEY.public_key.raw,)
        assert log.verify_chain(deep=True, trusted_keys=[KEY.public_key]).ok
        assert seen[-1] == (70, 70)
        other = SigningKey(bytes(32)).public_key
        problem = log.verify_chain(trusted_keys=[other]).problem
        assert problem is not None
        assert problem.height == 0


@pytest.mark.parametrize(
    ("db", "key", "offset", "where", "seq", "height"),
    [
        (b"entries", u64(13), 40, "entry", 13, None),  # entry bytes
        (b"entries", u64(13), 3, "entry", 13, None),  # stored leaf hash
        (b"entries", u64(0), -1, "entry", 0, None),
        (b"nodes", node_key(NodeID(2, 1)), 5, "node", 7, None),
        (b"nodes", node_key(NodeID(1, 10)), 31, "node", 21, None),
        (b"blocks", u64(1), 20, "block", None, 1),
        (b"blocks", u64(2), -3, "block", None, 2),
        (b"meta", b"root", 0, "meta", None, None),
        (b"meta", b"size", 7, "meta", None, None),
    ],
)
def test_flipped_bytes_are_found_with_their_position(
    tmp_path: Path,
    clock: FakeClock,
    db: bytes,
    key: bytes,
    offset: int,
    where: str,
    seq: int | None,
    height: int | None,
) -> None:
    path = tmp_path / "log"
    with _open(path, clock, block_entries=10) as log:
        _fill(log, 35)
    flip_stored_bit(path, db, key, offset)
    with _open(path, clock) as log:
        report = log.verify_chain()
        assert not report.ok
        problem = report.problem
        assert problem is not None
        assert (problem.where, problem.seq, problem.height) == (where, seq, height), str(problem)
        with pytest.raises(StoreCorrupted):
            report.raise_for_problem()


def test_flipped_every_byte_of_an_entry_is_detected(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "log"
    with _open(path, clock) as log:
        _fill(log, 5)
        length = 32 + len(log.entry(3).to_bytes())
    for offset in range(length):
        flip_stored_bit(path, b"entries", u64(3), offset)
        with _open(path, clock) as log:
            problem = log.verify_chain().problem
            assert problem is not None
            assert problem.seq == 3
            with pytest.raises(StoreCorrupted):
                log.entry(3)
            with pytest.raises(StoreCorrupted):
                log.prove_inclusion(3)
        flip_stored_bit(path, b"entries", u64(3), offset)  # and back
    with _open(path, clock) as log:
        assert log.verify_chain().ok


def test_append_refuses_a_tree_that_does_not_match_its_root(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "log"
    with _open(path, clock) as log:
        _fill(log, 6)
    flip_stored_bit(path, b"nodes", node_key(NodeID(2, 0)), 0)
    with _open(path, clock) as log, pytest.raises(StoreCorrupted):
        log.append("MESSAGE_SENT", {})


@pytest.mark.parametrize("keep", [0, 100, 8192, 0.5])
def test_truncated_data_file_is_a_clean_error(
    tmp_path: Path, clock: FakeClock, keep: float
) -> None:
    path = tmp_path / "log"
    with _open(path, clock) as log:
        log.append_many([("MESSAGE_SENT", {"n": i}, None) for i in range(3000)])
    data = path / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, int(size * keep) if isinstance(keep, float) else keep)
    with pytest.raises(StoreCorrupted) as caught:
        _open(path, clock)
    assert "data.mdb" in caught.value.where


def test_truncation_under_an_open_log_is_reported_not_mapped(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "log"
    with _open(path, clock) as log:
        log.append_many([("MESSAGE_SENT", {"n": i}, None) for i in range(3000)])
        os.truncate(path / "data.mdb", (path / "data.mdb").stat().st_size // 2)
        report = log.verify_chain()
        assert report.problem is not None
        assert report.problem.where == "file"


# -- disk full -----------------------------------------------------------------------


def test_full_log_raises_and_keeps_every_committed_entry(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log"
    committed: list[int] = []
    with caplog.at_level(logging.WARNING, logger="talos.audit"):
        with _open(path, clock, max_size_bytes=256 * 1024, block_entries=16) as log:

            def fill() -> None:
                for _ in range(10_000):
                    committed.append(log.append("MESSAGE_SENT", {"hash": b"h" * 32}))

            with pytest.raises(AuditFull, match="intact"):
                fill()
            assert log.size == len(committed) > 10
            root = log.root()
            with pytest.raises(AuditFull):
                log.append_many([("MESSAGE_SENT", {}, None)] * 50)
            assert log.size == len(committed)
    assert any("full" in record.getMessage() for record in caplog.records)
    with _open(path, clock) as log:
        assert log.size == len(committed)
        assert log.root() == root
        assert log.verify_chain().ok
        assert [e.seq for e in log.entries()] == committed


# -- group commit --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_group_commit_one_transaction_per_tick(tmp_path: Path, clock: FakeClock) -> None:
    log = _open(tmp_path / "log", clock)
    before = log.environment.last_transaction()
    seqs = await asyncio.gather(*(log.append_async("MESSAGE_SENT", {"n": i}) for i in range(300)))
    assert sorted(seqs) == list(range(300))
    assert log.environment.last_transaction() == before + 1
    assert [log.entry(s).data["n"] for s in seqs] == list(range(300))
    await log.aclose()


@pytest.mark.asyncio
async def test_group_commit_many_concurrent_appenders(tmp_path: Path, clock: FakeClock) -> None:
    log = _open(tmp_path / "log", clock, block_entries=64)
    results: list[int] = []

    async def producer(name: int) -> None:
        for i in range(25):
            seq = await log.append_async("MESSAGE_RECEIVED", {"p": name, "i": i}, peer=f"p{name}")
            assert log.size > seq  # durable and visible once awaited
            results.append(seq)
            if i % 5 == 0:
                log.append("MESSAGE_SENT", {"sync": True})

    await asyncio.gather(*(producer(n) for n in range(40)))
    assert len(results) == len(set(results)) == 1000
    assert log.size == 1000 + 40 * 5
    assert log.verify_chain().ok
    await log.aclose()
    with _open(tmp_path / "log", clock) as again:
        assert again.size == 1200
        assert len(again.query(peer="p7")) == 25


@pytest.mark.asyncio
async def test_group_commit_failure_reaches_every_caller(tmp_path: Path, clock: FakeClock) -> None:
    log = _open(tmp_path / "log", clock, max_size_bytes=256 * 1024)

    async def fill() -> None:
        for _ in range(100):
            await asyncio.gather(
                *(log.append_async("MESSAGE_SENT", {"h": b"h" * 64}) for _ in range(50))
            )

    with pytest.raises(AuditFull):
        await fill()
    size = log.size
    await log.aclose()
    with _open(tmp_path / "log", clock) as again:
        assert again.size == size
        assert again.verify_chain().ok


@pytest.mark.asyncio
async def test_group_commit_seals_blocks_inside_one_batch(tmp_path: Path, clock: FakeClock) -> None:
    log = _open(tmp_path / "log", clock, block_entries=10)
    log.append("MESSAGE_SENT", {"first": True})
    clock.advance(5)
    before = log.environment.last_transaction()
    seqs = await asyncio.gather(
        *(
            log.append_async(AuditKind.MESSAGE_RECEIVED, {"n": i}, peer=f"p{i % 3}")
            for i in range(36)
        )
    )
    assert seqs == list(range(1, 37))
    assert log.environment.last_transaction() == before + 1
    assert log.block_count == 3
    blocks = [log.block(h) for h in range(3)]
    assert [(b.first_seq, b.last_seq) for b in blocks] == [(0, 9), (10, 19), (20, 29)]
    for block in blocks:
        assert block.root == log.root_at(block.tree_size)
    entries = list(log.entries())
    assert {e.time_ms for e in entries[1:]} == {entries[0].time_ms + 5000}  # one time per batch
    assert log.root() == root_from_leaves([leaf_hash(e.to_bytes()) for e in entries])
    assert log.verify_chain().ok
    assert [e.seq for e in log.query(peer="p1")] == list(range(2, 37, 3))
    await log.aclose()


def test_data_maps_are_canonical_whatever_their_key_order(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        log.append("MESSAGE_SENT", {"size": 1, "hash": b"h" * 32, "id": "x"})
        log.append("MESSAGE_SENT", {"id": "x", "hash": b"h" * 32, "size": 1})
        log.append("MESSAGE_SENT", {"hash": b"h" * 32, "id": "x", "size": 1})
        for seq in range(3):
            assert _stored(log, seq) == _canonical(log.entry(seq))
            assert list(log.entry(seq).data) == ["id", "hash", "size"]  # shortest key first

        class Key(str):
            pass

        # The shape {"size", "hash", "id"} is known now; its checks still apply.
        refused: list[dict[Any, Any]] = [
            {Key("size"): 1, "hash": b"h" * 32, "id": "x"},
            {"size": 1, "hash": b"h" * 65, "id": "x"},
            {"size": 1.0, "hash": b"h" * 32, "id": "x"},
            {"size": 2**64, "hash": b"h" * 32, "id": "x"},
            {"size": 1, "hash": b"h" * 32, "id": "x" * 513},
            {"size": 1, "hash": b"h" * 32, "id": "\ud800"},
        ]
        for data in refused:
            with pytest.raises(LocalProtocolError):
                log.append("MESSAGE_SENT", data)
        log.append("MESSAGE_SENT", {"size": [1, {"b": 2, "a": 1}], "hash": None, "id": True})
        assert list(log.entry(3).data["size"][1]) == ["a", "b"]
        assert _stored(log, 3) == _canonical(log.entry(3))
        assert log.size == 4
        assert log.verify_chain(deep=True).ok


@pytest.mark.asyncio
async def test_kinds_and_peers_are_checked_on_every_path(tmp_path: Path, clock: FakeClock) -> None:
    log = _open(tmp_path / "log", clock)
    await log.append_async(AuditKind.MESSAGE_SENT, {}, peer="bob")
    await log.append_async("MESSAGE_SENT", {}, peer="bob")
    assert type(log.entry(0).kind) is str
    assert _stored(log, 0) == _canonical(log.entry(0))
    assert _stored(log, 1) == _canonical(log.entry(1))
    assert len(log.query(kind=AuditKind.MESSAGE_SENT, peer="bob")) == 2
    for kind, peer in [("lower", None), (5, None), (["X"], None), ("X", ""), ("X", ["p"])]:
        with pytest.raises(LocalProtocolError):
            await log.append_async(kind, {}, peer=peer)  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            log.append(kind, {}, peer=peer)  # type: ignore[arg-type]
    assert log.size == 2
    await log.aclose()


def test_stray_rows_beyond_the_size_refuse_the_append(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 3)
        root = log.root()
    env = lmdb.open(str(tmp_path / "log"), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            txn.put(u64(5), b"\x00" * 40, db=env.open_db(b"entries", txn=txn))
    finally:
        env.close()
    with _open(tmp_path / "log", clock) as log:
        with pytest.raises(StoreCorrupted):
            log.append_many([("MESSAGE_SENT", {"n": i}, None) for i in range(4)])
        assert (log.size, log.root()) == (3, root)


# -- backup and restore --------------------------------------------------------------


def test_backup_and_restore_keeps_the_replaced_log(tmp_path: Path, clock: FakeClock) -> None:
    path, backup = tmp_path / "log", tmp_path / "backup"
    with _open(path, clock, block_entries=10) as log:
        _fill(log, 25)
        root = log.root()
        log.backup(backup)
        _fill(log, 5)
        with pytest.raises(ConfigurationError):
            log.backup(backup)
    restored = AuditLog.restore(path, backup, clock=clock, trusted_keys=[KEY.public_key])
    aside = restored.replaced.aside
    assert aside is not None
    assert aside.exists()
    assert (restored.size, restored.root, restored.lost) == (25, root, 0)
    with _open(path, clock) as log:
        assert (log.size, log.root_at(25)) == (26, root)
        assert log.entry(25).kind == "LOG_RESTORED"
        assert log.entry(25).data["backup_size"] == 25
        assert log.entry(25).data["replaced_size"] == 30
        assert log.verify_chain().ok
    with _open(aside, clock) as old:
        assert old.size == 30


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_restore_refuses_a_corrupt_backup(tmp_path: Path, clock: FakeClock, damage: str) -> None:
    path, backup = tmp_path / "log", tmp_path / "backup"
    with _open(path, clock) as log:
        log.append_many([("MESSAGE_SENT", {"n": i}, None) for i in range(3000)])
        log.backup(backup)
        root = log.root()
    if damage == "flip":
        flip_stored_bit(backup, b"entries", u64(1234), 50)
        (backup / "lock.mdb").unlink()
    elif damage == "truncate":
        os.truncate(backup / "data.mdb", (backup / "data.mdb").stat().st_size // 2)
    else:
        (backup / "data.mdb").unlink()
    with pytest.raises(BackupInvalid):
        AuditLog.restore(path, backup, clock=clock)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup", "log"]
    with _open(path, clock) as log:
        assert log.root() == root


def test_readonly_log_reads_but_does_not_write(tmp_path: Path, clock: FakeClock) -> None:
    with _open(tmp_path / "log", clock) as log:
        _fill(log, 9)
        root = log.root()
    with AuditLog.open(tmp_path / "log", readonly=True) as log:
        assert (log.size, log.root()) == (9, root)
        assert log.verify_chain().ok
        with pytest.raises(LocalProtocolError):
            log.append("MESSAGE_SENT", {})
    assert leaf_hash(b"") != root


# -- other state in the same transaction ----------------------------------------------


def test_append_with_commits_entries_and_rows_together(tmp_path: Path) -> None:
    """An agent's state change and the audit entry recording it land together or not at all."""
    path = tmp_path / "shared"
    with AuditLog.open(path, clock=FakeClock(), extra_databases=("inbox",)) as log:
        inbox = log.database("inbox")

        def deliver(txn: Any) -> None:
            txn.put(b"m1", b"hello", db=inbox)

        (seq,) = log.append_with([("MESSAGE_RECEIVED", {"id": b"m1"}, None)], deliver)
        assert seq == 0

        def fail(txn: Any) -> None:
            txn.put(b"m2", b"lost", db=inbox)
            raise RuntimeError("crash before commit")

        with pytest.raises(RuntimeError):
            log.append_with([("MESSAGE_RECEIVED", {"id": b"m2"}, None)], fail)
        assert log.size == 1
        with pytest.raises(LocalProtocolError):
            log.database("outbox")
    with AuditLog.open(path, readonly=True, extra_databases=("inbox",)) as log:
        assert log.size == 1
        with log.snapshot() as txn:
            assert txn.get(b"m1", db=log.database("inbox")) == b"hello"
            assert txn.get(b"m2", db=log.database("inbox")) is None
        assert log.verify_chain().ok


def test_a_log_built_on_an_open_environment_leaves_it_open(tmp_path: Path) -> None:
    """The second way in: AuditLog(environment) shares an environment its owner closes."""
    environment = Environment.open(tmp_path / "shared", extra_databases=("inbox",))
    try:
        with AuditLog(environment, clock=FakeClock()) as log:
            inbox = log.database("inbox")
            assert log.environment is environment

            def deliver(txn: Any) -> None:
                txn.put(b"m1", b"hello", db=inbox)

            log.append_with([("MESSAGE_RECEIVED", {"id": b"m1"}, None)], deliver)
        with environment.read() as txn:
            assert txn.get(b"m1", db=environment.database("inbox")) == b"hello"
            assert txn.get(u64(0), db=environment.audit.entries) is not None
        with AuditLog(environment, clock=FakeClock()) as again:
            assert again.size == 1
            assert again.verify_chain().ok
        with pytest.raises(LocalProtocolError):
            environment.database("outbox")
    finally:
        environment.close()


def test_the_environment_refuses_too_many_extra_databases(tmp_path: Path) -> None:
    names = [f"db{index}" for index in range(MAX_EXTRA_DATABASES + 1)]
    with pytest.raises(ConfigurationError, match="extra databases"):
        Environment.open(tmp_path / "crowded", extra_databases=names)
    with pytest.raises(ConfigurationError, match="extra databases"):
        AuditLog.open(tmp_path / "crowded", extra_databases=names)
    assert not (tmp_path / "crowded").exists()


def test_a_second_process_writing_does_not_break_the_first(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A CLI command appending while an agent holds the log open must not break either."""
    path = tmp_path / "log"
    other = (
        "import sys; from talos.audit import AuditLog\n"
        "with AuditLog.open(sys.argv[1], block_entries=5) as log:\n"
        "    for n in sys.argv[2:]:\n"
        "        log.append('MESSAGE_SENT', {'n': int(n)})\n"
        "    log.seal_block()\n"
    )
    with _open(path, clock, block_entries=5) as agent:
        agent.append("MESSAGE_SENT", {"n": 0})
        expected = [0]
        for batch in ([1, 2], [5], [8, 9, 10]):
            subprocess.run(
                [sys.executable, "-c", other, str(path), *map(str, batch)], check=True, timeout=60
            )
            expected += batch
            nxt = batch[-1] + 1
            agent.append("MESSAGE_SENT", {"n": nxt})
            expected.append(nxt)
        assert agent.size == len(expected)
        leaves = [agent.entry(seq).leaf_hash() for seq in range(agent.size)]
        assert agent.root() == root_from_leaves(leaves)
    with _open(path, clock) as log:
        report = log.verify_chain()
        assert report.ok, report.problem
        assert [entry.data["n"] for entry in log.entries()] == expected
