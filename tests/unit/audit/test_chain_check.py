"""talos.audit.chain_check: the chain scan in a child process and its report transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.audit import AuditLog, ChainProblem, ChainReport, LogSigner
from talos.audit.chain_check import report_fields, report_from_fields, scan_chain
from talos.core.audit.merkle import NodeID
from talos.core.crypto import SigningKey
from talos.errors import StorageError
from talos.storage.lmdb import DATA_FILE
from talos.testing import FakeClock, SeededRng

KEY = SigningKey.generate(SeededRng(3))


@pytest.mark.parametrize(
    "report",
    [
        ChainReport(10, 2, b"\x01" * 32, None, (b"\x02" * 32,), 1),
        ChainReport(0, 0, b"", ChainProblem("file", "truncated")),
        ChainReport(5, 1, b"", ChainProblem("entry", "bad hash", 3, None, NodeID(0, 3))),
        ChainReport(5, 1, b"", ChainProblem("block", "bad link", None, 1)),
    ],
)
def test_a_report_survives_the_pipe(report: ChainReport) -> None:
    assert report_from_fields(report_fields(report)) == report


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "audit"
    signer = LogSigner(KEY, name="tester")
    with AuditLog.open(path, clock=FakeClock(), signer=signer, block_entries=4) as log:
        for i in range(10):
            log.append("TEST", {"i": i})
    return path


def test_an_intact_log_scans_clean_with_progress(log_dir: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = scan_chain(
        log_dir, [KEY.public_key], deep=True, progress=lambda *step: seen.append(step)
    )
    assert report.ok, report.problem
    assert report.entries == 10
    assert report.signers == (KEY.public_key.raw,)
    assert seen
    assert seen[-1][1] == 10


def test_a_damaged_data_file_is_a_file_problem_not_an_error(log_dir: Path) -> None:
    data = log_dir / DATA_FILE
    data.write_bytes(b"\0" * 100)
    report = scan_chain(log_dir, None)
    assert not report.ok
    assert report.problem is not None
    assert report.problem.where == "file"


def test_a_log_that_cannot_be_opened_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="could not verify"):
        scan_chain(tmp_path / "nowhere", None)
