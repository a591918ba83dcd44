"""The replay set on disk: one row per accepted id, a time index, and a floor.

Owns the ``replay`` database::

    b"i" id                   -> u64be(timestamp ms)
    b"t" u64be(timestamp) id  -> b""        (time index, for pruning and rebuilding)

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
        ids: list[list[Any]] = []
        cursor = txn.cursor(db=self._db)
        if cursor.set_range(b"t"):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(b"t"):
                    break
                if not 10 <= len(key) <= 9 + MAX_ID_SIZE:
                    raise corrupt("replay", key.hex(), "malformed time-index key")
                timestamp = U64.unpack_from(key, 1)[0]
                if timestamp >= floor:
                    ids.append([key[9:], timestamp])
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
            DuplicateMessage: ``replay_id`` is stored at or above ``floor``.
            StoreCorrupted: its stored row is damaged.
        """
        db = self._db
        id_key = b"i" + replay_id
        old = txn.get(id_key, db=db)
        if old is not None:
            if len(old) != 8:
                raise corrupt("replay", id_key.hex(), "not a u64")
            if U64.unpack(old)[0] >= floor:
                raise DuplicateMessage("message id was already received")
            txn.delete(b"t" + old + replay_id, db=db)
        stamp = U64.pack(timestamp_ms)
        txn.put(id_key, stamp, db=db)
        txn.put(b"t" + stamp + replay_id, b"", db=db)
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
            id_key = b"i" + key[9:]
            if txn.get(id_key, db=db) == key[1:9]:
                txn.delete(id_key, db=db)
