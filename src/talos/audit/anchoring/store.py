"""Where anchors are kept: a database in the agent's LMDB environment, beside the audit log.

Keeping them in the log's environment (opened with
``extra_databases=(DATABASE,)``) makes two writes atomic that must be:

* an anchor is saved (durably) **before** its transaction is broadcast, with
  the wallet's next nonce, so a restart rebroadcasts the very same signed
  transaction and never signs another one with that nonce;
* an anchor becoming final and its ``AUDIT_ANCHORED`` audit entry are one
  transaction (:meth:`talos.audit.AuditLog.append_with`): no final anchor
  without its entry, no entry twice.

Rows (keys are ASCII tags, values canonical CBOR maps):

* ``c``: the anchor in flight (``pending`` or ``included``), if any;
* ``n``: the next nonce this log's wallet may use (u64);
* ``f`` + u64 tree size: each final anchor (sizes only grow);
* ``q``: the log size just after the last ``AUDIT_ANCHORED`` entry: a log
  that grew only by that entry has nothing new to anchor (written just after
  the final anchor; a crash in between costs one extra anchor, nothing more),
  nor by the ``AUDIT_PRUNED`` entries that directly follow it
  (:meth:`AnchorStore.pass_over`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import cbor2

from talos.audit.anchoring.settings import DATABASES
from talos.audit.log import AuditLog
from talos.audit.records import AuditRecord
from talos.core.anchoring import Anchor, AnchorState
from talos.core.clock import Clock
from talos.errors import MalformedFrame, StorageError, StoreCorrupted
from talos.storage.lmdb import read_u64, u64

__all__ = ["DATABASE", "AnchorStore", "read_anchors"]

#: The extra database to open the audit log with (``settings.DATABASES``).
DATABASE: Final = DATABASES[0]

_CURRENT: Final = b"c"
_NONCE: Final = b"n"
_FINAL: Final = b"f"
_QUIET: Final = b"q"


def _decode(raw: bytes, where: str) -> Anchor:
    try:
        return Anchor.from_map(cbor2.loads(raw))
    except (MalformedFrame, cbor2.CBORDecodeError, ValueError) as exc:
        raise StoreCorrupted(
            f"anchor store, {where}: {exc}", where=f"anchors/{where}", what=str(exc)
        ) from None


def _encode(anchor: Anchor) -> bytes:
    return bytes(cbor2.dumps(anchor.to_map(), canonical=True))


class AnchorStore:
    """The anchors of one log. Writes are durable before they return."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self._db: Any = log.database(DATABASE)

    def current(self) -> Anchor | None:
        """The anchor in flight, if any.

        Raises:
            StoreCorrupted: the stored record does not decode.
        """
        with self._log.snapshot() as txn:
            raw = txn.get(_CURRENT, db=self._db)
        return None if raw is None else _decode(bytes(raw), "anchor in flight")

    def next_nonce(self) -> int:
        """The lowest nonce a new anchor may use (0 before any)."""
        with self._log.snapshot() as txn:
            raw = txn.get(_NONCE, db=self._db)
        return 0 if raw is None else read_u64(bytes(raw))

    def finals(self) -> list[Anchor]:
        """Every final anchor, by growing tree size."""
        found = []
        with self._log.snapshot() as txn:
            cursor = txn.cursor(db=self._db)
            if cursor.set_range(_FINAL):
                for key, raw in cursor:
                    if not bytes(key).startswith(_FINAL):
                        break
                    found.append(_decode(bytes(raw), f"final anchor {bytes(key).hex()}"))
        return found

    def covered(self) -> int:
        """The log size needing no new anchor: the last final anchor's, or just past its entry."""
        with self._log.snapshot() as txn:
            raw = txn.get(_QUIET, db=self._db)
        final = self.last_final()
        quiet = 0 if raw is None else read_u64(bytes(raw))
        return max(quiet, 0 if final is None else final.tree_size)

    def last_final(self) -> Anchor | None:
        finals = self.finals()
        return finals[-1] if finals else None

    def save(self, anchor: Anchor) -> None:
        """Persist ``anchor`` as the one in flight and reserve its nonce (durably).

        Raises:
            ValueError: ``anchor`` is final (use :meth:`finish`).
            StorageError: LMDB failed.
        """
        if anchor.state is AnchorState.FINAL:
            raise ValueError("a final anchor is recorded with finish()")

        def apply(txn: Any) -> None:
            raw = txn.get(_NONCE, db=self._db)
            floor = 0 if raw is None else read_u64(bytes(raw))
            txn.put(_NONCE, u64(max(floor, anchor.nonce + 1)), db=self._db)
            txn.put(_CURRENT, _encode(anchor), db=self._db)

        self._log.append_with([], apply)

    def drop(self) -> None:
        """Forget the anchor in flight (reverted, or its nonce taken); its nonce stays used."""

        def apply(txn: Any) -> None:
            txn.delete(_CURRENT, db=self._db)

        self._log.append_with([], apply)

    def finish(self, anchor: Anchor, record: AuditRecord) -> int:
        """Record ``anchor`` as final together with its audit entry; the entry's sequence number.

        Raises:
            ValueError: ``anchor`` is not final.
            AuditFull, StorageError: nothing was written.
        """
        if anchor.state is not AnchorState.FINAL:
            raise ValueError("only a final anchor is finished")

        def apply(txn: Any) -> None:
            txn.delete(_CURRENT, db=self._db)
            txn.put(_FINAL + u64(anchor.tree_size), _encode(anchor), db=self._db)

        seq = self._log.append_with([record], apply)[0]

        def quiet(txn: Any) -> None:
            txn.put(_QUIET, u64(seq + 1), db=self._db)

        self._log.append_with([], quiet)
        return seq

    def pass_over(self, seqs: list[int]) -> None:
        """Count entries ``seqs`` (pruning records) as nothing new to anchor.

        Each moves ``q`` on only if it directly follows it: an entry
        appended in between is new, and the next anchor covers them all.

        Raises:
            AuditFull, StorageError: nothing was written.
        """
        if not seqs:
            return

        def apply(txn: Any) -> None:
            raw = txn.get(_QUIET, db=self._db)
            quiet = 0 if raw is None else read_u64(bytes(raw))
            moved = quiet
            for seq in sorted(seqs):
                if seq == moved:
                    moved = seq + 1
            if moved != quiet:
                txn.put(_QUIET, u64(moved), db=self._db)

        self._log.append_with([], apply)


def read_anchors(path: Path, *, clock: Clock) -> tuple[list[Anchor], Anchor | None]:
    """The final anchors and the one in flight of the log in ``path``, read-only.

    Works beside the agent that writes the log. A log that never anchored
    (its environment has no anchors database) has none.

    Raises:
        StorageError: no log at ``path``, or it cannot be read;
            ``StoreCorrupted`` when a stored anchor does not decode.
    """
    try:
        log = AuditLog.open(path, readonly=True, clock=clock, extra_databases=(DATABASE,))
    except StorageError:
        # Raises the log's own problem if it has one; else it never anchored.
        with AuditLog.open(path, readonly=True, clock=clock):
            return [], None
    with log:
        store = AnchorStore(log)
        return store.finals(), store.current()
