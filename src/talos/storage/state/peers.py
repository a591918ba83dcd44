"""The peer cache: peer records and key event logs the agent verified.

Owns the ``peers`` database::

    b"r" agent id  -> peer record bytes
    b"k" agent id  -> key event log bytes

Both are public data, stored in the clear; callers verify them again before use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from talos.core.peer_record import PeerRecord
from talos.errors import MalformedFrame, UnsupportedVersion
from talos.storage.state.commit import Unchanged
from talos.storage.state.rows import corrupt, peer_key

if TYPE_CHECKING:
    import lmdb


def record_key(agent_id: str) -> bytes:
    """The key of ``agent_id``'s peer record.

    Raises:
        LocalProtocolError: not a valid agent id.
    """
    return b"r" + peer_key(agent_id)


def keylog_key(agent_id: str) -> bytes:
    """The key of ``agent_id``'s key event log.

    Raises:
        LocalProtocolError: not a valid agent id.
    """
    return b"k" + peer_key(agent_id)


class PeerCache:
    """The ``peers`` database."""

    def __init__(self, db: lmdb._Database) -> None:
        self._db = db

    def put_record(
        self, txn: lmdb.Transaction[bytes], key: bytes, record: bytes, sequence: int
    ) -> None:
        """Cache ``record`` (of sequence number ``sequence``) at ``key`` unless the cached
        one is as new.

        Raises:
            Unchanged: the cached record's sequence number is not lower.
        """
        old = txn.get(key, db=self._db)
        if old is not None:
            try:
                if PeerRecord.from_bytes(old).sequence >= sequence:
                    raise Unchanged
            except (MalformedFrame, UnsupportedVersion):
                pass  # a damaged cached record is replaced by the verified one
        txn.put(key, record, db=self._db)

    def record(self, txn: lmdb.Transaction[bytes], key: bytes, agent_id: str) -> bytes | None:
        """The cached record of ``agent_id`` at ``key``, or None.

        Raises:
            StoreCorrupted: it does not decode.
        """
        raw = txn.get(key, db=self._db)
        if raw is not None:
            try:
                PeerRecord.from_bytes(raw)
            except (MalformedFrame, UnsupportedVersion) as exc:
                raise corrupt("peers", f"record {agent_id}", str(exc)) from None
        return raw

    def records(self, txn: lmdb.Transaction[bytes]) -> list[bytes]:
        """Every cached peer record, in agent-id order."""
        cursor = txn.cursor(db=self._db)
        records = []
        if cursor.set_range(b"r"):
            for key, value in cursor.iternext():
                if not key.startswith(b"r"):
                    break
                records.append(value)
        return records

    def put_keylog(self, txn: lmdb.Transaction[bytes], key: bytes, data: bytes) -> None:
        """Cache a key event log at ``key`` (from :func:`keylog_key`)."""
        txn.put(key, data, db=self._db)

    def keylog(self, txn: lmdb.Transaction[bytes], key: bytes) -> bytes | None:
        """The cached key event log at ``key`` (from :func:`keylog_key`), or None."""
        return txn.get(key, db=self._db)
