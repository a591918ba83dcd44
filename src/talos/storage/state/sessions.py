"""Sessions and the prekey store, sealed at rest.

Owns the ``sessions`` database (peer id -> sealed ``Session.to_bytes()``,
associated data ``("session", peer)``) and the ``prekeys`` row of ``agent``
(sealed ``PrekeyStore.to_bytes()``, associated data ``("prekeys",)``).
Sealing happens before the transaction; the writes take it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from talos.storage.state.commit import Unchanged
from talos.storage.state.meta import Meta
from talos.storage.state.rows import as_bytes, peer_key, text
from talos.storage.state.sealing import Sealer

if TYPE_CHECKING:
    import lmdb


class Sessions:
    """The ``sessions`` database and the ``agent["prekeys"]`` row."""

    def __init__(self, db: lmdb._Database, meta: Meta, sealer: Sealer) -> None:
        self._db = db
        self._meta = meta.db
        self._sealer = sealer

    # -- sessions --------------------------------------------------------------------

    def seal(self, peer: str, session: bytes) -> tuple[bytes, bytes]:
        """The key and sealed value of ``peer``'s session row.

        Raises:
            LocalProtocolError: a bad peer id or session.
        """
        key = peer_key(peer)
        return key, self._sealer.seal(as_bytes("session", session), ("session", peer))

    def seal_many(self, sessions: Mapping[str, bytes]) -> dict[bytes, bytes]:
        """The session rows for ``{peer: session}``, key -> sealed value."""
        return {
            peer_key(peer): self._sealer.seal(as_bytes("session", session), ("session", peer))
            for peer, session in sessions.items()
        }

    def put(self, txn: lmdb.Transaction[bytes], key: bytes, sealed: bytes) -> None:
        """Write one sealed session row."""
        txn.put(key, sealed, db=self._db)

    def put_many(self, txn: lmdb.Transaction[bytes], rows: Mapping[bytes, bytes]) -> None:
        """Write sealed session rows (from :meth:`seal_many`)."""
        for key, sealed in rows.items():
            txn.put(key, sealed, db=self._db)

    def delete(self, txn: lmdb.Transaction[bytes], key: bytes) -> None:
        """Delete the session row at ``key``.

        Raises:
            Unchanged: there was none.
        """
        if not txn.delete(key, db=self._db):
            raise Unchanged

    def get(self, txn: lmdb.Transaction[bytes], key: bytes, peer: str) -> bytes | None:
        """The session of ``peer`` (stored at ``key``), or None.

        Raises:
            StoreCorrupted: the row is damaged.
        """
        sealed = txn.get(key, db=self._db)
        return (
            None
            if sealed is None
            else self._sealer.unseal("sessions", peer, sealed, ("session", peer))
        )

    def peers(self, txn: lmdb.Transaction[bytes]) -> list[str]:
        """The peers with a stored session, sorted by id bytes.

        Raises:
            StoreCorrupted: a key is not UTF-8.
        """
        keys = list(txn.cursor(db=self._db).iternext(keys=True, values=False))
        return [text("sessions", key) for key in keys]

    # -- prekeys ---------------------------------------------------------------------

    def seal_prekeys(self, data: bytes) -> bytes:
        """The sealed prekey row for ``data``.

        Raises:
            LocalProtocolError: ``data`` is not bytes.
        """
        return self._sealer.seal(as_bytes("prekeys", data), ("prekeys",))

    def put_prekeys(self, txn: lmdb.Transaction[bytes], sealed: bytes) -> None:
        """Write the sealed prekey row."""
        txn.put(b"prekeys", sealed, db=self._meta)

    def prekeys(self, txn: lmdb.Transaction[bytes]) -> bytes | None:
        """The prekey store, or None.

        Raises:
            StoreCorrupted: the row is damaged.
        """
        sealed = txn.get(b"prekeys", db=self._meta)
        return (
            None
            if sealed is None
            else self._sealer.unseal("agent", "prekeys", sealed, ("prekeys",))
        )
