"""The agent's LMDB environment: one directory that holds its audit log and its state.

This module owns the environment: opening it safely, which named databases
exist in it and what they are called on disk, and its transactions. The
audit log (:mod:`talos.audit`) is built on it, and the agent's state
(:mod:`talos.storage.agent_state`) keeps its databases in it too, so that a
state change and the audit entry recording it commit in one transaction.

Layout of the directory::

    data.mdb, lock.mdb                    the LMDB files
    entries, nodes, blocks, index, meta   the audit log's databases (talos.audit.store)
    x:<name>                              other state kept beside the log, e.g.
                                          AgentState.DATABASES (at most eight)

Rules this module keeps:

* Safe open: through :func:`talos.storage.lmdb.open_environment`, which
  checks the data file against its own committed pages before LMDB maps it
  (a truncated file is reported instead of killing the process with
  SIGBUS) and creates the files 0600.
* Durability: opened with ``sync=True`` and ``metasync=True`` and without
  ``writemap``/``map_async``, so a write transaction is on disk when
  :meth:`Environment.write` returns.
* Size: ``max_size_bytes`` becomes the LMDB map size, so LMDB refuses to grow
  the file past it; without a limit the map is 1 TiB of address space, which
  costs nothing until used.
* Errors: no ``lmdb`` exception leaves a transaction; each becomes its Talos
  exception (:func:`talos.storage.lmdb.translate`).

Imported by :mod:`talos.audit`; other state reaches the environment through
the audit log built on it (``AuditLog.database``, ``snapshot``, ``append_with``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import lmdb

from talos.errors import ConfigurationError, LocalProtocolError, StorageError
from talos.storage.lmdb import (
    DATA_FILE,
    DEFAULT_MAP_SIZE,
    FILE_MODE,
    MAX_EXTRA_DATABASES,
    MIN_SIZE_BYTES,
    ReadTransaction,
    lmdb_errors,
    open_environment,
)

__all__ = ["AUDIT_DATABASES", "AuditDatabases", "Environment"]

#: The audit log's databases, stored under these names.
AUDIT_DATABASES: Final = ("entries", "nodes", "blocks", "index", "meta")
_EXTRA_PREFIX: Final = b"x:"


@dataclass(frozen=True, slots=True)
class AuditDatabases:
    """Handles of the audit log's five databases (their rows: :mod:`talos.audit.store`)."""

    entries: Any
    nodes: Any
    blocks: Any
    index: Any
    meta: Any


class Environment:
    """An open LMDB environment: the audit log's databases and the extra ones named at open.

    Open with :meth:`open`; :meth:`close` when done. Transactions come from
    :meth:`read` (a consistent snapshot) and :meth:`write` (durable on return).
    """

    def __init__(
        self,
        env: lmdb.Environment,
        path: Path,
        *,
        max_size_bytes: int | None,
        readonly: bool,
        extra_databases: Sequence[str] = (),
    ) -> None:
        self._env = env
        self.path = path
        self._where = str(path)
        self.max_size_bytes = max_size_bytes
        self.readonly = readonly
        with lmdb_errors(str(path)):
            txn = None if readonly else env.begin(write=True)
            try:
                self.audit = AuditDatabases(
                    *(
                        env.open_db(name.encode(), txn=txn, create=not readonly)
                        for name in AUDIT_DATABASES
                    )
                )
                self._extra: dict[str, Any] = {
                    name: env.open_db(_EXTRA_PREFIX + name.encode(), txn=txn, create=not readonly)
                    for name in extra_databases
                }
            except BaseException:
                if txn is not None:
                    txn.abort()
                raise
            if txn is not None:
                txn.commit()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        extra_databases: Sequence[str] = (),
        max_size_bytes: int | None = None,
        readonly: bool = False,
        lock: bool = True,
        verify_structure: bool = False,
    ) -> Environment:
        """Open (or create, unless ``readonly``) the environment in directory ``path``.

        ``extra_databases`` names databases of other state kept beside the
        audit log (at most :data:`~talos.storage.lmdb.MAX_EXTRA_DATABASES`;
        stored as ``x:<name>``). ``lock=False`` (read-only only) opens a copy
        that no writer uses, such as a backup, without creating ``lock.mdb``
        in it. ``verify_structure`` walks every reachable page of the data
        file before it is mapped (for files whose origin is not trusted).

        Raises:
            ConfigurationError: ``max_size_bytes`` is below
                :data:`~talos.storage.lmdb.MIN_SIZE_BYTES`, or too many extra databases.
            StoreCorrupted: the data file fails
                :func:`~talos.storage.lmdb.check_data_file` or LMDB finds it invalid.
            StorageError: the directory is missing (read-only) or cannot be used.
        """
        if len(extra_databases) > MAX_EXTRA_DATABASES:
            raise ConfigurationError(f"at most {MAX_EXTRA_DATABASES} extra databases")
        if max_size_bytes is not None and max_size_bytes < MIN_SIZE_BYTES:
            raise ConfigurationError(f"max_size_bytes must be at least {MIN_SIZE_BYTES}")
        if readonly and not (path / DATA_FILE).exists():
            raise StorageError(f"no audit log in {path}")
        map_size = DEFAULT_MAP_SIZE if max_size_bytes is None else max_size_bytes
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        map_size -= map_size % page
        env = open_environment(
            path,
            store="audit log",
            readonly=readonly,
            lock=lock or not readonly,
            verify_structure=verify_structure,
            map_size=map_size,
            sync=True,
            metasync=True,
            writemap=False,
            map_async=False,
            meminit=False,
            max_dbs=8 + MAX_EXTRA_DATABASES,  # the audit log's five, three spare
            max_readers=126,
        )
        try:
            return cls(
                env,
                path,
                max_size_bytes=max_size_bytes,
                readonly=readonly,
                extra_databases=extra_databases,
            )
        except BaseException:
            env.close()
            raise

    def close(self) -> None:
        self._env.close()

    def database(self, name: str) -> Any:
        """The handle of an extra database named at :meth:`open`.

        Raises:
            LocalProtocolError: no such database was opened.
        """
        try:
            return self._extra[name]
        except KeyError:
            raise LocalProtocolError(f"no extra database {name!r} in {self.path}") from None

    def read(self) -> ReadTransaction:
        """A read transaction (a consistent snapshot), errors translated: ``with
        environment.read() as txn``."""
        return ReadTransaction(self._env, self._where)

    @contextlib.contextmanager
    def write(self) -> Iterator[lmdb.Transaction[bytes]]:
        """A write transaction, committed (and synced) when the block ends without error.

        Raises:
            AuditFull: the map is full, the size limit is reached, or the disk is full.
            StoreCorrupted: LMDB found corruption.
            StorageError: any other LMDB failure.
        """
        with lmdb_errors(str(self.path)):
            txn = self._env.begin(write=True)
            try:
                yield txn
            except BaseException:
                txn.abort()
                raise
            txn.commit()

    def sync(self) -> None:
        """Flush the environment to disk.

        Raises:
            StorageError: LMDB failed.
        """
        with lmdb_errors(str(self.path)):
            self._env.sync(True)

    def last_transaction(self) -> int:
        """The id of the last committed write transaction (moves by one per commit)."""
        with lmdb_errors(str(self.path)):
            return int(self._env.info()["last_txnid"])

    def copy_state_from(self, source: Path, *, audit: bool = False) -> tuple[str, ...]:
        """Copy every database of the environment in ``source`` that is not the audit log's
        (the agent state, anchors) into this one, rows and flags as they are, in one
        transaction; returns their names. With ``audit``, the audit log's databases
        instead, and only those (a verified backup of a pruned log, whose entries
        cannot be written again from their payloads).

        ``source`` is opened read-only and never written. A restore or rebuild
        uses this to keep the current agent state while the audit log is
        replaced (docs/design/audit-recovery.md).

        Raises:
            StoreCorrupted: ``source`` cannot be read (nothing is copied).
            StorageError: it cannot be opened, or this environment cannot be written.
        """
        env = open_environment(
            source,
            store="audit log",
            readonly=True,
            lock=False,
            map_size=DEFAULT_MAP_SIZE,
            max_dbs=8 + MAX_EXTRA_DATABASES,
        )
        copied: list[str] = []
        try:
            with lmdb_errors(str(source)), env.begin() as txn, self.write() as out:
                audit_names = {name.encode() for name in AUDIT_DATABASES}
                names = [bytes(k) for k in txn.cursor().iternext(values=False)]
                for name in names:
                    if (name in audit_names) != audit:
                        continue
                    try:
                        db = env.open_db(name, txn=txn, create=False)
                    except lmdb.Error:
                        continue  # a plain row of the main database, not a database
                    flags = db.flags()
                    target = self._env.open_db(name, txn=out, create=True, **flags)
                    rows = txn.cursor(db=db).iternext()
                    out.cursor(db=target).putmulti(rows, dupdata=flags.get("dupsort", False))
                    copied.append(name.decode(errors="replace"))
        finally:
            env.close()
        return tuple(copied)

    def copy_to(self, dest: Path) -> None:
        """Write a compacted, consistent copy of the environment into directory ``dest``.

        The copy's ``data.mdb`` is created 0600, like every store file.

        Raises:
            StorageError: ``dest`` cannot be written (or the disk is full).
        """
        target = dest / DATA_FILE
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except OSError as exc:
            raise StorageError(f"could not create {target}: {exc.strerror or exc}") from exc
        try:
            with lmdb_errors(dest):
                self._env.copyfd(fd, compact=True)
        finally:
            os.close(fd)
