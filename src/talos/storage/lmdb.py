"""LMDB primitives: the data-file check that guards against SIGBUS, error translation, keys.

:class:`talos.storage.environment.Environment` opens the agent's one LMDB
environment with these; the audit log's row layout is in
:mod:`talos.audit.store`.

Rules this module keeps:

* One safe open: :func:`open_environment` is the only place Talos calls
  ``lmdb``'s open, for every store (the audit log and agent state, the
  capabilities store). It checks the data file first (below), creates the
  directory 0700 and the files 0600, and translates every error.
* Errors: every ``lmdb`` exception leaves as a Talos one (:func:`translate`):
  map full, ``ENOSPC``, ``EDQUOT``, and ``EIO`` while the file system is
  (nearly) full as :class:`~talos.errors.AuditFull` -- LMDB reports a short
  write, which is what a full disk gives it, as ``EIO``; corruption
  (``MDB_CORRUPTED``, ``MDB_PAGE_NOTFOUND``, ``MDB_INVALID``, and the
  ``MDB_BAD_TXN`` / ``MDB_CURSOR_FULL`` a damaged page leads to) as
  :class:`~talos.errors.StoreCorrupted` naming the data file; the rest as
  :class:`~talos.errors.StorageError`.
* SIGBUS: LMDB maps the data file; touching a page past the end of a truncated
  file kills the process with SIGBUS. Before the file is handed to LMDB,
  :func:`check_data_file` reads the two meta pages itself (plain reads, no
  mapping) and compares the committed ``last page × page size`` with the file
  size. A file that is shorter is either truncated or ends in pages LMDB
  allocated and freed in the same transaction and never wrote; py-lmdb's
  offline walker (:mod:`lmdb.verify`, pure reads) then decides, so a healthy
  file is never refused and a truncated one is reported, not mapped.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final

import lmdb
import lmdb.verify

from talos.errors import AuditFull, StorageError, StoreCorrupted

__all__ = [
    "DATA_FILE",
    "DEFAULT_MAP_SIZE",
    "DIR_MODE",
    "FILE_MODE",
    "LOCK_FILE",
    "MAX_EXTRA_DATABASES",
    "MIN_SIZE_BYTES",
    "NEARLY_FULL_BYTES",
    "DataFileInfo",
    "ReadTransaction",
    "check_data_file",
    "disk_nearly_full",
    "lmdb_errors",
    "open_environment",
    "read_u64",
    "salvage_rows",
    "translate",
    "u64",
]

DATA_FILE: Final = "data.mdb"
LOCK_FILE: Final = "lock.mdb"

#: Map size (address space, not disk) when the caller sets no limit.
DEFAULT_MAP_SIZE: Final = 1 << 40

#: Smallest ``max_size_bytes`` accepted: room for the metadata and a few pages.
MIN_SIZE_BYTES: Final = 256 * 1024
#: Databases other state may keep beside the audit log (see Environment.open).
MAX_EXTRA_DATABASES: Final = 8

_MDB_MAGIC = 0xBEEFC0DE
_U64 = struct.Struct(">Q")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: ``EIO`` from LMDB with less than this free on the file system is a full disk:
#: LMDB turns a short write (the disk filled during the commit) into ``EIO``.
NEARLY_FULL_BYTES: Final = 1 << 20
_KNOWN_ERRNOS = (errno.EIO, errno.ENOSPC, errno.EDQUOT)
_CORRUPT = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.PanicError,
    lmdb.BadValsizeError,
    # A damaged page fails one operation and poisons the transaction: the next
    # one gets MDB_BAD_TXN. A page that points at itself (or a too-deep tree)
    # overflows the cursor stack. Talos never misuses a transaction or nests
    # that deep, so both mean a damaged file.
    lmdb.BadTxnError,
    lmdb.CursorFullError,
    # LMDB 1.0's page checksums and its "unexpected problem" code.
    lmdb.BadChecksumError,
    lmdb.ProblemError,
)
#: Files Talos creates in a store directory: owner read/write only.
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700


def u64(value: int) -> bytes:
    """Big-endian 8-byte key: byte order equals numeric order."""
    return _U64.pack(value)


def read_u64(raw: bytes) -> int:
    return int(_U64.unpack(raw)[0])


# -- the SIGBUS guard -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataFileInfo:
    """What the committed LMDB meta page says about a data file."""

    file_size: int
    page_size: int
    last_page: int
    txn_id: int

    @property
    def committed_size(self) -> int:
        return (self.last_page + 1) * self.page_size


def _header_size() -> tuple[int, int]:
    """(page header size, data format version) of the LMDB this py-lmdb links."""
    major = lmdb.version()[0]
    return (24, 3) if major >= 1 else (16, 1)


def _read_meta(handle: BinaryIO, offset: int, hdr: int, path: Path) -> tuple[int, int, int, int]:
    """(version, page size, last page, txnid) of the meta page at ``offset``.

    Layout of ``MDB_meta`` after the page header (native byte order, 64-bit):
    magic u32, version u32, address, mapsize, two ``MDB_db`` of 48 bytes (the
    first one's ``md_pad`` holds the page size), last page, txnid.
    """
    handle.seek(offset)
    raw = handle.read(hdr + 136)
    if len(raw) < hdr + 136:
        raise StoreCorrupted(
            f"{path} is too short to hold LMDB meta pages", where=str(path), what="truncated"
        )
    order = "<" if sys.byteorder == "little" else ">"
    magic, version = struct.unpack_from(order + "II", raw, hdr)
    psize = struct.unpack_from(order + "I", raw, hdr + 24)[0]
    last_pg, txnid = struct.unpack_from(order + "QQ", raw, hdr + 24 + 96)
    if magic != _MDB_MAGIC:
        raise StoreCorrupted(f"{path} is not an LMDB data file", where=str(path), what="magic")
    return version, psize, last_pg, txnid


def check_data_file(path: Path, *, full: bool = False) -> DataFileInfo | None:
    """Check a ``data.mdb`` against its own meta pages before LMDB maps it.

    Returns ``None`` when the file does not exist (a new log). With ``full``,
    py-lmdb's offline structural walker checks every reachable page too (for
    backups, whose origin is not trusted); it reads, never maps.

    Raises:
        StoreCorrupted: not an LMDB file, meta pages unreadable, or the file
            is shorter than its committed pages (truncated).
        StorageError: the file cannot be read.
    """
    hdr, version = _header_size()
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise StoreCorrupted(f"{path} is empty", where=str(path), what="truncated")
            v0, psize, last0, txn0 = _read_meta(handle, 0, hdr, path)
            if psize < 256 or psize & (psize - 1) or psize > 1 << 16:
                raise StoreCorrupted(
                    f"{path} has an implausible page size", where=str(path), what="meta page"
                )
            v1, psize1, last1, txn1 = _read_meta(handle, psize, hdr, path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"could not read {path}: {exc.strerror or exc}") from exc
    if v0 != version or v1 != version or psize1 != psize:
        raise StoreCorrupted(
            f"{path} has an unexpected LMDB format", where=str(path), what="meta page"
        )
    last, txn = (last1, txn1) if txn1 > txn0 else (last0, txn0)
    info = DataFileInfo(size, psize, last, txn)
    if full or size < info.committed_size:
        _walk(path, info)
    return info


def _walk(path: Path, info: DataFileInfo) -> None:
    """Run py-lmdb's offline walker (reads only); refuse the file on any finding."""
    try:
        # py-lmdb's verifier is not annotated; it returns a list of strings.
        problems = lmdb.verify.verify(str(path), subdir=False)  # type: ignore[no-untyped-call]
    except (lmdb.verify.VerifyError, OSError, ValueError, struct.error) as exc:
        problems = [str(exc)]
    if problems:
        short = info.file_size < info.committed_size
        what = "truncated" if short else "structure"
        detail = (
            f"{info.file_size} bytes, committed pages need {info.committed_size}"
            if short
            else problems[0]
        )
        raise StoreCorrupted(f"{path} is damaged ({detail})", where=str(path), what=what)


# -- salvage ---------------------------------------------------------------------------

_P_LEAF: Final = 0x02
_P_LEAF2: Final = 0x20
_P_SUBP: Final = 0x40
_F_BIGDATA: Final = 0x01
_F_SUBDATA_DUP: Final = 0x06


def salvage_rows(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) that a leaf page of the data file ``path`` still holds.

    For a file LMDB cannot open safely (truncated past its committed pages):
    each page that is in the file is read with plain reads, never mapped,
    and each leaf node whose key and value fit in what is there is yielded,
    whichever database and whichever transaction it belongs to (stale copies
    in freed pages included). The caller must check every row on its own
    terms: nothing here says a row is current, or from the database it wants.

    Raises:
        StoreCorrupted: the file is not an LMDB data file.
        StorageError: it cannot be read.
    """
    hdr, _ = _header_size()
    base = 0 if hdr == 16 else hdr
    try:
        with path.open("rb") as handle:
            _, psize, _, _ = _read_meta(handle, 0, hdr, path)
            if psize < 256 or psize & (psize - 1) or psize > 1 << 16:
                raise StoreCorrupted(
                    f"{path} has an implausible page size", where=str(path), what="meta page"
                )
            if os.fstat(handle.fileno()).st_size < 3 * psize:
                return
            # Mapped at its present size and only read below it: no SIGBUS
            # unless the file shrinks meanwhile (no process writes it).
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for offset in range(2 * psize, len(data) - psize + 1, psize):
                    yield from _leaf_rows(data, offset, psize, hdr, base)
    except OSError as exc:
        raise StorageError(f"could not read {path}: {exc.strerror or exc}") from exc


def _leaf_rows(
    data: mmap.mmap, page: int, psize: int, hdr: int, base: int
) -> Iterator[tuple[bytes, bytes]]:
    """The rows of the leaf page at byte ``page`` of ``data`` (nothing if it is not one)."""
    order = "<" if sys.byteorder == "little" else ">"
    flags, lower, upper = struct.unpack_from(order + "HHH", data, page + hdr - 6)
    if flags & (_P_LEAF | _P_LEAF2 | _P_SUBP) != _P_LEAF or not hdr <= lower <= upper <= psize:
        return
    for i in range((lower - (hdr - base)) >> 1):
        node = page + struct.unpack_from(order + "H", data, page + hdr + 2 * i)[0] + base
        if node + 8 > page + psize:
            continue
        lo, hi, nflags, ksize = struct.unpack_from(order + "HHHH", data, node)
        dsize = lo | (hi << 16)
        key_at = node + 8
        value_at = key_at + (ksize + (ksize & 1) if hdr == 24 else ksize)
        if nflags & _F_SUBDATA_DUP or key_at + ksize > page + psize:
            continue
        key = data[key_at : key_at + ksize]
        if nflags & _F_BIGDATA:
            if value_at + 8 > page + psize:
                continue
            overflow = struct.unpack_from(order + "Q", data, value_at)[0] * psize + hdr
            value = data[overflow : overflow + dsize] if overflow + dsize <= len(data) else b""
        else:
            value = data[value_at : value_at + dsize] if value_at + dsize <= page + psize else b""
        if value:
            yield key, value


# -- error translation -------------------------------------------------------------


def translate(exc: lmdb.Error, where: str | Path, *, store: str = "audit log") -> StorageError:
    """The Talos exception for an ``lmdb`` one raised while working on directory ``where``.

    ``store`` names the store in messages ("audit log", "capabilities store").
    """
    code = _errno_of(exc)
    detail = str(exc)
    if (
        isinstance(exc, lmdb.MapFullError | lmdb.DiskError)
        or code in _FULL_ERRNOS
        or (code == errno.EIO and disk_nearly_full(Path(where)))
    ):
        return AuditFull(f"{store} {where} is full: {detail}")
    if isinstance(exc, _CORRUPT):
        data = Path(where) / DATA_FILE
        return StoreCorrupted(
            f"{store} file {data} is corrupted: {exc}", where=str(data), what="lmdb"
        )
    return StorageError(f"{store} {where}: {detail}")


def _errno_of(exc: lmdb.Error) -> int | None:
    """The system errno behind an ``lmdb`` error, if it is one Talos tells apart.

    py-lmdb's C extension keeps only the text (``"mdb_txn_commit: Input/output
    error"``); its cffi twin keeps the number as the second argument.
    """
    if len(exc.args) > 1 and isinstance(exc.args[1], int):
        return exc.args[1]
    text = str(exc)
    return next((n for n in _KNOWN_ERRNOS if text.endswith(": " + os.strerror(n))), None)


def disk_nearly_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has less than NEARLY_FULL_BYTES free."""
    for candidate in (path, *path.parents):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize < NEARLY_FULL_BYTES
    return False


class lmdb_errors:  # noqa: N801 -- used like the function it was
    """Turn ``lmdb.Error`` raised inside the block into its Talos exception.

    A class, not a generator-based context manager: it wraps every LMDB
    transaction, and a generator costs several times as much to enter and
    leave (issue 19, docs/design/performance.md).
    """

    __slots__ = ("_store", "_where")

    def __init__(self, where: str | Path, *, store: str = "audit log") -> None:
        self._where, self._store = where, store

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, lmdb.Error):
            raise translate(exc, self._where, store=self._store) from exc


class ReadTransaction:
    """``with`` block over one LMDB read transaction, aborted at the end; an
    ``lmdb.Error`` inside it (or on opening it) is raised as its Talos exception
    (:func:`translate`, naming ``store``).

    A class rather than a generator-based context manager: every read of the
    agent's state, audit log and capabilities goes through it, several per
    message (issue 19).
    """

    __slots__ = ("_env", "_store", "_txn", "_where")

    def __init__(self, env: lmdb.Environment, where: str, *, store: str = "audit log") -> None:
        self._env, self._where, self._store = env, where, store
        self._txn: lmdb.Transaction[bytes] | None = None

    def __enter__(self) -> lmdb.Transaction[bytes]:
        try:
            self._txn = self._env.begin()
        except lmdb.Error as exc:
            raise translate(exc, self._where, store=self._store) from exc
        return self._txn

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        txn, self._txn = self._txn, None
        if txn is not None:
            try:
                txn.abort()
            except lmdb.Error as failure:
                if exc is None:
                    raise translate(failure, self._where, store=self._store) from failure
        if isinstance(exc, lmdb.Error):
            raise translate(exc, self._where, store=self._store) from exc


# -- the one safe open -------------------------------------------------------------


def open_environment(
    path: Path,
    *,
    store: str,
    readonly: bool = False,
    lock: bool = True,
    verify_structure: bool = False,
    **options: Any,
) -> lmdb.Environment:
    """Open (or create, unless ``readonly``) the LMDB environment in directory ``path``.

    The only way Talos opens LMDB. The data file is checked against its
    committed pages before it is mapped (:func:`check_data_file`; with
    ``verify_structure`` every reachable page is walked too); a new directory
    is created 0700 and new files 0600, and files an older Talos left
    readable by others are tightened to 0600. ``options`` go to
    ``lmdb.Environment`` (map size, sync flags, ``max_dbs``...).

    Raises:
        StoreCorrupted: the data file is truncated, damaged or not LMDB (named).
        AuditFull: the disk is full.
        StorageError: the directory cannot be created or opened.
    """
    if not readonly:
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not create {path}: {exc.strerror or exc}") from exc
    check_data_file(path / DATA_FILE, full=verify_structure)
    with lmdb_errors(path, store=store):
        env = lmdb.Environment(
            str(path), subdir=True, readonly=readonly, lock=lock, mode=FILE_MODE, **options
        )
    if not readonly:
        _tighten(path)
    return env


def _tighten(path: Path) -> None:
    """chmod 0600 the LMDB files in ``path`` that others may read (made by an older Talos)."""
    for name in (DATA_FILE, LOCK_FILE):
        file = path / name
        with contextlib.suppress(OSError):
            if file.stat().st_mode & 0o077:
                file.chmod(FILE_MODE)
