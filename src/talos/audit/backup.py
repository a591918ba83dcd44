"""Backup and restore of an audit log directory.

Rules this module keeps:

* A backup is LMDB's compacted copy under its own read snapshot: consistent,
  while appends go on. Every file of it, and the directory, is fsynced.
* A backup is trusted only after checks: its data file's structure is walked
  without mapping it, then its whole chain is verified on a read-only,
  lock-free open. A damaged backup raises
  :class:`~talos.errors.BackupInvalid` and nothing changes.
* Restoring restores the audit log only, never the agent state beside it,
  and never deletes: the environment being replaced is moved aside to
  ``<path>.replaced-<UTC stamp>`` and a staged one, holding the current
  state and the backup's log, is renamed into place
  (:func:`talos.audit.recovery.replace_log`).

Imported by :mod:`talos.audit.log`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talos.audit.integrity import verify_chain
from talos.audit.rebuild import read_intact
from talos.audit.recovery import Replaced, fsync_tree, loss, replace_log, write_read
from talos.audit.store import AuditStore
from talos.core.audit.checkpoint import LogSigner
from talos.core.audit.entry import AuditKind
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
from talos.storage.lmdb import DATA_FILE, check_data_file

__all__ = ["Restored", "restore", "write_backup"]

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
    fsync_tree(dest)
    return dest


def restore(
    target: Path,
    source: Path,
    *,
    clock: Clock,
    trusted_keys: Collection[VerifyKey] | None,
    signer: LogSigner | None = None,
    recorded: tuple[int, bytes] | None = None,
) -> Restored:
    """Replace the audit log at ``target`` with a verified copy of the one in ``source``.

    Only the audit log is restored; the agent state in ``target`` is kept
    (:func:`replace_log`). The restored log gets a ``LOG_RESTORED`` entry
    with the backup's size and root, and, when ``recorded`` (the size and
    root the agent's watermark records) says the log held more, how many
    entries were lost.

    Raises:
        BackupInvalid: the backup is missing, damaged or fails verify_chain.
        StorageError: the files could not be moved or copied.
    """
    _verify_backup(source, trusted_keys)
    result: dict[str, Any] = {}
    pruned = _pruned(source)

    def fill(environment: Environment) -> Mapping[str, Any]:
        if pruned:
            # Pruned payloads cannot be written again: the verified databases are
            # copied as they are (verify_chain checked them, pruning included).
            environment.copy_state_from(source, audit=True)
            size, root, lost = _copied(environment, recorded)
        else:
            _, written = write_read(environment, read_intact(source), trusted_keys, recorded)
            size, root, lost = written.size, written.root, loss(written, recorded)
        result.update(size=size, root=root)
        data: dict[str, Any] = {
            "backup": source.name[:200],
            "backup_size": size,
            "backup_root": root,
        }
        data.update(lost)
        result["lost"] = data.get("lost", 0)
        return data

    replaced = replace_log(
        target, fill, clock=clock, signer=signer, kind=AuditKind.LOG_RESTORED, label="replaced"
    )
    _log.warning(
        "audit log %s restored from %s (%d entries, %d lost, agent state %s); "
        "previous log kept at %s",
        target,
        source,
        result["size"],
        result["lost"],
        replaced.state,
        replaced.aside,
        extra={"event": "audit_restored"},
    )
    return Restored(result["size"], result["root"], result["lost"], replaced)


def _pruned(source: Path) -> bool:
    """Whether the (verified) backup in ``source`` holds pruned entries."""
    environment = Environment.open(source, readonly=True, lock=False)
    try:
        with environment.read() as txn:
            return AuditStore(environment).pruned_below(txn) > 0
    finally:
        environment.close()


def _copied(
    environment: Environment, recorded: tuple[int, bytes] | None
) -> tuple[int, bytes, dict[str, Any]]:
    """The size and root of the log copied into ``environment``, and what of ``recorded``
    (the watermark's size and root) it lacks (as :func:`~talos.audit.recovery.loss`)."""
    store = AuditStore(environment)
    with environment.read() as txn:
        size = store.meta_count(txn, b"size")
        root = store.fold(txn, size)
        if recorded is None:
            return size, root, {}
        wanted, wanted_root = recorded
        if size < wanted:
            return size, root, {"recorded_size": wanted, "lost": wanted - size}
        if wanted and store.fold(txn, wanted) != wanted_root:
            return size, root, {"recorded_size": wanted, "lost": wanted, "diverged": True}
        return size, root, {"recorded_size": wanted}


@dataclass(frozen=True, slots=True)
class Restored:
    """What :func:`restore` did: the backup's size and root, entries lost, the swap."""

    size: int
    root: bytes
    lost: int
    replaced: Replaced


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
