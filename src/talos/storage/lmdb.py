"""The LMDB backend of the audit log: layout, safe opening, error translation.

Layout of an audit log directory (an LMDB environment)::

    data.mdb, lock.mdb          the LMDB files
    sub-database "entries"      u64be(seq)                 -> leaf hash (32) || entry CBOR
    sub-database "nodes"        u64be(last leaf) || u8(level) -> 32-byte hash, levels >= 1
    sub-database "blocks"       u64be(height)              -> block CBOR
    sub-database "index"        b"k" kind 0x00 u64be(seq)  -> b"" (and b"p" peer 0x00 seq)
    sub-database "meta"         b"size", b"root", b"time", b"blocks", b"block_hash", b"format"

Perfect-subtree nodes are keyed by the index of their *last* leaf, then their
level: appending leaf ``i`` completes exactly the nodes whose last leaf is
``i`` (lowest level first), so every append writes keys in increasing order
and LMDB can take them with ``append=True``. Level-0 nodes (leaf hashes) live
beside the entry they hash, which saves a put per append.

Rules this module keeps:

* Durability: the environment is opened with ``sync=True`` and
  ``metasync=True`` and without ``writemap``/``map_async``, so a committed
  write transaction is on disk when ``commit`` returns.
* Size: ``max_size_bytes`` becomes the LMDB map size, so LMDB refuses to grow
  the file past it (``MapFullError``); without a limit the map is 1 TiB of
  address space, which costs nothing until used.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import lmdb
import lmdb.verify

from talos.core.audit.merkle import NodeID
from talos.errors import AuditFull, ConfigurationError, StorageError, StoreCorrupted

__all__ = [
    "DATA_FILE",
    "DEFAULT_MAP_SIZE",
    "MIN_SIZE_BYTES",
    "AuditStore",
    "DataFileInfo",
    "check_data_file",
    "index_key",
    "node_key",
    "u64",
]

DATA_FILE: Final = "data.mdb"

#: Map size (address space, not disk) when the caller sets no limit.
DEFAULT_MAP_SIZE: Final = 1 << 40

#: Smallest ``max_size_bytes`` accepted: room for the metadata and a few pages.
MIN_SIZE_BYTES: Final = 256 * 1024
#: Databases other state may keep in the audit environment (see AuditStore.open).
MAX_EXTRA_DATABASES: Final = 8

_MDB_MAGIC = 0xBEEFC0DE
_U64 = struct.Struct(">Q")
_NODE = struct.Struct(">QB")
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


def node_key(node: NodeID) -> bytes:
    """Key of a stored perfect subtree: its last leaf, then its level."""
    return _NODE.pack(((node.index + 1) << node.level) - 1, node.level)


def index_key(prefix: bytes, value: str, seq: int) -> bytes:
    """Key of a query index row (``b"k"`` for kinds, ``b"p"`` for peers)."""
    return prefix + value.encode("utf-8") + b"\x00" + _U64.pack(seq)


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


# -- the store -----------------------------------------------------------------------


class AuditStore:
    """An open audit-log environment and its five sub-databases.

    The object does no audit logic; :class:`talos.audit.AuditLog` does. It
    owns opening, transactions and error translation.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        path: Path,
        max_size_bytes: int | None,
        readonly: bool,
        extra_databases: Sequence[str] = (),
    ) -> None:
        self.env = env
        self.path = path
        self.max_size_bytes = max_size_bytes
        self.readonly = readonly
        with lmdb_errors(str(path)):
            txn = None if readonly else env.begin(write=True)
            try:
                self.entries = env.open_db(b"entries", txn=txn, create=not readonly)
                self.nodes = env.open_db(b"nodes", txn=txn, create=not readonly)
                self.blocks = env.open_db(b"blocks", txn=txn, create=not readonly)
                self.index = env.open_db(b"index", txn=txn, create=not readonly)
                self.meta = env.open_db(b"meta", txn=txn, create=not readonly)
                #: Databases of the agent's own state that share this environment,
                #: so one transaction can cover an audit entry and the state it records.
                self.extra: dict[str, Any] = {
                    name: env.open_db(b"x:" + name.encode(), txn=txn, create=not readonly)
                    for name in extra_databases
                }
            except BaseException:
                if txn is not None:
                    txn.abort()
                raise
            if txn is not None:
                txn.commit()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        max_size_bytes: int | None = None,
        readonly: bool = False,
        lock: bool = True,
        verify_structure: bool = False,
        extra_databases: Sequence[str] = (),
    ) -> AuditStore:
        """Open (or create, unless ``readonly``) the environment in directory ``path``.

        ``lock=False`` (read-only only) opens a copy that no writer uses, such
        as a backup, without creating ``lock.mdb`` in it. ``extra_databases``
        names databases of other state kept in the same environment (at most
        :data:`MAX_EXTRA_DATABASES`; stored as ``x:<name>``).

        Raises:
            ConfigurationError: ``max_size_bytes`` is below :data:`MIN_SIZE_BYTES`.
            StoreCorrupted: the data file fails :func:`check_data_file` or LMDB
                finds it invalid.
            StorageError: the directory is missing (read-only) or cannot be used.
        """
        if len(extra_databases) > MAX_EXTRA_DATABASES:
            raise ConfigurationError(f"at most {MAX_EXTRA_DATABASES} extra databases")
        if max_size_bytes is not None and max_size_bytes < MIN_SIZE_BYTES:
            raise ConfigurationError(f"max_size_bytes must be at least {MIN_SIZE_BYTES}")
        if readonly and not (path / DATA_FILE).exists():
            raise StorageError(f"no audit log in {path}")
        check_data_file(path / DATA_FILE, full=verify_structure)
        map_size = DEFAULT_MAP_SIZE if max_size_bytes is None else max_size_bytes
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        map_size -= map_size % page
        try:
            if not readonly:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"could not create {path}: {exc.strerror or exc}") from exc
        with lmdb_errors(str(path)):
            env = lmdb.Environment(
                str(path),
                map_size=map_size,
                subdir=True,
                readonly=readonly,
                lock=lock or not readonly,
                sync=True,
                metasync=True,
                writemap=False,
                map_async=False,
                meminit=False,
                max_dbs=8 + MAX_EXTRA_DATABASES,
                max_readers=126,
                mode=0o600,
            )
        try:
            return cls(env, path, max_size_bytes, readonly, extra_databases)
        except BaseException:
            env.close()
            raise

    def close(self) -> None:
        self.env.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction[bytes]]:
        """A read transaction (a consistent snapshot), errors translated."""
        with lmdb_errors(str(self.path)):
            txn = self.env.begin()
            try:
                yield txn
            finally:
                txn.abort()

    @contextlib.contextmanager
    def write(self) -> Iterator[lmdb.Transaction[bytes]]:
        """A write transaction, committed (and synced) when the block ends without error.

        Raises:
            AuditFull: the map is full, the size limit is reached, or the disk is full.
            StoreCorrupted: LMDB found corruption.
            StorageError: any other LMDB failure.
        """
        with lmdb_errors(str(self.path)):
            txn = self.env.begin(write=True)
            try:
                yield txn
            except BaseException:
                txn.abort()
                raise
            txn.commit()

    def used_bytes(self) -> int:
        """Bytes of the data file in use (last page × page size)."""
        with lmdb_errors(str(self.path)):
            info, stat = self.env.info(), self.env.stat()
        return (int(info["last_pgno"]) + 1) * int(stat["psize"])

    def copy_to(self, dest: Path) -> None:
        """Write a compacted, consistent copy of the environment into directory ``dest``.

        Raises:
            StorageError: ``dest`` cannot be written (or the disk is full).
        """
        with lmdb_errors(str(dest)):
            self.env.copy(str(dest), compact=True)

    # -- typed reads ---------------------------------------------------------------

    def entry(self, txn: lmdb.Transaction[bytes], seq: int) -> bytes | None:
        """The stored value of entry ``seq``: leaf hash (32) || entry bytes."""
        return txn.get(u64(seq), db=self.entries)

    def node(self, txn: lmdb.Transaction[bytes], node: NodeID) -> bytes | None:
        """The stored hash of a perfect subtree (level 0 is the stored leaf hash)."""
        if node.level == 0:
            value = txn.get(u64(node.index), db=self.entries)
            return None if value is None else value[:32]
        return txn.get(node_key(node), db=self.nodes)

    def meta_value(self, txn: lmdb.Transaction[bytes], key: bytes) -> bytes | None:
        return txn.get(key, db=self.meta)
