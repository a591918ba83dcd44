"""Damaging a store on purpose, as someone holding its file could.

For tests of what Talos does with a damaged LMDB store: these write
through LMDB directly, bypassing every check Talos makes.
"""

from __future__ import annotations

from pathlib import Path

import lmdb

__all__ = ["flip_stored_bit", "put_stored"]

#: Enough named databases for any Talos store (audit and agent state together).
_MAX_DBS = 32


def flip_stored_bit(path: Path, db: bytes, key: bytes, offset: int | None = None) -> None:
    """Flip the lowest bit of byte ``offset`` (modulo the length; default: the middle)
    of the value stored under ``key`` in database ``db`` of the environment at ``path``.

    Raises:
        KeyError: nothing is stored under ``key``.
    """
    env = lmdb.open(str(path), max_dbs=_MAX_DBS)
    try:
        handle = env.open_db(db)
        with env.begin(write=True) as txn:
            value = txn.get(key, db=handle)
            if value is None:
                raise KeyError(f"nothing stored under {key!r} in {db!r}")
            raw = bytearray(value)
            raw[(len(raw) // 2 if offset is None else offset) % len(raw)] ^= 0x01
            txn.put(key, bytes(raw), db=handle)
    finally:
        env.close()


def put_stored(path: Path, db: bytes, key: bytes, value: bytes) -> None:
    """Store ``value`` under ``key`` in database ``db`` of the environment at ``path``."""
    env = lmdb.open(str(path), max_dbs=_MAX_DBS)
    try:
        handle = env.open_db(db)
        with env.begin(write=True) as txn:
            txn.put(key, value, db=handle)
    finally:
        env.close()
