"""Queries over the audit log: filters by kind, peer and time, through the index.

Rules this module keeps:

* Kind and peer filters walk the ``index`` database (``b"k"``/``b"p"`` rows)
  below the index point (``meta["indexed"]``) and read every entry from it
  on: the index trails the log by fewer than
  :data:`~talos.audit.writer.INDEX_BATCH` entries. Time filters are binary
  searches over entry times, which never decrease.
* The index is a hint, never trusted: every returned entry is read with
  :meth:`talos.audit.store.AuditStore.entry` (re-hashed, decoded strictly)
  and re-checked against the filters, so a damaged index row cannot smuggle
  in a wrong entry.
* ``last`` walks backwards from the newest match and stops after ``last``.
* Below the pruning point only the kept entries (``KEPT_KINDS``) have a
  payload: a walk without kind or peer finds them through the index, the
  time search starts at the pruning point, and kept entries below it are
  checked against the times one by one. Pruned entries are never returned;
  callers say so from :meth:`talos.audit.AuditLog.pruning`.

Imported by :mod:`talos.audit.log`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import lmdb

from talos.audit.store import AuditStore, PrunedEntry, index_key
from talos.core.audit.entry import AuditEntry, check_kind, check_peer
from talos.core.audit.pruning import KEPT_KINDS
from talos.errors import LocalProtocolError
from talos.storage.lmdb import read_u64, u64

__all__ = ["Query"]


@dataclass(frozen=True, slots=True)
class Query:
    """Filters of :meth:`talos.audit.AuditLog.query`, checked (see :meth:`checked`)."""

    kind: str | None = None
    peer: str | None = None
    since: int | None = None
    until: int | None = None
    last: int | None = None

    @classmethod
    def checked(
        cls,
        kind: str | None,
        peer: str | None,
        since: int | None,
        until: int | None,
        last: int | None,
    ) -> Query:
        """Check the filters; kinds and peers are turned into plain text.

        Raises:
            LocalProtocolError: an invalid filter.
        """
        if last is not None and (type(last) is not int or last < 0):
            raise LocalProtocolError("last must be a non-negative integer")
        if kind is not None:
            kind = check_kind(kind)
        if peer is not None:
            peer = check_peer(peer)
        return cls(kind, peer, since, until, last)

    def run(self, store: AuditStore, txn: lmdb.Transaction[bytes], size: int) -> list[AuditEntry]:
        """Matching entries among the first ``size``, oldest first.

        Raises:
            StoreCorrupted: a matching entry fails its leaf hash.
        """
        kind, peer, last = self.kind, self.peer, self.last
        pruned = store.pruned_below(txn)
        since, until = self.since, self.until
        low = 0 if since is None else _first_at_or_after(store, txn, since, size, pruned)
        if low == pruned:
            low = 0  # the bound may lie among the pruned: kept entries are checked one by one
        high = size if until is None else _first_at_or_after(store, txn, until, size, pruned)
        reverse = last is not None
        if kind is not None:
            indexed = store.indexed_below(txn, size)
            seqs = _trailing_index_seqs(txn, store, b"k", kind, low, high, indexed, reverse)
        elif peer is not None:
            indexed = store.indexed_below(txn, size)
            seqs = _trailing_index_seqs(txn, store, b"p", peer, low, high, indexed, reverse)
        else:
            seqs = _plain_seqs(txn, store, low, high, pruned, reverse=reverse)
        found: list[AuditEntry] = []
        for seq in seqs:
            if last is not None and len(found) >= last:
                break
            entry = store.entry_or_pruned(txn, seq, size)
            if isinstance(entry, PrunedEntry):
                continue
            if seq < pruned and not _in_times(entry.time_ms, since, until):
                continue
            if (kind is None or entry.kind == kind) and (peer is None or entry.peer == peer):
                found.append(entry)
        if reverse:
            found.reverse()
        return found


def _in_times(time_ms: int, since: int | None, until: int | None) -> bool:
    return (since is None or time_ms >= since) and (until is None or time_ms < until)


def _first_at_or_after(
    store: AuditStore, txn: lmdb.Transaction[bytes], when: int, size: int, pruned: int
) -> int:
    """Smallest seq whose time is >= ``when``: a binary search, as times never decrease.

    Pruned entries have no time: the search runs from the pruning point,
    which it returns when the bound may lie below it.
    """
    low, high = pruned, size
    while low < high:
        mid = (low + high) // 2
        if store.entry(txn, mid, size).time_ms < when:
            low = mid + 1
        else:
            high = mid
    return low


def _plain_seqs(
    txn: lmdb.Transaction[bytes],
    store: AuditStore,
    low: int,
    high: int,
    pruned: int,
    *,
    reverse: bool,
) -> Iterator[int]:
    """Seqs in ``[low, high)``; below the pruning point only the kept entries (by the index)."""
    kept = sorted(
        seq
        for kind in KEPT_KINDS
        for seq in _index_seqs(txn, store, b"k", kind, low, min(high, pruned), reverse=False)
    )
    return _then(reversed(kept) if reverse else kept, range(max(low, pruned), high), reverse)


def _trailing_index_seqs(
    txn: lmdb.Transaction[bytes],
    store: AuditStore,
    prefix: bytes,
    value: str,
    low: int,
    high: int,
    indexed: int,
    reverse: bool,
) -> Iterator[int]:
    """Seqs in ``[low, high)`` that may match: the index's below ``indexed``, every one after."""
    indexed_part = _index_seqs(txn, store, prefix, value, low, min(high, indexed), reverse=reverse)
    return _then(indexed_part, range(max(low, indexed), high), reverse)


def _then(below: Iterable[int], rest: range, reverse: bool) -> Iterator[int]:
    """Seqs ``below`` (all under ``rest``, already in the wanted order), then ``rest``;
    reversed, ``rest`` backwards first."""
    if reverse:
        yield from reversed(rest)
        yield from below
    else:
        yield from below
        yield from rest


def _index_seqs(
    txn: lmdb.Transaction[bytes],
    store: AuditStore,
    prefix: bytes,
    value: str,
    low: int,
    high: int,
    *,
    reverse: bool,
) -> Iterator[int]:
    """Seqs in ``[low, high)`` of index rows for ``value``, in order or reversed."""
    if low >= high:
        return
    head = index_key(prefix, value, 0)[:-8]
    cursor = txn.cursor(db=store.index)
    if reverse:
        found = cursor.set_range(head + u64(high))
        moved = cursor.prev() if found else cursor.last()
        while moved:
            key = cursor.key()
            if not key.startswith(head) or len(key) != len(head) + 8:
                return
            seq = read_u64(key[-8:])
            if seq < low:
                return
            if seq < high:
                yield seq
            moved = cursor.prev()
        return
    if not cursor.set_range(head + u64(low)):
        return
    for key in cursor.iternext(keys=True, values=False):
        if not key.startswith(head) or len(key) != len(head) + 8:
            return
        seq = read_u64(key[-8:])
        if seq >= high:
            return
        yield seq
