"""Rebuilding an audit log from its entries: everything derived is derived again.

An audit log stores its entries and, beside them, what is derived from them:
the perfect-subtree nodes, the query index, the head (size, root, time) and
the signed blocks. This module writes that again from entries alone.

* :func:`write_log` is the core: it takes verified entries in order (their
  canonical bytes, seq 0, 1, 2 ...) and writes a fresh log -- entries, nodes,
  index rows, head -- into an environment, in one transaction, returning the
  root at each size asked for. Blocks that still match the rebuilt tree
  (chained, same range, same root, signed by a trusted key) are kept as they
  were signed; the first that does not, and every later one, is dropped, and
  the caller seals the rest with its own key (``AuditLog.seal_block``).
  ``talos audit rebuild`` and ``talos audit rebuild --from-peers`` both call it.
* :func:`read_intact` reads a damaged log's intact prefix: each entry must
  sit at its key, match its stored leaf hash, decode strictly, name its seq,
  and not go back in time. The scan stops at the first entry that does not;
  entries stored after it cannot be chained without the missing one and are
  counted as lost (docs/design/audit-recovery.md).

Rules this module keeps:

* Nothing is invented: an entry that is not intact ends the rebuilt log.
* The rebuilt tree is the RFC 9162 tree of the same entries, so every root,
  inclusion and consistency proof over intact entries is the one issued before.
* :func:`write_log` writes all or nothing; it refuses a target that already
  holds a log unless ``replace`` is set (the caller kept the old one aside).

Imported by the local rebuild (``talos audit rebuild``) and by the mirror's
``talos audit rebuild --from-peers``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import lmdb

from talos.audit.integrity import Broken, check_signature, decode_block
from talos.audit.store import FORMAT_VERSION, decode_stored, index_key
from talos.core.audit.checkpoint import GENESIS_HASH, Block
from talos.core.audit.entry import AuditEntry
from talos.core.audit.merkle import EMPTY_ROOT, HASH_SIZE, fold_subtrees
from talos.core.crypto import VerifyKey
from talos.errors import LocalProtocolError, StoreCorrupted
from talos.storage.environment import AUDIT_DATABASES, Environment
from talos.storage.lmdb import (
    DATA_FILE,
    DEFAULT_MAP_SIZE,
    lmdb_errors,
    open_environment,
    read_u64,
    salvage_rows,
    u64,
)

__all__ = ["IntactLog", "RebuiltLog", "read_intact", "salvage_intact", "write_log"]

_sha256 = hashlib.sha256
_pack_node = struct.Struct(">QB").pack  # audit.store.node_key: (last leaf, level)
_BATCH: Final = 4096


@dataclass(frozen=True, slots=True)
class RebuiltLog:
    """What :func:`write_log` wrote: size, root, kept blocks, and the roots asked for."""

    size: int
    root: bytes
    blocks: int
    #: Root of the tree at each size in ``checkpoints`` that the log reached.
    roots: dict[int, bytes] = field(default_factory=dict)
    #: Blocks offered that did not match the rebuilt tree (or came after one that did not).
    dropped_blocks: int = 0
    #: Why the first dropped block was dropped (``None`` if none was).
    block_problem: str | None = None


class _Tree:
    """The right border of the tree being rebuilt, and the rows each leaf adds."""

    def __init__(self) -> None:
        self.stack: list[bytes] = []
        self.size = 0
        self.time_ms = 0

    def push(self, raw: bytes, nodes: list[tuple[bytes, bytes]]) -> bytes:
        """Add leaf ``self.size``; append the perfect subtrees it completes to ``nodes``."""
        seq = self.size
        leaf = _sha256(b"\x00" + raw).digest()  # merkle.leaf_hash
        value, bits, level = leaf, seq, 0
        while bits & 1:
            value = _sha256(b"\x01" + self.stack.pop() + value).digest()  # merkle.node_hash
            bits >>= 1
            level += 1
            nodes.append((_pack_node(seq, level), value))
        self.stack.append(value)
        self.size = seq + 1
        return leaf

    def root(self) -> bytes:
        return fold_subtrees(self.stack) if self.stack else EMPTY_ROOT


def _checked_entry(seq: int, raw: bytes, last_time: int) -> AuditEntry:
    """The entry ``raw`` at position ``seq``: decodes strictly, names ``seq``, time goes on.

    Raises:
        StoreCorrupted: it does not.
    """
    entry = decode_stored(seq, raw)
    if entry.time_ms < last_time:
        raise StoreCorrupted(
            f"audit entry {seq} goes back in time", where=f"seq {seq}", what="time"
        )
    return entry


class _Blocks:
    """Keeps offered blocks while they match the rebuilt tree; drops the rest."""

    def __init__(self, blocks: Iterable[Block], trusted: Collection[VerifyKey] | None) -> None:
        self._offered = iter(blocks)
        self._trusted = None if trusted is None else {key.raw: key for key in trusted}
        self.kept: list[Block] = []
        self.previous = GENESIS_HASH
        self.sealed = 0
        self.problem: str | None = None
        self.dropped = 0
        self._next: Block | None = self._take()

    def _take(self) -> Block | None:
        return next(self._offered, None) if self.problem is None else None

    def reached(self, tree: _Tree) -> None:
        """Keep each offered block that ends at ``tree.size`` and matches it."""
        while self._next is not None and self._next.tree_size <= tree.size:
            block = self._next
            self._next = None
            problem = self._mismatch(block, tree)
            if problem is not None:
                self._stop(problem)
                return
            self.kept.append(block)
            self.previous, self.sealed = block.block_hash(), block.tree_size
            self._next = self._take()

    def _mismatch(self, block: Block, tree: _Tree) -> str | None:
        height = len(self.kept)
        checks = [
            (block.height != height, "names another height"),
            (block.previous != self.previous, "previous-block hash does not match"),
            (block.first_seq != self.sealed, "range does not follow the last block"),
            (block.tree_size != tree.size, "range does not match the entries"),
            (block.root != tree.root(), "root does not match the entries"),
        ]
        for bad, what in checks:
            if bad:
                return f"block {block.height}: {what}"
        try:
            check_signature(block, None if self._trusted is None else dict(self._trusted))
        except Broken as broken:
            return f"block {block.height}: {broken.problem.what}"
        return None

    def _stop(self, problem: str) -> None:
        self.problem = problem
        self.dropped += 1 + sum(1 for _ in self._offered)

    def finish(self) -> None:
        """Count the blocks offered beyond the rebuilt log as dropped."""
        if self._next is not None:
            self._stop(f"block {self._next.height}: beyond the rebuilt entries")


def write_log(
    environment: Environment,
    entries: Iterable[bytes],
    *,
    blocks: Iterable[Block] = (),
    checkpoints: Collection[int] = (),
    trusted_keys: Collection[VerifyKey] | None = None,
    replace: bool = False,
) -> RebuiltLog:
    """Write a fresh audit log of ``entries`` into ``environment``, in one transaction.

    ``entries`` are the canonical bytes of entries 0, 1, 2 ... in order. Each
    must decode strictly, name its position as its seq and not go back in
    time; the caller has verified them against what it trusts (the mirror:
    batches and cosigned checkpoints; the local rebuild: stored leaf hashes).
    Entries, nodes, index rows and the head are written exactly as the
    writer (:mod:`talos.audit.writer`) would have, so the result passes
    ``verify_chain`` and new appends extend it.

    ``blocks`` (in height order) are kept while each one follows the last,
    covers the next range, carries the rebuilt root at its size and is signed
    (by one of ``trusted_keys`` when given); from the first that is not,
    none is kept (see :attr:`RebuiltLog.dropped_blocks`). Entries past the
    last kept block are unsealed: seal them with ``AuditLog.seal_block``.

    Returns the size, the root, the blocks kept, and the root at every size
    in ``checkpoints`` that the rebuilt log reached (compare them with the
    checkpoints a witness cosigned or the chain anchored).

    Raises:
        LocalProtocolError: ``environment`` already holds an audit log and
            ``replace`` is not set, or it is read-only.
        StoreCorrupted: an entry is not the next one (nothing is written).
        AuditFull, StorageError: LMDB failed (nothing is written).
    """
    if environment.readonly:
        raise LocalProtocolError("cannot rebuild an audit log into a read-only environment")
    wanted = set(checkpoints)
    tree = _Tree()
    kept = _Blocks(blocks, trusted_keys)
    roots: dict[int, bytes] = {}
    db = environment.audit
    with environment.write() as txn:
        _clear(txn, db, replace, environment.path)
        entry_rows: list[tuple[bytes, bytes]] = []
        node_rows: list[tuple[bytes, bytes]] = []
        index_rows: list[tuple[bytes, bytes]] = []
        for raw in entries:
            raw = bytes(raw)
            seq = tree.size
            entry = _checked_entry(seq, raw, tree.time_ms)
            leaf = tree.push(raw, node_rows)
            tree.time_ms = entry.time_ms
            key = u64(seq)
            entry_rows.append((key, leaf + raw))
            index_rows.append((index_key(b"k", entry.kind, seq), b""))
            if entry.peer is not None:
                index_rows.append((index_key(b"p", entry.peer, seq), b""))
            if tree.size in wanted:
                roots[tree.size] = tree.root()
            kept.reached(tree)
            if len(entry_rows) >= _BATCH:
                _flush(txn, db, entry_rows, node_rows, index_rows)
        _flush(txn, db, entry_rows, node_rows, index_rows)
        kept.finish()
        _put_blocks(txn, db, kept.kept)
        root = tree.root()
        txn.put(b"format", u64(FORMAT_VERSION), db=db.meta)
        txn.put(b"size", u64(tree.size), db=db.meta)
        txn.put(b"root", root, db=db.meta)
        txn.put(b"time", u64(tree.time_ms), db=db.meta)
    return RebuiltLog(tree.size, root, len(kept.kept), roots, kept.dropped, kept.problem)


def _clear(txn: lmdb.Transaction[bytes], db: Any, replace: bool, path: Path) -> None:
    """Empty the audit databases (only with ``replace``; else they must be empty)."""
    handles = (db.entries, db.nodes, db.blocks, db.index, db.meta)
    if not replace:
        if any(txn.stat(handle)["entries"] for handle in handles):
            raise LocalProtocolError(f"{path} already holds an audit log")
        return
    for handle in handles:
        txn.drop(handle, delete=False)


def _flush(
    txn: lmdb.Transaction[bytes],
    db: Any,
    entry_rows: list[tuple[bytes, bytes]],
    node_rows: list[tuple[bytes, bytes]],
    index_rows: list[tuple[bytes, bytes]],
) -> None:
    """Write the gathered rows (entry and node keys only grow) and empty the lists."""
    if entry_rows:
        txn.cursor(db=db.entries).putmulti(entry_rows, append=True)
    if node_rows:
        txn.cursor(db=db.nodes).putmulti(node_rows, append=True)
    if index_rows:
        txn.cursor(db=db.index).putmulti(index_rows)
    entry_rows.clear()
    node_rows.clear()
    index_rows.clear()


def _put_blocks(txn: lmdb.Transaction[bytes], db: Any, blocks: list[Block]) -> None:
    for block in blocks:
        txn.put(u64(block.height), block.to_bytes(), db=db.blocks, append=True)
    if blocks:
        txn.put(b"blocks", u64(len(blocks)), db=db.meta)
        txn.put(b"block_hash", blocks[-1].block_hash(), db=db.meta)


# -- reading what is intact -------------------------------------------------------------


@dataclass(slots=True)
class IntactLog:
    """What :func:`read_intact` found: the intact prefix and what follows it."""

    #: How many entries are intact (entries ``0 .. intact - 1``).
    intact: int = 0
    #: The first position that is not intact (``None``: every stored entry is).
    first_bad: int | None = None
    #: Why that position is not intact.
    problem: str | None = None
    #: Entry rows stored from the first bad position on (they cannot be chained: lost).
    stored_after: int = 0
    #: The size the damaged log's metadata recorded (``None`` if unreadable).
    recorded_size: int | None = None
    #: Read from the pages of a file LMDB cannot open (:func:`salvage_intact`).
    salvaged: bool = False

    @property
    def lost(self) -> int:
        """Entries the damaged log held, or said it held, beyond the intact prefix."""
        recorded = self.recorded_size or 0
        return max(recorded - self.intact, self.stored_after)


class _Source:
    """A damaged log opened read-only, without a lock, its databases looked up by name."""

    def __init__(self, path: Path) -> None:
        self._env = open_environment(
            path,
            store="audit log",
            readonly=True,
            lock=False,
            verify_structure=False,
            max_dbs=16,
            map_size=DEFAULT_MAP_SIZE,
        )
        self.path = path

    def close(self) -> None:
        self._env.close()

    def database(self, txn: lmdb.Transaction[bytes], name: str) -> Any | None:
        try:
            return self._env.open_db(name.encode(), txn=txn, create=False)
        except lmdb.Error:
            return None

    def begin(self) -> lmdb.Transaction[bytes]:
        return self._env.begin()


@dataclass(slots=True)
class _Reading:
    source: _Source
    found: IntactLog
    txn: lmdb.Transaction[bytes] | None = None
    dbs: dict[str, Any] = field(default_factory=dict)


def read_intact(path: Path) -> tuple[IntactLog, Iterator[bytes], Iterator[Block], Any]:
    """Open the damaged log in ``path`` read-only and read what is intact.

    Returns ``(found, entries, blocks, close)``: ``entries`` yields the raw
    bytes of the intact prefix (and fills ``found`` as it goes: read it
    after ``entries`` is exhausted); ``blocks`` yields the stored blocks that
    decode, in height order, until the first that does not; call
    ``close()`` when done. The log is never written.

    Raises:
        StoreCorrupted: the data file cannot be read at all (not LMDB,
            truncated past its committed pages).
        StorageError: it cannot be opened.
    """
    reading = _Reading(_Source(path), IntactLog())
    with lmdb_errors(str(path)):
        reading.txn = reading.source.begin()
        for name in AUDIT_DATABASES:
            reading.dbs[name] = reading.source.database(reading.txn, name)
        meta = reading.dbs["meta"]
        raw_size = None if meta is None else reading.txn.get(b"size", db=meta)
        if raw_size is not None and len(raw_size) == 8:
            reading.found.recorded_size = read_u64(raw_size)

    def close() -> None:
        if reading.txn is not None:
            reading.txn.abort()
        reading.source.close()

    return reading.found, _intact_entries(reading), _stored_blocks(reading), close


def _intact_entries(reading: _Reading) -> Iterator[bytes]:
    found, txn, db = reading.found, reading.txn, reading.dbs["entries"]
    if db is not None and txn is not None:
        last_time = 0
        cursor = txn.cursor(db=db)
        with lmdb_errors(str(reading.source.path)):
            for key, value in cursor:
                seq = found.intact
                checked = _entry_problem(seq, bytes(key), bytes(value), last_time)
                if isinstance(checked, str):
                    found.first_bad, found.problem = seq, checked
                    # iternext starts at the current row: the bad one is counted too
                    found.stored_after = sum(1 for _ in cursor.iternext(values=False))
                    return
                last_time = checked.time_ms
                found.intact += 1
                yield bytes(value[HASH_SIZE:])
    if found.recorded_size is not None and found.recorded_size > found.intact:
        found.first_bad, found.problem = found.intact, "entry missing"


def _entry_problem(seq: int, key: bytes, value: bytes, last_time: int) -> AuditEntry | str:
    """The entry stored at ``seq``, or what is wrong with it."""
    if key != u64(seq):
        return "entry missing"
    raw = value[HASH_SIZE:]
    if len(value) <= HASH_SIZE or _sha256(b"\x00" + raw).digest() != value[:HASH_SIZE]:
        return "entry bytes do not match the stored leaf hash"
    try:
        return _checked_entry(seq, raw, last_time)
    except StoreCorrupted as exc:
        return str(exc)


def _stored_blocks(reading: _Reading) -> Iterator[Block]:
    txn, db = reading.txn, reading.dbs["blocks"]
    if db is None or txn is None:
        return
    with lmdb_errors(str(reading.source.path)):
        for height, (key, value) in enumerate(txn.cursor(db=db)):
            if key != u64(height):
                return
            try:
                yield decode_block(height, bytes(value))
            except Broken:
                return


def salvage_intact(path: Path) -> tuple[IntactLog, list[bytes]]:
    """The intact prefix of a log whose data file LMDB cannot open (truncated).

    Reads every leaf row still in the file (:func:`~talos.storage.lmdb.salvage_rows`,
    plain reads) and keeps the rows that are entries: an 8-byte key, a value
    whose stored leaf hash matches its bytes, which decode strictly and name
    that key as their seq. An entry is its own proof, so a copy found in a
    freed page is as good as the current one. The prefix ends at the first
    seq with no copy, with two different copies, or whose time goes back.

    Raises:
        StoreCorrupted: the file is not an LMDB data file.
        StorageError: it cannot be read.
    """
    copies: dict[int, set[bytes]] = {}
    for key, value in salvage_rows(path / DATA_FILE):
        if len(key) != 8 or len(value) <= HASH_SIZE:
            continue
        raw = bytes(value[HASH_SIZE:])
        if _sha256(b"\x00" + raw).digest() != value[:HASH_SIZE]:
            continue
        seq = read_u64(bytes(key))
        try:
            _checked_entry(seq, raw, 0)
        except StoreCorrupted:
            continue
        copies.setdefault(seq, set()).add(raw)
    found, entries, last_time = IntactLog(), [], 0
    while len(copies.get(found.intact, ())) == 1:
        (raw,) = copies[found.intact]
        entry = AuditEntry.from_bytes(raw)
        if entry.time_ms < last_time:
            break
        last_time = entry.time_ms
        entries.append(raw)
        found.intact += 1
    later = [seq for seq in copies if seq >= found.intact]
    if later or found.intact == 0:
        found.first_bad = found.intact
        found.problem = (
            "two different entries" if len(copies.get(found.intact, ())) > 1 else "entry missing"
        ) + " (salvaged from a damaged data file)"
        found.stored_after = len(later)
    return found, entries
