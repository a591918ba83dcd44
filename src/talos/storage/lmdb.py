"""LMDB primitives: the data-file check that guards against SIGBUS, error translation, keys.

:class:`talos.storage.environment.Environment` opens the agent's one LMDB
environment with these; the audit log's row layout is in
:mod:`talos.audit.store`.

Rules this module keeps:

* Errors: every ``lmdb`` exception leaves as a Talos one: map full, ``ENOSPC``
  and ``EDQUOT`` as :class:`~talos.errors.AuditFull`; corruption and foreign
  files as :class:`~talos.errors.StoreCorrupted`; the rest as
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
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import lmdb
import lmdb.verify

from talos.errors import AuditFull, StorageError, StoreCorrupted

__all__ = [
    "DATA_FILE",
    "DEFAULT_MAP_SIZE",
    "MAX_EXTRA_DATABASES",
    "MIN_SIZE_BYTES",
    "DataFileInfo",
    "check_data_file",
    "lmdb_errors",
    "read_u64",
    "translate",
    "u64",
]

DATA_FILE: Final = "data.mdb"

#: Map size (address space, not disk) when the caller sets no limit.
DEFAULT_MAP_SIZE: Final = 1 << 40

#: Smallest ``max_size_bytes`` accepted: room for the metadata and a few pages.
MIN_SIZE_BYTES: Final = 256 * 1024
#: Databases other state may keep beside the audit log (see Environment.open).
MAX_EXTRA_DATABASES: Final = 8

_MDB_MAGIC = 0xBEEFC0DE
_U64 = struct.Struct(">Q")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_CORRUPT = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.PanicError,
    lmdb.BadValsizeError,
)


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


# -- error translation -------------------------------------------------------------


def translate(exc: lmdb.Error, where: str) -> StorageError:
    """The Talos exception for an ``lmdb`` one raised while working on ``where``."""
    code = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
    if isinstance(exc, lmdb.MapFullError | lmdb.DiskError) or code in _FULL_ERRNOS:
        return AuditFull(f"audit log {where} is full: {exc.args[0] if exc.args else exc}")
    if isinstance(exc, _CORRUPT):
        return StoreCorrupted(f"audit log {where} is corrupted: {exc}", where=where, what="lmdb")
    return StorageError(f"audit log {where}: {exc}")


@contextlib.contextmanager
def lmdb_errors(where: str) -> Iterator[None]:
    """Turn ``lmdb.Error`` raised inside the block into its Talos exception."""
    try:
        yield
    except lmdb.Error as exc:
        raise translate(exc, where) from exc
