"""The ``agent`` database's own rows: the layout version, the key check and the counters.

Other parts keep single rows in ``agent`` too (``prekeys``: sessions;
``replay_floor``: replay; ``inbox_next``/``outbox_next``: the counters of the
inbox and the outbox, through :meth:`Meta.next_seq`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from talos.errors import ConfigurationError, DecryptionFailed, MalformedFrame, UnsupportedVersion
from talos.storage.state.rows import FORMAT_VERSION, U64, corrupt
from talos.storage.state.sealing import KEY_CHECK, Sealer

if TYPE_CHECKING:
    import lmdb


class Meta:
    """The ``agent`` database: format and key-check rows, u64 counters."""

    def __init__(self, db: lmdb._Database, sealer: Sealer) -> None:
        self.db = db
        self._sealer = sealer

    def check_header(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Whether the state was written before (False for a new one); checks the key.

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
        if U64.unpack(raw_format)[0] != FORMAT_VERSION:
            raise UnsupportedVersion(
                f"agent state format {U64.unpack(raw_format)[0]} is not supported"
            )
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
        return True

    def write_header(self, txn: lmdb.Transaction[bytes]) -> None:
        """Write the format and key-check rows (with the first commit)."""
        txn.put(b"format", U64.pack(FORMAT_VERSION), db=self.db)
        txn.put(b"key_check", self._sealer.seal(KEY_CHECK, ("key-check",)), db=self.db)

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

    def next_seq(self, txn: lmdb.Transaction[bytes], name: bytes) -> int:
        """Counter ``name``, incremented in ``txn`` (sequence numbers never repeat)."""
        seq = self.counter(txn, name)
        txn.put(name, U64.pack(seq + 1), db=self.db)
        return seq
