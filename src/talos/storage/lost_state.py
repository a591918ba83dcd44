"""Refusing lost state: each store compared with what the agent's watermark records.

:mod:`talos.storage.watermark` keeps the signed record of what the stores
held; this module compares (docs/design/lost-state.md):

* :func:`guard` runs when an agent starts, with its stores open and before
  it writes: a store that holds less than recorded is
  :class:`~talos.errors.StateLost` (exit 3 from the CLI), naming each store,
  what was recorded and what was found; otherwise the watermark is brought
  forward and kept so. A home without a watermark (older Talos, or the file
  deleted) adopts its stores as they are (``watermark_created``).
* :func:`check_home` and :func:`keylog_for_checks` are the read-only side, for
  ``talos diagnose --storage`` and ``talos audit verify-chain``.
* :func:`log_refusal` logs ``startup_refused`` with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from talos.core.audit.checkpoint import Block
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.errors import StateLost, StoreCorrupted
from talos.storage.home import AgentHome, atomic_write
from talos.storage.lmdb import DATA_FILE
from talos.storage.watermark import (
    CAPABILITIES_DIR,
    AuditView,
    Marks,
    Watermark,
    WatermarkKeeper,
    load_watermark,
    longest_keylog,
    marks_of,
)

__all__ = [
    "Loss",
    "check_home",
    "find_losses",
    "guard",
    "keylog_for_checks",
    "log_refusal",
    "lost",
]

_log = logging.getLogger("talos.storage")


@dataclass(frozen=True, slots=True)
class Loss:
    """A store that holds less than the watermark records."""

    store: str  # "key log", "audit log" or "capabilities store"
    path: Path
    detail: str

    def __str__(self) -> str:
        return f"{self.store} {self.path} {self.detail}"


def find_losses(
    home: AgentHome,
    recorded: Marks,
    *,
    audit: AuditView | None,
    capabilities: int | None,
    keys: int | None,
) -> list[Loss]:
    """Every store that holds less than ``recorded`` (``None``: the store is missing)."""
    losses: list[Loss] = []
    path = home.keylog_path
    if keys is None:
        losses.append(Loss("key log", path, f"is missing ({_events(recorded.keys)} recorded)"))
    elif keys < recorded.keys:
        losses.append(Loss("key log", path, f"has {_events(keys)}; {recorded.keys} were recorded"))
    losses.extend(_audit_losses(home.audit_path / DATA_FILE, recorded, audit))
    path = home.path / CAPABILITIES_DIR / DATA_FILE
    store = "capabilities store"
    if capabilities is None and recorded.capabilities:
        detail = f"is missing (generation {recorded.capabilities} recorded)"
        losses.append(Loss(store, path, detail))
    elif capabilities is not None and capabilities < recorded.capabilities:
        detail = (
            f"is at generation {capabilities}; generation {recorded.capabilities} was "
            "recorded (emptied or rolled back)"
        )
        losses.append(Loss(store, path, detail))
    return losses


def _events(n: int) -> str:
    return f"{n} key event{'' if n == 1 else 's'}"


def _audit_losses(path: Path, recorded: Marks, audit: AuditView | None) -> list[Loss]:
    if not recorded.audit_blocks:
        return []
    signed = (
        f"the agent signed a checkpoint of {recorded.audit_size} entries "
        f"(block {recorded.audit_blocks - 1})"
    )
    if audit is None:
        return [Loss("audit log", path, f"is missing; {signed}")]
    if audit.size < recorded.audit_size or audit.block_count < recorded.audit_blocks:
        gone = " (deleted or emptied)" if not audit.size else " (an older or shorter copy)"
        detail = f"holds {audit.size} entries and {audit.block_count} blocks{gone}; {signed}"
        return [Loss("audit log", path, detail)]
    if audit.root_at(recorded.audit_size) != recorded.audit_root:
        detail = (
            f"is another history: its root at {recorded.audit_size} entries is not the one "
            "the agent signed"
        )
        return [Loss("audit log", path, detail)]
    return []


def lost(home: AgentHome, losses: list[Loss]) -> StateLost:
    """The error for ``losses`` (``where`` names the first store's file)."""
    text = "; ".join(str(loss) for loss in losses)
    return StateLost(
        f"lost state in {home.path}: {text}",
        where=str(losses[0].path),
        losses=[str(loss) for loss in losses],
    )


class _Watchable(AuditView, Protocol):
    def watch_blocks(self, callback: Callable[[Block], None]) -> None: ...


class _Generations(Protocol):
    def generation(self) -> int: ...

    def watch(self, callback: Callable[[int], None]) -> None: ...


def guard(
    home: AgentHome,
    identity: Identity,
    audit: _Watchable,
    tokens: _Generations,
    *,
    current: Callable[[], Identity] | None = None,
) -> WatermarkKeeper:
    """Refuse lost state; otherwise bring the watermark up to date and keep it so.

    Called by an agent at start, with its stores open (before it writes).
    ``current`` gives the identity that signs later watermarks (the running
    agent's current one, which a rotation replaces); default ``identity``.
    Without a watermark, the stores are adopted as they are, and a missing
    public key log is written from the key file.

    Raises:
        StateLost: a store holds less than the watermark records.
        StoreCorrupted: the watermark is damaged or not this agent's.
        StorageError: the watermark (or key log) cannot be written.
    """
    keylog, public_keys = longest_keylog(home, identity)
    found = marks_of(audit, tokens.generation(), len(keylog.events))
    watermark = load_watermark(home, keylog)
    signer = current or identity
    keeper = WatermarkKeeper(home, signer, found)
    if watermark is None:
        if public_keys is None:
            atomic_write(home.keylog_path, identity.keylog.to_bytes())
        history = found.audit_blocks or found.capabilities or audit.size
        _log.log(
            logging.WARNING if history else logging.INFO,
            "no watermark in %s: adopted the stores as they are (%d entries, %d blocks, "
            "capabilities generation %d)",
            home.path,
            audit.size,
            found.audit_blocks,
            found.capabilities,
            extra={"event": "watermark_created"},
        )
        keeper.write(found)
    else:
        losses = find_losses(
            home,
            watermark.marks,
            audit=audit,
            capabilities=tokens.generation(),
            keys=public_keys,
        )
        if losses:
            raise lost(home, losses)
        keeper = WatermarkKeeper(home, signer, watermark.marks)
        keeper.advance(found)
    audit.watch_blocks(keeper.block_sealed)
    tokens.watch(keeper.capabilities_written)
    return keeper


def log_refusal(home: AgentHome, error: StoreCorrupted) -> None:
    """Log that the agent of ``home`` refused to start (event ``startup_refused``)."""
    _log.error(
        "agent in %s refused to start: %s",
        home.path,
        error,
        extra={
            "event": "startup_refused",
            "reason": type(error).__name__,
            "where": error.where,
            "what": error.what,
        },
    )


# -- read-only checks (diagnose, verify-chain) -------------------------------------------


def keylog_for_checks(home: AgentHome, passphrase: bytes | None) -> KeyLog | None:
    """The agent's key log for checking signatures: the public one, else the key file's.

    Never the keys a block carries: without ``keylog.cbor`` the key file's
    log is used when it opens (a local key, or ``passphrase``); ``None`` only
    for a home without an identity at all.

    Raises:
        StateLost: ``keylog.cbor`` is missing and the key file needs a
            passphrase that was not given.
        StoreCorrupted: the public key log or the key file is damaged.
        WrongPassphrase: ``passphrase`` does not open the key file.
    """
    public = home.load_public_keylog()
    if public is not None or not home.has_identity():
        return public
    if home.needs_passphrase() and passphrase is None:
        raise StateLost(
            f"key log {home.keylog_path} is missing, and the key file {home.identity_path} "
            "needs its passphrase to give the agent's key log (set TALOS_KEY_PASSPHRASE)",
            where=str(home.keylog_path),
            losses=[f"key log {home.keylog_path} is missing"],
        )
    return home.load_identity(passphrase=passphrase).keylog


def check_home(
    home: AgentHome,
    keylog: KeyLog,
    *,
    audit: AuditView | None,
    capabilities: int | None,
) -> tuple[Watermark | None, list[Loss]]:
    """The home's watermark and every store that holds less than it records.

    ``audit`` or ``capabilities`` ``None``: that store is missing.

    Raises:
        StoreCorrupted, StateLost: the watermark is damaged or not this agent's.
        StorageError: it cannot be read.
    """
    watermark = load_watermark(home, keylog)
    if watermark is None:
        return None, []
    public = home.load_public_keylog()
    keys = None if public is None else len(public.events)
    return watermark, find_losses(
        home, watermark.marks, audit=audit, capabilities=capabilities, keys=keys
    )
