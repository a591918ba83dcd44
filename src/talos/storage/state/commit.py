"""One unit of work of the agent state: rows of several parts and the audit entries
that record them, written in **one** transaction of the audit log's environment.

The parts write through functions that take the open transaction; the façade
and the flows (:mod:`.receiving`, :mod:`.sending`) gather those writes into one
``apply(txn)`` and hand it to :meth:`UnitOfWork.commit`. Mutations hold
:attr:`UnitOfWork.lock` from their first read to their commit.

A write that may wait (:meth:`UnitOfWork.defer`: what a cache learned, which
is fetched again if it is lost; an application's acknowledgement, whose caller
waits for it) rides with the next commit, before that commit's own rows, and
is dropped from the waiting ones only once that commit is durable;
:meth:`UnitOfWork.flush` commits what waits alone, and
:meth:`UnitOfWork.withdraw` takes one back before any commit carries it.
:attr:`UnitOfWork.on_commit` is told of every durable commit (from the
thread that made it), so a caller waiting for its write learns when a commit
has carried it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple

from talos.storage.state.meta import Meta
from talos.storage.state.rows import LAYOUT_VERSION

if TYPE_CHECKING:
    import lmdb

    from talos.audit.log import AuditLog

#: Audit records to commit with a change: ``(kind, data, peer)``, e.g. AuditRecord.
AuditRecords = Iterable[tuple[str, Mapping[str, Any], str | None]]

Apply = Callable[["lmdb.Transaction[bytes]"], None]


class Unchanged(Exception):
    """Raised inside a commit that would change nothing: aborts it, audit entries included."""


class _Deferred(NamedTuple):
    value: object
    write: Apply


class UnitOfWork:
    """Commits through ``log.append_with``; the first commit also writes the header
    (or, for a state of an older layout, the current layout's number)."""

    def __init__(self, log: AuditLog, meta: Meta, *, initialized: bool) -> None:
        self.log = log
        #: Serializes mutations (LMDB has one writer; this also covers the reads before it).
        self.lock = threading.Lock()
        self._meta = meta
        self._initialized = initialized
        self._current = not initialized or meta.layout == LAYOUT_VERSION
        self._deferred: dict[Hashable, _Deferred] = {}
        #: Called (lock held, in the committing thread) after every durable commit.
        self.on_commit: Callable[[], None] | None = None

    def defer(self, key: Hashable, value: object, write: Apply) -> int:
        """(Lock held.) Run ``write`` in the next commit; a later one for ``key``
        replaces it. ``value`` is what :meth:`deferred` answers meanwhile.
        Returns how many writes wait."""
        self._deferred[key] = _Deferred(value, write)
        return len(self._deferred)

    def deferred(self, key: Hashable) -> object | None:
        """The value of the write waiting for ``key``, or None."""
        waiting = self._deferred.get(key)
        return None if waiting is None else waiting.value

    def waiting(self, key: Hashable) -> bool:
        """Whether a write for ``key`` waits for a commit."""
        return key in self._deferred

    def waiting_kind(self, kind: str) -> bool:
        """(Lock held.) Whether a write whose key is a tuple starting with ``kind`` waits
        (it will run first in the next commit)."""
        return any(type(key) is tuple and key[:1] == (kind,) for key in self._deferred)

    def withdraw(self, key: Hashable) -> bool:
        """(Lock held.) Drop the write waiting for ``key``; False if none waits (a
        commit carried it already, or it was never deferred)."""
        return self._deferred.pop(key, None) is not None

    def settled(self, key: Hashable) -> AbstractContextManager[object]:
        """Hold this around a read of ``key`` that consults :meth:`deferred`: while a write
        for it waits, the lock (a commit and the end of its deferred writes are one step
        to the reader); otherwise nothing."""
        return self.lock if key in self._deferred else contextlib.nullcontext()

    def flush(self) -> None:
        """(Lock held.) Commit the writes that wait, if any.

        Raises:
            AuditFull, StorageError: nothing was written (they still wait).
        """
        if self._deferred:
            self.commit((), _nothing)

    def commit(self, audit: AuditRecords, apply: Apply) -> bool:
        """Run ``apply`` and append ``audit`` in one transaction; False if ``apply`` said
        nothing changes (raised :class:`Unchanged`: then nothing, not even the audit
        entries, was written).

        Raises:
            LocalProtocolError: an invalid audit record (before the transaction).
            AuditFull: no room; nothing was written.
            StorageError: LMDB failed; nothing was written.
        """
        records = list(audit)
        deferred = dict(self._deferred)
        if deferred:
            apply = _in_order(*(waiting.write for waiting in deferred.values()), apply)
        if not self._initialized:
            run = _in_order(apply, self._meta.write_header)
        elif not self._current:
            run = _in_order(apply, self._meta.write_layout)
        else:
            run = apply
        try:
            self.log.append_with(records, run)
        except Unchanged:
            return False
        self._initialized = self._current = True
        for key, waiting in deferred.items():
            if self._deferred.get(key) is waiting:
                del self._deferred[key]
        if self.on_commit is not None:
            self.on_commit()
        return True


def _nothing(txn: lmdb.Transaction[bytes]) -> None:
    """A commit's own rows when it only carries deferred writes."""


def _in_order(*writes: Apply) -> Apply:
    """One write that runs ``writes`` in order, in the same transaction."""

    def run(txn: lmdb.Transaction[bytes]) -> None:
        for write in writes:
            write(txn)

    return run
