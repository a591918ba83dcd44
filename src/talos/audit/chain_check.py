"""The audit chain's integrity scan, run in a child process.

:func:`scan_chain` runs :meth:`AuditLog.verify_chain` in a child process
(``multiprocessing``, "spawn") and returns its :class:`ChainReport`. LMDB
maps the data file, and a page that is missing from a truncated file kills
the reader with SIGBUS. The log checks the file before it maps it, but a
file truncated during the scan can still do this; the caller's process
never maps a file it has not checked, and a child that dies from SIGBUS or
SIGSEGV is reported as damage (the report's problem), not raised.

:func:`scan_home_chain` also answers what the agent's watermark
(:mod:`talos.storage.watermark`) asks of the log: its root at the size the
agent last signed, computed by the same child; the caller compares.

The child reports over a one-way pipe: ``("progress", done, total)`` any
number of times, then exactly one of ``("report", fields, root_at)``,
``("corrupted", message)`` or ``("error", class name, message)``. Talos
errors travel as text because ``StoreCorrupted`` (keyword-only arguments)
does not unpickle; a report travels as plain values (:func:`report_fields`,
:func:`report_from_fields`).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from talos.audit import AuditLog, ChainProblem, ChainReport
from talos.core.audit.checkpoint import Block
from talos.core.audit.merkle import NodeID
from talos.core.crypto import VerifyKey
from talos.errors import StorageError, StoreCorrupted, TalosError, UnsupportedVersion
from talos.storage.lmdb import DATA_FILE

__all__ = ["ScannedLog", "report_fields", "report_from_fields", "scan_chain", "scan_home_chain"]

#: Signals that mean the scan touched memory it could not read: a damaged file.
_FAULT_SIGNALS = frozenset({signal.SIGBUS, signal.SIGSEGV})

Progress = Callable[[int, int], None]


def scan_chain(
    path: Path,
    trusted_keys: list[VerifyKey] | None,
    *,
    deep: bool = False,
    progress: Progress | None = None,
) -> ChainReport:
    """Run ``verify_chain`` on the log at ``path`` in a child process.

    Damage is returned as the report's problem, never raised. That includes
    a data file that fails its check before mapping and a child killed by
    SIGBUS or SIGSEGV. ``progress(done, total)`` is called in this process.

    Raises:
        StorageError: the scan failed for another reason (unreadable
            directory, the child killed by another signal or crashed).
        UnsupportedVersion: the log was written by a newer Talos.
    """
    return _scan(path, trusted_keys, deep, progress, None)[0]


class ScannedLog:
    """What a scan found, as the :class:`~talos.storage.watermark.AuditView` a
    watermark check asks for (only the root at the recorded size is known)."""

    def __init__(self, report: ChainReport, root_size: int, root_at: bytes | None) -> None:
        self.report = report
        self._root_size = root_size
        self._root_at = root_at

    @property
    def size(self) -> int:
        return self.report.entries

    @property
    def block_count(self) -> int:
        return self.report.blocks

    def block(self, height: int) -> Block:
        raise StorageError("a scanned log gives no blocks")

    def root_at(self, size: int) -> bytes:
        if size != self._root_size or self._root_at is None:
            raise StorageError(f"the scan did not compute the root at {size} entries")
        return self._root_at


def scan_home_chain(
    path: Path,
    trusted_keys: list[VerifyKey] | None,
    root_size: int,
    *,
    deep: bool = False,
    progress: Progress | None = None,
) -> ScannedLog:
    """:func:`scan_chain`, and the log's root at ``root_size`` entries (if it has that many).

    Raises:
        StorageError, UnsupportedVersion: as :func:`scan_chain`.
    """
    report, root_at = _scan(path, trusted_keys, deep, progress, root_size)
    return ScannedLog(report, root_size, root_at)


def _scan(
    path: Path,
    trusted_keys: list[VerifyKey] | None,
    deep: bool,
    progress: Progress | None,
    root_size: int | None,
) -> tuple[ChainReport, bytes | None]:
    spawn = multiprocessing.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    raw_keys = None if trusted_keys is None else [key.raw for key in trusted_keys]
    child = spawn.Process(
        target=_scan_worker,
        args=(sender, str(path), raw_keys, deep, root_size),
        name="talos-verify-chain",
    )
    child.daemon = True
    child.start()
    sender.close()  # the child holds the only sending end, so its death reads as EOF
    try:
        message = _receive(receiver, progress)
        child.join(30)  # it has nothing left to do but close the log and exit
    finally:
        receiver.close()
        if child.is_alive():  # interrupted (Ctrl-C) or stuck: do not leave it behind
            child.terminate()
        child.join()
    return _outcome(message, child.exitcode, path)


def _scan_worker(
    conn: Connection, path: str, trusted: list[bytes] | None, deep: bool, root_size: int | None
) -> None:
    """Child-process side of :func:`scan_chain`: open, scan, send the outcome back."""
    try:
        keys = None if trusted is None else [VerifyKey(raw) for raw in trusted]
        with AuditLog.open(Path(path), readonly=True) as log:
            report = log.verify_chain(
                trusted_keys=keys,
                deep=deep,
                progress=lambda done, total: conn.send(("progress", done, total)),
            )
            root_at = None
            if report.ok and root_size is not None and root_size <= report.entries:
                root_at = log.root_at(root_size)
        conn.send(("report", report_fields(report), root_at))
    except StoreCorrupted as exc:
        conn.send(("corrupted", str(exc)))
    except TalosError as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
    finally:
        conn.close()


def report_fields(report: ChainReport) -> dict[str, Any]:
    """A ChainReport as plain values for the pipe."""
    problem = report.problem
    return {
        "entries": report.entries,
        "blocks": report.blocks,
        "root": report.root,
        "signers": list(report.signers),
        "unsigned_blocks": report.unsigned_blocks,
        "pruned": report.pruned,
        "pruned_below": report.pruned_below,
        "problem": None
        if problem is None
        else {
            "where": problem.where,
            "what": problem.what,
            "seq": problem.seq,
            "height": problem.height,
            "node": None if problem.node is None else (problem.node.level, problem.node.index),
        },
    }


def report_from_fields(fields: dict[str, Any]) -> ChainReport:
    """The ChainReport that :func:`report_fields` made ``fields`` from."""
    raw = fields["problem"]
    problem = None
    if raw is not None:
        node = None if raw["node"] is None else NodeID(*raw["node"])
        problem = ChainProblem(raw["where"], raw["what"], raw["seq"], raw["height"], node)
    return ChainReport(
        fields["entries"],
        fields["blocks"],
        fields["root"],
        problem,
        tuple(fields["signers"]),
        fields["unsigned_blocks"],
        fields["pruned"],
        fields["pruned_below"],
    )


def _file_problem(what: str) -> ChainReport:
    return ChainReport(0, 0, b"", ChainProblem("file", what))


def _receive(receiver: Connection, progress: Progress | None) -> tuple[Any, ...] | None:
    """Progress messages until the final one; None if the child closed the pipe first."""
    while True:
        try:
            message: tuple[Any, ...] = receiver.recv()
        except (EOFError, OSError):
            return None
        if message[0] != "progress":
            return message
        if progress is not None:
            progress(message[1], message[2])


def _outcome(
    message: tuple[Any, ...] | None, exitcode: int | None, path: Path
) -> tuple[ChainReport, bytes | None]:
    """The report the child's last message (or its exit status) stands for.

    Raises:
        UnsupportedVersion: the child found a log written by a newer Talos.
        StorageError: the child failed otherwise, or was stopped by a signal
            that does not mean a damaged file.
    """
    if message is not None:
        kind = message[0]
        if kind == "report":
            return report_from_fields(message[1]), message[2]
        if kind == "corrupted":
            return _file_problem(message[1]), None
        if message[1] == UnsupportedVersion.__name__:
            raise UnsupportedVersion(message[2])
        raise StorageError(f"could not verify {path}: {message[1]}: {message[2]}")
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        if -exitcode in _FAULT_SIGNALS:
            problem = _file_problem(
                f"the scan was killed by {name} while reading {path / DATA_FILE}: "
                "the file is truncated or damaged"
            )
            return problem, None
        raise StorageError(f"the verification of {path} was stopped by {name}; nothing was checked")
    raise StorageError(f"the verification process for {path} failed (exit status {exitcode})")
