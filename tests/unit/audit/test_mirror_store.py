"""The mirror store (talos.audit.mirror_store): verify before storing, quota, serving back."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.audit.mirror_store import MAX_ORIGINS, MirrorRefused, MirrorStore
from talos.core.audit.checkpoint import Checkpoint, LogSigner
from talos.core.audit.entry import AuditEntry
from talos.core.audit.merkle import leaf_hash
from talos.core.crypto import SigningKey
from talos.core.mirror import Batch, RefusalCode
from talos.storage.lmdb import DATA_FILE

ORIGIN = "alice-origin"
KEY = SigningKey(bytes(range(32)))
SIGNER = LogSigner(KEY, ORIGIN, f"{ORIGIN}/audit")


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    opened = AuditLog.open(tmp_path / "origin", signer=SIGNER, commit_thread=False)
    for n in range(40):
        opened.append("MESSAGE_SENT", {"n": n}, peer="bob")
    yield opened
    opened.close()


def batch_of(log: AuditLog, start: int, end: int, signer: LogSigner = SIGNER) -> Batch:
    entries = tuple(e.to_bytes() for e in log.entries(start, end))
    return Batch(start, entries, Checkpoint.sign(signer, end, log.root_at(end)))


def test_batches_are_verified_stored_and_served_back(tmp_path: Path, log: AuditLog) -> None:
    with MirrorStore.open(tmp_path / "mirrors") as store:
        assert store.accept(ORIGIN, batch_of(log, 0, 10), KEY.public_key) == 10
        assert store.accept(ORIGIN, batch_of(log, 10, 40), KEY.public_key) == 40
        # A batch sent again (its ACK was lost) changes nothing.
        assert store.accept(ORIGIN, batch_of(log, 5, 40), KEY.public_key) == 40
        first = store.serve(ORIGIN, 0, 128)
        assert (first.start, len(first.entries), first.held) == (0, 10, 40)
        assert first.checkpoint is not None
        assert first.checkpoint.root == log.root_at(10)
        second = store.serve(ORIGIN, 10, 128)
        assert [e.to_bytes() for e in log.entries(10, 40)] == list(second.entries)
        assert store.serve(ORIGIN, 40, 128).entries == ()
    mode = stat.S_IMODE((tmp_path / "mirrors" / DATA_FILE).stat().st_mode)
    assert mode == 0o600


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda log: batch_of(log, 5, 10), RefusalCode.GAP),
        (
            lambda log: batch_of(
                log, 0, 10, LogSigner(SigningKey(bytes(32)), ORIGIN, f"{ORIGIN}/audit")
            ),
            RefusalCode.BAD_CHECKPOINT,
        ),
        (
            lambda log: batch_of(log, 0, 10, LogSigner(KEY, ORIGIN, "other/audit")),
            RefusalCode.BAD_CHECKPOINT,
        ),
        (
            lambda log: Batch(
                0, batch_of(log, 0, 10).entries, Checkpoint.sign(SIGNER, 10, b"\x00" * 32)
            ),
            RefusalCode.INCONSISTENT,
        ),
    ],
    ids=["gap", "wrong-key", "wrong-origin", "wrong-root"],
)
def test_bad_batches_are_refused_and_nothing_changes(
    tmp_path: Path, log: AuditLog, make: object, code: RefusalCode
) -> None:
    with MirrorStore.open(tmp_path / "mirrors") as store:
        with pytest.raises(MirrorRefused) as refused:
            store.accept(ORIGIN, make(log), KEY.public_key)  # type: ignore[operator]
        assert refused.value.code is code
        assert store.origin(ORIGIN).size == 0


def test_a_repeated_entry_that_differs_is_refused(tmp_path: Path, log: AuditLog) -> None:
    with MirrorStore.open(tmp_path / "mirrors") as store:
        store.accept(ORIGIN, batch_of(log, 0, 10), KEY.public_key)
        good = batch_of(log, 8, 12)
        forged = Batch(8, (good.entries[1], *good.entries[1:]), good.checkpoint)
        with pytest.raises(MirrorRefused) as refused:
            store.accept(ORIGIN, forged, KEY.public_key)
        assert refused.value.code is RefusalCode.INCONSISTENT
        assert store.origin(ORIGIN).size == 10


def test_quota_is_kept_per_origin(tmp_path: Path, log: AuditLog) -> None:
    with MirrorStore.open(tmp_path / "mirrors", quota_bytes=1500) as store:
        store.accept(ORIGIN, batch_of(log, 0, 2), KEY.public_key)
        with pytest.raises(MirrorRefused, match="quota") as refused:
            store.accept(ORIGIN, batch_of(log, 2, 40), KEY.public_key)
        assert refused.value.code is RefusalCode.QUOTA
        assert store.origin(ORIGIN).size == 2
        assert store.origin(ORIGIN).used <= 1500


def test_progress_of_our_own_mirrors_persists(tmp_path: Path) -> None:
    with MirrorStore.open(tmp_path / "mirrors") as store:
        assert store.progress("bob") == 0
        store.set_progress("bob", 12)
    with MirrorStore.open(tmp_path / "mirrors") as store:
        assert store.progress("bob") == 12
        assert store.mirrors() == {"bob": 12}


def test_at_most_max_origins_are_held(tmp_path: Path) -> None:
    raw = AuditEntry(0, 1, "MESSAGE_SENT").to_bytes()

    def first_batch(origin: str) -> Batch:
        signer = LogSigner(KEY, origin, f"{origin}/audit")
        return Batch(0, (raw,), Checkpoint.sign(signer, 1, leaf_hash(raw)))

    with MirrorStore.open(tmp_path / "mirrors") as store:
        for n in range(MAX_ORIGINS):
            assert store.accept(f"origin{n}", first_batch(f"origin{n}"), KEY.public_key) == 1
        with pytest.raises(MirrorRefused, match="most origins") as refused:
            store.accept("one-too-many", first_batch("one-too-many"), KEY.public_key)
        assert refused.value.code is RefusalCode.QUOTA
        # Origins already held go on.
        assert store.accept("origin0", first_batch("origin0"), KEY.public_key) == 1
