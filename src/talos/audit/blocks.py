"""Blocks of the audit log: when one is due, and sealing it inside a write transaction.

Rules this module keeps:

* A block is sealed once :data:`DEFAULT_BLOCK_ENTRIES` (or the configured
  count) entries are unsealed, or once the oldest unsealed entry is
  :data:`DEFAULT_BLOCK_SECONDS` old. The time rule is checked when the log is
  written, flushed or closed; the library runs no timer of its own.
* Blocks are chained: each names the hash of the one before
  (:data:`~talos.core.audit.checkpoint.GENESIS_HASH` at height 0), the range
  of entries it seals and the root of the tree at its end, and is signed by
  the log's signer when there is one. ``meta["blocks"]`` and
  ``meta["block_hash"]`` follow the last block, in the same transaction.

Imported by :mod:`talos.audit.writer` and :mod:`talos.audit.log`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import lmdb

from talos.audit.store import AuditStore
from talos.core.audit.checkpoint import GENESIS_HASH, Block, LogSigner
from talos.errors import ConfigurationError
from talos.storage.lmdb import u64

__all__ = [
    "DEFAULT_BLOCK_ENTRIES",
    "DEFAULT_BLOCK_SECONDS",
    "BlockSealer",
    "OpenBlock",
    "check_block_settings",
]

#: A block is sealed once this many entries are unsealed ...
DEFAULT_BLOCK_ENTRIES: Final = 1024

#: ... or once the oldest unsealed entry is this many seconds old (checked on write).
DEFAULT_BLOCK_SECONDS: Final = 60.0


def check_block_settings(block_entries: int, block_seconds: float) -> None:
    """Refuse a block count or age that is not positive.

    Raises:
        ConfigurationError: a block setting is not positive.
    """
    if block_entries < 1 or not block_seconds > 0:
        raise ConfigurationError("block_entries and block_seconds must be positive")


@dataclass(slots=True)
class OpenBlock:
    """The chain as a writer knows it: sealed blocks so far, and where the open block starts."""

    blocks: int
    block_hash: bytes
    sealed_size: int
    oldest_unsealed_ms: int | None

    @classmethod
    def load(cls, store: AuditStore, txn: lmdb.Transaction[bytes], size: int) -> OpenBlock:
        """Read the chain's end from a log of ``size`` entries.

        Raises:
            StoreCorrupted: the last block or the oldest unsealed entry is damaged.
        """
        blocks = store.meta_count(txn, b"blocks")
        block_hash, sealed = GENESIS_HASH, 0
        if blocks:
            last = store.block(txn, blocks - 1)
            block_hash, sealed = last.block_hash(), last.tree_size
        oldest = None
        if sealed < size:
            oldest = store.entry(txn, sealed, size).time_ms
        return cls(blocks, block_hash, sealed, oldest)

    def copy(self) -> OpenBlock:
        return OpenBlock(self.blocks, self.block_hash, self.sealed_size, self.oldest_unsealed_ms)


class BlockSealer:
    """Decides when a block is due and writes it (the caller holds the write transaction)."""

    def __init__(
        self,
        store: AuditStore,
        *,
        signer: LogSigner | None,
        block_entries: int,
        block_seconds: float,
    ) -> None:
        check_block_settings(block_entries, block_seconds)
        self._store = store
        self._signer = signer
        self.block_entries = block_entries
        self._block_ms = int(block_seconds * 1000)

    def use_signer(self, signer: LogSigner) -> None:
        """Sign the next blocks with ``signer`` (see AuditLog.use_signer)."""
        self._signer = signer

    def due(self, chain: OpenBlock, now: int) -> bool:
        """Whether the oldest unsealed entry is old enough at ``now`` (ms) to seal."""
        oldest = chain.oldest_unsealed_ms
        return oldest is not None and now - oldest >= self._block_ms

    def seal(
        self,
        txn: lmdb.Transaction[bytes],
        chain: OpenBlock,
        *,
        size: int,
        root: bytes,
        time_ms: int,
    ) -> Block:
        """Seal entries ``chain.sealed_size .. size - 1`` into the next block; update ``chain``."""
        block = Block(
            height=chain.blocks,
            previous=chain.block_hash,
            first_seq=chain.sealed_size,
            last_seq=size - 1,
            tree_size=size,
            root=root,
            time_ms=time_ms,
        )
        if self._signer is not None:
            block = block.signed_by(self._signer.key)
        store = self._store
        txn.put(u64(block.height), block.to_bytes(), db=store.blocks, append=True)
        chain.blocks += 1
        chain.block_hash = block.block_hash()
        chain.sealed_size = size
        chain.oldest_unsealed_ms = None
        txn.put(b"blocks", u64(chain.blocks), db=store.meta)
        txn.put(b"block_hash", chain.block_hash, db=store.meta)
        return block
