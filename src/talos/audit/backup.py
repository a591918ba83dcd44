"""Backup and restore of an audit log directory.

Rules this module keeps:

* A backup is LMDB's compacted copy under its own read snapshot: consistent,
  while appends go on. Every file of it, and the directory, is fsynced.
* A backup is trusted only after checks: its data file's structure is walked
  without mapping it, then its whole chain is verified on a read-only,
  lock-free open. A damaged backup raises
  :class:`~talos.errors.BackupInvalid` and nothing changes.
* Restoring never deletes: the log being replaced is moved aside to
  ``<path>.replaced-<UTC stamp>``, and the verified copy is staged beside
  the target, fsynced, then renamed into place.

Imported by :mod:`talos.audit.log`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

from talos.audit.integrity import verify_chain
from talos.audit.store import AuditStore
from talos.core.clock import Clock
from talos.core.crypto import VerifyKey
from talos.errors import (
    BackupInvalid,
    ConfigurationError,
    StorageError,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.storage.environment import Environment
from talos.storage.lmdb import DATA_FILE, FILE_MODE, check_data_file

__all__ = ["restore", "write_backup"]

_log = logging.getLogger("talos.audit")


def write_backup(store: AuditStore, dest: Path) -> Path:
    """Write a consistent, compacted hot copy of the environment into directory ``dest``.

    Raises:
        ConfigurationError: ``dest`` is not empty.
        StorageError: the copy could not be written.
    """
    if dest.exists() and any(dest.iterdir()):
        raise ConfigurationError(f"backup directory {dest} is not empty")
    try:
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"could not create {dest}: {exc.strerror or exc}") from exc
    store.environment.copy_to(dest)
    _fsync_tree(dest)
    return dest


def restore(
    target: Path,
    source: Path,
    *,
    clock: Clock,
    trusted_keys: Collection[VerifyKey] | None,
) -> Path | None:
    """Replace the log at ``target`` with a verified copy of ``source``.

    Returns where the replaced log was moved (``None`` if there was none).

    Raises:
        BackupInvalid: the backup is missing, damaged or fails verify_chain.
        StorageError: the files could not be moved or copied.
    """
    _verify_backup(source, trusted_keys)
    stamp = datetime.fromtimestamp(clock.time(), tz=UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    staging = target.parent / f".{target.name}.restoring-{stamp}"
    aside = target.parent / f"{target.name}.replaced-{stamp}"
    try:
        staging.mkdir(mode=0o700, parents=True)
        _copy_private(source / DATA_FILE, staging / DATA_FILE)
        _fsync_tree(staging)
        moved = None
        if target.exists():
            os.replace(target, aside)
            moved = aside
        os.replace(staging, target)
        _fsync_tree(target.parent)
    except OSError as exc:
        raise StorageError(f"could not restore {target}: {exc.strerror or exc}") from exc
    _log.warning(
        "audit log %s restored from %s; previous log kept at %s",
        target,
        source,
        moved,
        extra={"event": "audit_restored"},
    )
    return moved


def _verify_backup(source: Path, trusted_keys: Collection[VerifyKey] | None) -> None:
    if not (source / DATA_FILE).is_file():
        raise BackupInvalid(f"no audit log backup in {source}")
    try:
        check_data_file(source / DATA_FILE, full=True)
        environment = Environment.open(source, readonly=True, lock=False)
    except (StoreCorrupted, StorageError) as exc:
        raise BackupInvalid(f"audit backup {source} is damaged: {exc}") from None
    try:
        store = AuditStore(environment)
        with store.read() as txn:
            store.check_format(txn)
        report = verify_chain(store, trusted_keys=trusted_keys)
    except (StorageError, UnsupportedVersion) as exc:
        raise BackupInvalid(f"audit backup {source} cannot be read: {exc}") from None
    finally:
        environment.close()
    if report.problem is not None:
        raise BackupInvalid(f"audit backup {source} fails verification: {report.problem}")


def _copy_private(source: Path, dest: Path) -> None:
    """Copy ``source`` to a new file ``dest`` created 0600 (a store file)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "wb") as out, source.open("rb") as src:
        shutil.copyfileobj(src, out)


def _fsync_tree(directory: Path) -> None:
    """fsync every file in ``directory`` and the directory itself."""
    for item in directory.iterdir():
        if item.is_file():
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
