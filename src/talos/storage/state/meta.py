"""The ``agent`` database's own rows: the layout version, the key check and the counters.

Other parts keep single rows in ``agent`` too (``prekeys``: sessions;
``replay_floor``: replay). ``inbox_next``/``outbox_next`` are the counters
layout 1 kept here: layout 2 keeps them beside the rows they number, and
reads these as their floor (:meth:`Meta.counter`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from talos.errors import ConfigurationError, DecryptionFailed, MalformedFrame, UnsupportedVersion
from talos.storage.state.rows import LAYOUT_VERSION, READABLE_LAYOUTS, U64, corrupt
from talos.storage.state.sealing import KEY_CHECK, Sealer

if TYPE_CHECKING:
    import lmdb


class Meta:
    """The ``agent`` database: format and key-check rows, u64 counters."""

    def __init__(self, db: lmdb._Database, sealer: Sealer) -> None:
        self.db = db
        self._sealer = sealer
        #: The layout :meth:`check_header` found (None: a new state).
        self.layout: int | None = None

    def check_header(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Whether the state was written before (False for a new one); checks the key
        and notes the layout (:attr:`layout`).

        Raises:
            UnsupportedVersion: written by a newer Talos.
            ConfigurationError: the storage key does not open the key-check row.
            StoreCorrupted: the format row is damaged.
        """
        raw_format = txn.get(b"format", db=self.db)
        if raw_format is None:
            return False
        if len(raw_format) != 8:
            raise corrupt("agent", "format", "not a u64")
        layout = int(U64.unpack(raw_format)[0])
        if layout not in READABLE_LAYOUTS:
            raise UnsupportedVersion(f"agent state format {layout} is not supported")
        check = txn.get(b"key_check", db=self.db)
        try:
            opened = None if check is None else self._sealer.open(check, ("key-check",))
        except (DecryptionFailed, MalformedFrame):
            opened = None
        if opened != KEY_CHECK:
            raise ConfigurationError(
                "storage_key does not open this agent state (the home of another "
                "identity, or a damaged key-check row)"
            )
        self.layout = layout
        return True

    def write_header(self, txn: lmdb.Transaction[bytes]) -> None:
        """Write the format and key-check rows (with the first commit)."""
        txn.put(b"format", U64.pack(LAYOUT_VERSION), db=self.db)
        txn.put(b"key_check", self._sealer.seal(KEY_CHECK, ("key-check",)), db=self.db)

    def write_layout(self, txn: lmdb.Transaction[bytes]) -> None:
        """Mark an older layout as the current one (with its first commit here)."""
        txn.put(b"format", U64.pack(LAYOUT_VERSION), db=self.db)

    def counter(self, txn: lmdb.Transaction[bytes], name: bytes) -> int:
        """The u64 row ``name`` (0 if absent).

        Raises:
            StoreCorrupted: it is not a u64.
        """
        raw = txn.get(name, db=self.db)
        if raw is None:
            return 0
        if len(raw) != 8:
            raise corrupt("agent", name.decode(), "not a u64")
        return int(U64.unpack(raw)[0])

    def next_seq(
        self, txn: lmdb.Transaction[bytes], db: lmdb._Database, key: bytes, legacy: bytes
    ) -> int:
        """The next sequence number of the counter at ``key`` in ``db``, incremented in
        ``txn`` (sequence numbers never repeat). The layout-1 counter ``legacy`` of
        ``agent`` is its floor; it is read, never written.

        Raises:
            StoreCorrupted: a counter row is not a u64.
        """
        raw = txn.get(key, db=db)
        if raw is not None and len(raw) != 8:
            raise corrupt("counter", key.hex(), "not a u64")
        seq = 0 if raw is None else int(U64.unpack(raw)[0])
        seq = max(seq, self.counter(txn, legacy))
        txn.put(key, U64.pack(seq + 1), db=db)
        return seq
