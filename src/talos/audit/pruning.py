"""Pruning an anchored log (``prune_after_anchor``): one LMDB transaction per step.

The rules are in :mod:`talos.core.audit.pruning`; this module applies them
to the stored log. A step:

1. in a read snapshot, finds the newest ``AUDIT_ANCHORED`` entry, checks
   the log's root at the anchored size against it, and walks the entries
   from the pruning point towards the anchored size (and the last sealed
   block), re-hashing each, until it has ``limit`` payloads to drop;
2. in one write transaction (the writer's, so the head check, the lock and
   the ``AuditFull`` translation are the usual ones) appends the
   ``AUDIT_PRUNED`` entry, rewrites each of those rows as its leaf hash
   alone, deletes their index rows, and moves ``meta["pruned"]`` and
   ``meta["pruned_entries"]`` forward. If the pruning point moved meanwhile
   (another process pruned), the transaction is abandoned and planned again.

A crash (even ``kill -9``) therefore leaves the log as it was before or
after a whole step. Each step is logged (``audit_pruned``) and handed to
the watchers (the agent counts ``talos_audit_pruned_entries_total``).

With ``prune_after_anchor`` and a size limit, the log prunes for space
(:meth:`Pruner.check_room`) after each sealed block once the data file
holds 90% of the limit: pruning needs free pages itself (LMDB copies every
page it changes), so it cannot wait for a map that is completely full. The
writer still calls :meth:`Pruner.make_room` when an append does not fit,
and appends again if payloads were dropped.

Imported by :mod:`talos.audit.log`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import cbor2
import lmdb

from talos.audit.reading import Query
from talos.audit.records import prepare
from talos.audit.store import AuditStore, index_key
from talos.audit.writer import LogWriter
from talos.core.audit.entry import AuditEntry, AuditKind
from talos.core.audit.pruning import (
    DEFAULT_STEP,
    anchor_problem,
    drops_payload,
    pruned_record,
    step_end,
)
from talos.errors import AuditFull, StorageError, StoreCorrupted, TalosError
from talos.storage.lmdb import DATA_FILE, u64

__all__ = ["PruneStep", "Pruner", "Pruning"]

_log = logging.getLogger("talos.audit")

#: Step sizes tried, in turn, when the log is full (a smaller step needs fewer free pages).
_ROOM_STEPS: Final = (4096, 256, 16)

#: The share of the size limit the data file may reach before the log prunes for space.
ROOM_THRESHOLD: Final = 0.9


@dataclass(frozen=True, slots=True)
class Pruning:
    """How much of a log is pruned: the pruning point and the payloads dropped below it."""

    below: int
    entries: int


@dataclass(frozen=True, slots=True)
class PruneStep:
    """One committed pruning step."""

    start: int
    end: int
    entries: int
    anchor_size: int
    #: The seq of the step's ``AUDIT_PRUNED`` entry.
    seq: int


@dataclass(frozen=True, slots=True)
class _Plan:
    start: int
    end: int
    anchor: AuditEntry
    #: (seq, leaf hash, index keys) of each entry whose payload goes.
    drops: list[tuple[int, bytes, tuple[bytes, ...]]]


class _Raced(StorageError):
    """The pruning point moved since the step was planned: plan again."""


class Pruner:
    """Prunes ``store`` through ``writer``; ``enabled`` is ``prune_after_anchor``."""

    def __init__(self, store: AuditStore, writer: LogWriter, *, enabled: bool) -> None:
        self._store = store
        self._writer = writer
        self.enabled = enabled
        self._watchers: list[Callable[[PruneStep], None]] = []
        self._refused: str | None = None
        self._busy = False
        self._holds: list[Callable[[], int]] = []

    def watch(self, callback: Callable[[PruneStep], None]) -> None:
        """Call ``callback(step)`` after each committed step."""
        self._watchers.append(callback)

    def hold(self, needed_below: Callable[[], int]) -> None:
        """Never prune, after an anchor, at or past ``needed_below()`` (the smallest size a
        mirror of this log has acknowledged: what is not mirrored yet keeps its payload).
        Pruning for space (a full log) ignores holds: a full log stops the agent."""
        self._holds.append(needed_below)

    def state(self) -> Pruning:
        """The pruning point and the payloads dropped so far."""
        store = self._store
        with store.read() as txn:
            return Pruning(store.pruned_below(txn), store.meta_count(txn, b"pruned_entries"))

    def prune(self, *, limit: int = DEFAULT_STEP, reason: str = "anchor") -> list[PruneStep]:
        """Drop every payload a final anchor covers, ``limit`` per transaction.

        Raises:
            LocalProtocolError: the log is read-only or closed.
            StoreCorrupted: an entry to prune does not match its leaf hash.
            AuditFull, StorageError: as for an append; earlier steps stay done.
        """
        steps = []
        while (step := self.step(limit, reason=reason)) is not None:
            steps.append(step)
        return steps

    def make_room(self) -> bool:
        """Prune for space (an append did not fit); whether any payload was dropped.

        Never raises: a log that cannot be pruned is as full as it was.
        """
        return self._make_room(steps=None)

    def check_room(self) -> None:
        """Prune for space if the data file holds :data:`ROOM_THRESHOLD` of the size limit.

        One step at most (it runs in the writing thread, after a block was
        sealed): the next blocks take the next steps.
        """
        limit = self._store.environment.max_size_bytes
        if not self.enabled or limit is None or self._busy:
            return
        try:
            used = (self._store.path / DATA_FILE).stat().st_size
        except OSError:
            return
        if used >= limit * ROOM_THRESHOLD:
            self._make_room(steps=1)

    def _make_room(self, *, steps: int | None) -> bool:
        """Up to ``steps`` steps (None: all), smaller ones when a step does not fit."""
        if not self.enabled or self._busy:
            return False
        self._busy = True
        dropped, done, sizes = 0, 0, list(_ROOM_STEPS)
        try:
            while sizes and (steps is None or done < steps):
                try:
                    step = self.step(sizes[0], reason="space")
                except AuditFull:
                    sizes.pop(0)  # too big for the pages left: a smaller step
                    continue
                except TalosError as exc:
                    self._failed(exc)
                    break
                if step is None:
                    break
                dropped += step.entries
                done += 1
        finally:
            self._busy = False
        return dropped > 0

    def step(self, limit: int = DEFAULT_STEP, *, reason: str = "anchor") -> PruneStep | None:
        """One step of at most ``limit`` payloads, or None when nothing is left to prune.

        Raises:
            As :meth:`prune`.
        """
        if limit < 1:
            raise ValueError("a pruning step drops at least one payload")
        self._writer.check_writable()
        for _ in range(3):
            plan = self._plan(limit, held=None if reason == "space" else self._held())
            if plan is None:
                return None
            try:
                return self._commit(plan, reason)
            except _Raced:
                continue
        raise StorageError(f"audit log {self._store.path}: another process keeps pruning it")

    # -- planning ------------------------------------------------------------------------

    def _held(self) -> int | None:
        sizes = [needed() for needed in self._holds]
        return min(sizes) if sizes else None

    def _plan(self, limit: int, *, held: int | None) -> _Plan | None:
        store = self._store
        with store.read() as txn:
            size = store.meta_count(txn, b"size")
            start = store.pruned_below(txn)
            anchors = Query(kind=AuditKind.AUDIT_ANCHORED.value, last=1).run(store, txn, size)
            if not anchors:
                return None
            anchor = anchors[0]
            anchored = anchor.data.get("size")
            root = store.fold(txn, anchored) if type(anchored) is int and anchored <= size else None
            problem = anchor_problem(anchor.data, size, root)
            if problem is not None or type(anchored) is not int:
                self._refuse(problem or "no anchored size", anchor.seq)
                return None
            end = step_end(pruned=start, anchored=anchored, sealed=_sealed(store, txn), held=held)
            drops: list[tuple[int, bytes, tuple[bytes, ...]]] = []
            seq = start
            while seq < end and len(drops) < limit:
                leaf = store.leaf(txn, seq)  # re-hashed: never prune damage away
                kind, peer = _kind_and_peer(seq, bytes(store.entry_row(txn, seq) or b"")[32:])
                if drops_payload(kind):
                    drops.append((seq, leaf, _index_keys(seq, kind, peer)))
                seq += 1
        if not drops:
            return None
        return _Plan(start, seq, anchor, drops)

    def _refuse(self, problem: str, seq: int) -> None:
        if problem != self._refused:
            _log.warning(
                "not pruning the audit log: %s (entry %d)",
                problem,
                seq,
                extra={"event": "audit_prune_refused", "entry": seq},
            )
        self._refused = problem

    # -- committing ----------------------------------------------------------------------

    def _commit(self, plan: _Plan, reason: str) -> PruneStep:
        store = self._store
        count = len(plan.drops)
        data = pruned_record(
            start=plan.start,
            end=plan.end,
            entries=count,
            anchor_seq=plan.anchor.seq,
            anchor=plan.anchor.data,
        )

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            if store.pruned_below(txn) != plan.start:
                raise _Raced("the pruning point moved")
            # Deletes first, then the leaf hashes back: a delete merges pages that
            # fall below a quarter full, a shrinking put does not (LMDB), so
            # rewriting in place would free no page at all.
            for seq, _, keys in plan.drops:
                txn.delete(u64(seq), db=store.entries)
                for key in keys:
                    txn.delete(key, db=store.index)
            for seq, leaf, _ in plan.drops:
                txn.put(u64(seq), leaf, db=store.entries)
            done = store.meta_count(txn, b"pruned_entries")
            txn.put(b"pruned", u64(plan.end), db=store.meta)
            txn.put(b"pruned_entries", u64(done + count), db=store.meta)

        record = prepare(AuditKind.AUDIT_PRUNED.value, data, None)
        # index=True: the entries it prunes keep (or lose) their index rows
        # here, and the pruning point never passes the index (audit.store).
        [seq] = self._writer.commit([record], apply, room=False, index=True)
        step = PruneStep(plan.start, plan.end, count, data["anchor_size"], seq)
        _log.info(
            "pruned %d audit entries below %d (anchored at size %d)",
            count,
            plan.end,
            step.anchor_size,
            extra={
                "event": "audit_pruned",
                "entries": count,
                "below": plan.end,
                "anchor_size": step.anchor_size,
                "entry": seq,
                "reason": reason,
            },
        )
        for callback in self._watchers:
            callback(step)
        return step

    def _failed(self, exc: Exception) -> None:
        _log.warning(
            "pruning the audit log failed: %s",
            exc,
            extra={"event": "audit_prune_failed", "reason": type(exc).__name__},
        )


def _sealed(store: AuditStore, txn: lmdb.Transaction[bytes]) -> int:
    """The tree size at the end of the last sealed block (0 before the first)."""
    blocks = store.meta_count(txn, b"blocks")
    return store.block(txn, blocks - 1).tree_size if blocks else 0


def _kind_and_peer(seq: int, raw: bytes) -> tuple[str, str | None]:
    """The kind and peer of an entry whose bytes matched their leaf hash.

    A plain decode (about 10x faster than the strict one): the bytes are the
    committed ones, only the two index keys and the kind are needed.

    Raises:
        StoreCorrupted: they do not decode to an entry.
    """
    try:
        obj = cbor2.loads(raw)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError):
        obj = None
    kind = obj.get("k") if isinstance(obj, dict) else None
    peer = obj.get("p") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or not (peer is None or isinstance(peer, str)):
        raise StoreCorrupted(
            f"audit entry {seq} does not decode", where=f"seq {seq}", what="undecodable"
        )
    return kind, peer


def _index_keys(seq: int, kind: str, peer: str | None) -> tuple[bytes, ...]:
    keys = [index_key(b"k", kind, seq)]
    if peer is not None:
        keys.append(index_key(b"p", peer, seq))
    return tuple(keys)
