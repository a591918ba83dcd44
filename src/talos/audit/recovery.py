"""Replacing an agent's audit log without touching its state: the swap under restore and rebuild.

The audit log shares its LMDB environment with the agent state (sessions,
replay window, outbox, inbox, prekeys, anchors). Copying a whole environment
back would rewind that state: a ratchet chain would derive the same message
keys and AES-GCM nonces again for new plaintexts, and old messages would be
accepted again. So a restore or a rebuild never copies the environment:

* :func:`replace_log` builds a staging environment holding a copy of the
  current one's state databases and a new audit log, appends the entry that
  records why (sealed into a signed block when there is a signer), then moves
  the current environment aside, whole and untouched, and renames the
  staging one into its place;
* a state that cannot be read is not rolled back either: the new state is
  empty, its replay window starts with a floor at the replacement time
  (every older message is refused as stale) and sessions are re-established;
* :func:`rebuild` is ``talos audit rebuild``: the intact prefix of a damaged
  log, re-derived by :func:`talos.audit.rebuild.write_log`.

Design and decisions: docs/design/audit-recovery.md. Imported by
:mod:`talos.audit.backup` and :mod:`talos.audit.log`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from talos.audit.blocks import DEFAULT_BLOCK_ENTRIES, DEFAULT_BLOCK_SECONDS, BlockSealer
from talos.audit.rebuild import IntactLog, RebuiltLog, read_intact, salvage_intact, write_log
from talos.audit.records import prepare
from talos.audit.store import AuditStore
from talos.audit.writer import LogWriter
from talos.core.audit.checkpoint import Block, LogSigner
from talos.core.audit.entry import AuditKind
from talos.core.clock import Clock, time_ms
from talos.core.crypto import VerifyKey
from talos.errors import StorageError, StoreCorrupted
from talos.storage.agent_state import AgentState
from talos.storage.environment import Environment
from talos.storage.lmdb import DATA_FILE

__all__ = [
    "Reading",
    "Rebuilt",
    "Replaced",
    "fsync_tree",
    "loss",
    "rebuild",
    "replace_log",
    "write_read",
]

_log = logging.getLogger("talos.audit")


@dataclass(frozen=True, slots=True)
class Replaced:
    """How an audit log was replaced (by a restore or a rebuild)."""

    #: Where the replaced environment was moved, whole and untouched (``None``: there was none).
    aside: Path | None
    #: ``"kept"``: the agent state was copied over as it was; ``"reset"``: it was
    #: unusable, so the state starts empty with a replay floor at the replacement.
    state: str
    #: The size the replaced log's metadata recorded (``None`` if it could not be read).
    replaced_size: int | None


#: What :func:`~talos.audit.rebuild.read_intact` returns: found, entries, blocks, close.
Reading = tuple[IntactLog, Iterator[bytes], Iterator[Block], Callable[[], None]]


def write_read(
    environment: Environment,
    reading: Reading,
    trusted_keys: Collection[VerifyKey] | None,
    recorded: tuple[int, bytes] | None,
) -> tuple[IntactLog, RebuiltLog]:
    """Write what ``reading`` yields into ``environment`` (with the root at the recorded
    size, for :func:`loss`); close the reading."""
    found, entries, blocks, close = reading
    try:
        written = write_log(
            environment,
            entries,
            blocks=blocks,
            checkpoints=() if recorded is None else (recorded[0],),
            trusted_keys=trusted_keys,
        )
    finally:
        close()
    return found, written


def replace_log(
    target: Path,
    fill: Callable[[Environment], Mapping[str, Any]],
    *,
    clock: Clock,
    signer: LogSigner | None,
    kind: str,
    label: str,
    readable_state: bool = True,
) -> Replaced:
    """Replace the audit log of the environment in ``target``, keeping the agent state.

    A staging environment beside ``target`` gets a copy of every database of
    the current environment that is not the audit log's (the agent state,
    anchors: never rolled back), then ``fill(staging)`` writes the new audit
    log and returns the data of a ``kind`` entry, which is appended (and
    sealed into a block when there is a ``signer``). Only then is ``target``
    moved aside to ``<target>.<label>-<UTC stamp>``, never deleted, and the
    staging directory renamed into its place. If the current environment
    cannot be read (or ``readable_state`` is false: it must not be mapped),
    the state starts empty: sessions are re-established and the replay
    window refuses every message older than now.

    Raises:
        StorageError: the files could not be written or moved (``target``
            is then unchanged).
        Whatever ``fill`` raises (nothing is moved; the staging copy is removed).
    """
    stamp = datetime.fromtimestamp(clock.time(), tz=UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    staging = target.parent / f".{target.name}.{label}-{stamp}"
    aside = target.parent / f"{target.name}.{label}-{stamp}"
    state, replaced_size = "reset", None
    environment = Environment.open(staging, extra_databases=AgentState.DATABASES)
    try:
        why = "there was none" if readable_state else "its data file cannot be mapped"
        if (target / DATA_FILE).is_file() and readable_state:
            state, replaced_size, why = _copy_state(target, environment)
        if state == "reset":
            AgentState.start_after_loss(environment, floor_ms=time_ms(clock))
        data = dict(fill(environment))
        data.update(state=state)
        if replaced_size is not None:
            data.update(replaced_size=replaced_size)
        _append(environment, clock, signer, kind, data)
        if state == "reset":
            _log.warning(
                "no agent state kept from %s (%s); it starts empty: sessions are established "
                "again and older messages are refused",
                target,
                why,
                extra={"event": "agent_state_reset"},
            )
    except BaseException:
        environment.close()
        shutil.rmtree(staging, ignore_errors=True)  # our own staging copy, never the log
        raise
    environment.close()
    try:
        fsync_tree(staging)
        moved = None
        if target.exists():
            os.replace(target, aside)
            moved = aside
        os.replace(staging, target)
        fsync_tree(target.parent)
    except OSError as exc:
        raise StorageError(f"could not replace {target}: {exc.strerror or exc}") from exc
    return Replaced(moved, state, replaced_size)


def _append(
    environment: Environment,
    clock: Clock,
    signer: LogSigner | None,
    kind: str,
    data: Mapping[str, Any],
) -> None:
    """Append one entry to the log in ``environment``; seal it into a block if signed."""
    store = AuditStore(environment)
    with store.read() as txn:
        head = store.head(txn)
    sealer = BlockSealer(
        store,
        signer=signer,
        block_entries=DEFAULT_BLOCK_ENTRIES,
        block_seconds=DEFAULT_BLOCK_SECONDS,
    )
    writer = LogWriter(store, head, sealer, clock=clock)
    writer.commit([prepare(kind, data, None)])
    if signer is not None:
        writer.seal_now()


def _copy_state(target: Path, environment: Environment) -> tuple[str, int | None, str]:
    """Copy the state of ``target`` into ``environment``: ("kept", replaced size, "") or
    ("reset", None, why) if it cannot be read."""
    try:
        environment.copy_state_from(target)
    except StorageError as exc:
        return "reset", None, f"it cannot be read: {exc}"
    return "kept", _recorded_size(target), ""


def _recorded_size(target: Path) -> int | None:
    """The size the log's metadata in ``target`` records (None if it cannot be read)."""
    try:
        environment = Environment.open(target, readonly=True, lock=False)
    except StorageError:
        return None
    try:
        with environment.read() as txn:
            return AuditStore(environment).meta_count(txn, b"size")
    except StorageError:
        return None
    finally:
        environment.close()


def loss(written: RebuiltLog, recorded: tuple[int, bytes] | None) -> dict[str, Any]:
    """How much of what the watermark recorded the new log lacks (entry data)."""
    if recorded is None:
        return {}
    size, root = recorded
    if written.size < size:
        return {"recorded_size": size, "lost": size - written.size}
    if size and written.roots.get(size) != root:
        return {"recorded_size": size, "lost": size, "diverged": True}
    return {"recorded_size": size}


def fsync_tree(directory: Path) -> None:
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


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What :func:`rebuild` did: what was intact, what was written, the swap."""

    found: IntactLog
    log: RebuiltLog
    replaced: Replaced
    #: Entries recorded (by the damaged log or the watermark) that the rebuilt log lacks.
    lost: int


def rebuild(
    target: Path,
    *,
    clock: Clock,
    trusted_keys: Collection[VerifyKey] | None,
    signer: LogSigner | None = None,
    recorded: tuple[int, bytes] | None = None,
    unmappable: bool = False,
) -> Rebuilt:
    """Rebuild the damaged audit log at ``target`` from its intact entries.

    ``unmappable``: a scan found the data file unsafe to map (it failed its
    check, or killed the scanning child): its entries are salvaged with
    plain reads only, and its state is not read.

    Reads the intact prefix (:func:`~talos.audit.rebuild.read_intact`), writes
    it again with everything derived (:func:`~talos.audit.rebuild.write_log`;
    stored blocks kept while they match and are signed by ``trusted_keys``),
    appends ``AUDIT_REBUILT`` (first bad position, entries lost, blocks kept
    and dropped) sealed by ``signer``, and swaps it in with the agent state
    kept (:func:`replace_log`); the damaged environment is moved to
    ``<target>.damaged-<UTC stamp>``. ``recorded`` is the watermark's size and
    root: entries it records beyond the intact prefix are counted as lost too.

    Raises:
        StoreCorrupted: nothing can be read from the data file (not LMDB,
            truncated past its committed pages); nothing changed.
        StorageError: it cannot be opened, or the files could not be moved.
    """
    if not unmappable:
        _refuse_pruned(target)
    result: dict[str, Any] = {}

    def fill(environment: Environment) -> Mapping[str, Any]:
        reading = _salvaged(target, None) if unmappable else _readable(target)
        found, written = write_read(environment, reading, trusted_keys, recorded)
        lost = loss(written, recorded)
        result.update(found=found, log=written, lost=max(found.lost, lost.get("lost", 0)))
        data: dict[str, Any] = {
            "intact": found.intact,
            "lost": result["lost"],
            "blocks_kept": written.blocks,
            "blocks_dropped": written.dropped_blocks,
        }
        if found.first_bad is not None:
            data.update(first_bad=found.first_bad, problem=(found.problem or "")[:200])
        if found.salvaged:
            data.update(salvaged=True)
        if "recorded_size" in lost:
            data.update(recorded_size=lost["recorded_size"])
        return data

    replaced = replace_log(
        target,
        fill,
        clock=clock,
        signer=signer,
        kind=AuditKind.AUDIT_REBUILT,
        label="damaged",
        readable_state=not unmappable,
    )
    rebuilt = Rebuilt(result["found"], result["log"], replaced, result["lost"])
    _log.warning(
        "audit log %s rebuilt from its %d intact entries (first bad position %s, %d lost, "
        "agent state %s); damaged log kept at %s",
        target,
        rebuilt.found.intact,
        rebuilt.found.first_bad,
        rebuilt.lost,
        replaced.state,
        replaced.aside,
        extra={"event": "audit_rebuilt"},
    )
    return rebuilt


def _refuse_pruned(target: Path) -> None:
    """Refuse to rebuild a log whose payloads were pruned after anchoring: its entries
    cannot be written again from payloads it no longer has (nothing changes)."""
    try:
        environment = Environment.open(target, readonly=True, lock=False)
    except (StorageError, StoreCorrupted):
        return  # unreadable metadata: the rebuild reads what it can
    try:
        with environment.read() as txn:
            pruned = AuditStore(environment).pruned_below(txn)
    except (StorageError, StoreCorrupted):
        return
    finally:
        environment.close()
    if pruned:
        raise StoreCorrupted(
            f"audit log {target} is damaged and its entries below {pruned} were pruned after "
            "anchoring: a rebuild cannot write them again; nothing was changed. Restore a "
            "backup (`talos audit restore --backup DIR`) or fetch the log from its mirrors "
            "(`talos audit rebuild --from-peers`)",
            where=str(target),
            what="pruned log",
        )


def _readable(target: Path) -> Reading:
    """The intact prefix of ``target``: through LMDB, else salvaged from a truncated file.

    Raises:
        StoreCorrupted: nothing can be read (the original error).
    """
    try:
        return read_intact(target)
    except StoreCorrupted as exc:
        if exc.what != "truncated":
            raise
        return _salvaged(target, exc)


def _salvaged(target: Path, error: StoreCorrupted | None) -> Reading:
    """The intact prefix salvaged from ``target``'s pages, without mapping it.

    Raises:
        StoreCorrupted: no entry was found (``error``, if given).
    """
    found, salvaged = salvage_intact(target)
    if not found.intact:
        raise error or StoreCorrupted(
            f"no audit entry can be read from {target / DATA_FILE}",
            where=str(target / DATA_FILE),
            what="unreadable",
        )
    found.salvaged = True
    return found, iter(salvaged), iter(()), lambda: None
