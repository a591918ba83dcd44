"""The replay set on disk: one time-ordered row per accepted id, and a floor.

Owns the ``replay`` database::

    b"t" u64be(timestamp) id  -> b""        (for pruning and rebuilding, in time order)
    b"i" id                   -> u64be(timestamp ms)   (layout 1 only; see below)

and the ``replay_floor`` row of ``agent``. The in-memory
:class:`~talos.core.replay.ReplayWindow` is rebuilt from these rows on open
(:meth:`ReplayRows.load`); the façade records into it only after a commit.
The stored floor keeps ids forgotten before a restart stale even if the clock
was stepped back.

The stored floor trails the window's by less than :data:`FLOOR_STEP_MS`: a
receive writes it only when the window's floor has moved that far past it,
so most receive commits leave ``agent`` alone (one B-tree page less). Rows
are deleted only below the *stored* floor, never below the window's, so
every id at or above the stored floor keeps its row, and a restart that
reloads from the stored floor refuses each of them again: a trailing floor
makes the reloaded window stricter than the running one, never looser.

Layout 2 writes no ``b"i"`` row: the window, checked before every receive
commit and rebuilt from the ``b"t"`` rows, is what refuses a known id, so a
per-id row only cost each receive a page at a random place in the tree (ids
are random) and each pruned id another. An id accepted again after the
window forgot it (its timestamp fell below the floor) may then hold two
``b"t"`` rows until the older one is pruned: :meth:`ReplayRows.load` keeps
the later one. Layout-1 ``b"i"`` rows are deleted as their ids expire.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from talos.core.encoding import canonical_dumps
from talos.core.replay import MAX_ID_SIZE, REPLAY_FORMAT_VERSION, ReplayWindow
from talos.errors import DuplicateMessage, MalformedFrame, UnsupportedVersion
from talos.storage.state.meta import Meta
from talos.storage.state.rows import U64, corrupt

if TYPE_CHECKING:
    import lmdb

#: Most replay rows deleted per receive; the rest go in later commits (reads skip them).
PRUNE_BATCH: Final = 1024
#: How far the window's floor moves before a receive stores it (and prunes below it).
FLOOR_STEP_MS: Final = 1000


class ReplayRows:
    """The ``replay`` database and the ``agent["replay_floor"]`` row."""

    def __init__(self, db: lmdb._Database, meta: Meta) -> None:
        self._db = db
        self._meta = meta

    def load(self, txn: lmdb.Transaction[bytes], window: ReplayWindow, now: int) -> ReplayWindow:
        """A window with ``window``'s settings holding the stored ids, pruned at ``now``.

        Raises:
            StoreCorrupted: a time-index key or the floor row is damaged.
        """
        floor = self._meta.counter(txn, b"replay_floor")
        latest: dict[bytes, int] = {}
        cursor = txn.cursor(db=self._db)
        if cursor.set_range(b"t"):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(b"t"):
                    break
                if not 10 <= len(key) <= 9 + MAX_ID_SIZE:
                    raise corrupt("replay", key.hex(), "malformed time-index key")
                timestamp = U64.unpack_from(key, 1)[0]
                if timestamp >= floor:
                    latest[key[9:]] = timestamp  # in time order: an id's later row wins
        ids: list[list[Any]] = [
            [mid, timestamp] for mid, timestamp in sorted(latest.items(), key=_by_time)
        ]
        state = canonical_dumps({"v": REPLAY_FORMAT_VERSION, "floor": floor, "ids": ids})
        try:
            loaded = ReplayWindow.from_bytes(
                state,
                window_ms=window.window_ms,
                max_skew_ms=window.max_skew_ms,
                max_entries=window.max_entries,
                max_size=len(state),
            )
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise corrupt("replay", "time index", str(exc)) from None
        loaded.prune(now)
        return loaded

    def put(
        self, txn: lmdb.Transaction[bytes], replay_id: bytes, timestamp_ms: int, floor: int
    ) -> None:
        """Record ``replay_id`` at ``timestamp_ms``; store ``floor`` (the window's) once it
        is :data:`FLOOR_STEP_MS` past the stored one; prune below the stored floor.

        Raises:
            DuplicateMessage: ``replay_id`` is stored with this very timestamp (the
                window refuses every other known id before the transaction).
        """
        db = self._db
        if not txn.put(b"t" + U64.pack(timestamp_ms) + replay_id, b"", db=db, overwrite=False):
            raise DuplicateMessage("message id was already received")
        stored = self._meta.counter(txn, b"replay_floor")
        if floor >= stored + FLOOR_STEP_MS:
            txn.put(b"replay_floor", U64.pack(floor), db=self._meta.db)
            stored = floor
        self._prune(txn, stored)

    def _prune(self, txn: lmdb.Transaction[bytes], floor: int) -> None:
        """Delete up to PRUNE_BATCH rows older than ``floor`` (reads skip any left)."""
        db = self._db
        cursor = txn.cursor(db=db)
        stale: list[bytes] = []
        if cursor.set_range(b"t"):
            for key in cursor.iternext(keys=True, values=False):
                if len(stale) >= PRUNE_BATCH or not key.startswith(b"t") or len(key) < 10:
                    break
                if U64.unpack_from(key, 1)[0] >= floor:
                    break
                stale.append(key)
        for key in stale:
            txn.delete(key, db=db)
            id_key = b"i" + key[9:]  # layout 1's per-id row, if this id has one
            if txn.get(id_key, db=db) == key[1:9]:
                txn.delete(id_key, db=db)


def _by_time(item: tuple[bytes, int]) -> tuple[int, bytes]:
    return item[1], item[0]
