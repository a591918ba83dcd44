"""This home's agent as diagnose sees it: the running daemon, or its state on disk.

:class:`AgentView` asks a running daemon for its status and peers over the
control socket (:func:`talos.cli.control.call`). When no daemon runs,
:class:`DiskState` opens the agent state read-only, which needs the
identity's key (the state is sealed under it); without the key it says so
instead of failing. :class:`LazyDiskState` reads it at most once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from talos.audit import AuditLog
from talos.cli.control import call
from talos.cli.diagnose.findings import DAMAGED_HINT, Finding, Status, counted
from talos.cli.lockfile import running_agent_pid
from talos.cli.passphrases import KEY_ENV, existing_passphrase
from talos.core.clock import Clock
from talos.core.identity import Identity
from talos.core.peer_record import PeerRecord
from talos.errors import (
    ConfigurationError,
    IdentityNotFound,
    MalformedFrame,
    StorageError,
    StoreCorrupted,
    TalosError,
    UnsupportedVersion,
    WrongPassphrase,
)
from talos.storage.agent_state import AgentState, derive_storage_key
from talos.storage.home import AgentHome
from talos.storage.lmdb import DATA_FILE

__all__ = ["AGENT_TIMEOUT", "AgentView", "DiskState", "LazyDiskState", "agent_finding"]

#: Seconds to wait for the agent's control socket, a listener, a DHT node.
AGENT_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class AgentView:
    """The daemon of this home: not running, answering (with its status), or stuck."""

    pid: int | None = None
    status: dict[str, Any] | None = None
    peers: list[dict[str, Any]] = field(default_factory=list)
    problem: str = ""

    @property
    def running(self) -> bool:
        return self.status is not None

    @classmethod
    def read(cls, home: Path) -> AgentView:
        """Ask the home's daemon, if one holds the home, for its status and peers."""
        try:
            pid = running_agent_pid(home)
        except StorageError as exc:
            return cls(problem=str(exc))
        if pid is None:
            return cls()
        try:
            status = call(home, {"op": "status"}, timeout=AGENT_TIMEOUT)["status"]
            peers = call(home, {"op": "peers"}, timeout=AGENT_TIMEOUT)["peers"]
        except TalosError as exc:
            return cls(pid=pid, problem=f"{type(exc).__name__}: {exc}")
        return cls(pid=pid, status=status, peers=peers)


def agent_finding(agent: AgentView) -> Finding:
    if agent.running:
        assert agent.status is not None  # noqa: S101 -- running means a status came
        return Finding(
            "agent",
            "ok",
            f"running, pid {agent.pid}, instance {agent.status.get('instance_id', '?')}",
            data={"pid": agent.pid, "instance_id": agent.status.get("instance_id")},
        )
    if agent.problem:
        return Finding(
            "agent",
            "fail",
            f"pid {agent.pid or '?'} holds the home but does not answer: {agent.problem}",
            hint="see the agent's log (its stderr); restart it if it hangs",
            data={"pid": agent.pid},
        )
    return Finding("agent", "info", "not running (start it with `talos run`)")


@dataclass(frozen=True)
class DiskState:
    """What the stopped agent's state holds, or why it could not be read."""

    status: Status
    detail: str
    hint: str = ""
    peers: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, home: AgentHome, passphrase_file: Path | None, clock: Clock) -> DiskState:
        """Open the agent state read-only (needs the identity's key) and decode every row."""
        if not (home.audit_path / DATA_FILE).is_file():
            return cls("skip", "no agent state yet (the agent has not run in this home)")
        identity = _identity_for_state(home, passphrase_file)
        if isinstance(identity, DiskState):
            return identity
        try:
            return _state_summary(home, identity, clock)
        except StoreCorrupted as exc:
            return cls("fail", f"damaged: {exc}", DAMAGED_HINT)
        except (ConfigurationError, UnsupportedVersion, StorageError) as exc:
            if isinstance(exc, StorageError) and _log_without_state(home, clock):
                return cls("skip", "no agent state yet (the agent has not run in this home)")
            return cls("fail", f"cannot be opened: {exc}")


def _log_without_state(home: AgentHome, clock: Clock) -> bool:
    """Whether the audit log opens without the agent's databases (it was made by a command)."""
    try:
        with AuditLog.open(home.audit_path, clock=clock, readonly=True):
            return True
    except TalosError:
        return False


def identity_for_checks(home: AgentHome, passphrase_file: Path | None) -> Identity | DiskState:
    """The home's identity (its key), or why it cannot be opened, as a :class:`DiskState`."""
    return _identity_for_state(home, passphrase_file)


def _identity_for_state(home: AgentHome, passphrase_file: Path | None) -> Identity | DiskState:
    passphrase = None
    if home.needs_passphrase():
        passphrase = existing_passphrase(passphrase_file, KEY_ENV, "Key")
        if passphrase is None:
            return DiskState(
                "skip",
                "agent not running, and its state is sealed under the key passphrase",
                f"pass --key-passphrase-file or set {KEY_ENV}, or start the agent",
            )
    try:
        return home.load_identity(passphrase=passphrase)
    except IdentityNotFound:
        return DiskState("skip", "no identity in this home")
    except WrongPassphrase as exc:
        return DiskState("warn", f"not opened: {exc}", "check the key passphrase")
    except StoreCorrupted as exc:
        return DiskState("fail", f"not opened: {exc}", "`talos recover --backup FILE`")
    except TalosError as exc:
        return DiskState("fail", f"not opened: {type(exc).__name__}: {exc}")


def _state_summary(home: AgentHome, identity: Identity, clock: Clock) -> DiskState:
    """Raises: StoreCorrupted, ConfigurationError, UnsupportedVersion, StorageError."""
    key = derive_storage_key(identity.storage_secret)
    with AuditLog.open(
        home.audit_path, clock=clock, readonly=True, extra_databases=AgentState.DATABASES
    ) as log:
        state = AgentState(log, storage_key=key, clock=clock)
        pending = state.pending()  # unseals every queued payload
        sessions = state.session_peers()
        for peer in sessions:
            state.session(peer)  # unseals it
        inbox = _inbox_count(state)
        records = state.peer_records()
    queued: dict[str, int] = {}
    for item in pending:
        queued[item.peer] = queued.get(item.peer, 0) + 1
    endpoints: dict[str, str] = {}
    for data in records:
        with contextlib.suppress(MalformedFrame, UnsupportedVersion):
            record = PeerRecord.from_bytes(data)
            endpoints[record.agent_id] = record.endpoint
    peers = [
        {
            "agent_id": peer,
            "endpoint": endpoints.get(peer),
            "session": peer in sessions,
            "connected": None,
            "queued": queued.get(peer, 0),
        }
        for peer in sorted(set(endpoints) | set(queued) | set(sessions))
    ]
    counts = {"queued": len(pending), "inbox": inbox, "sessions": len(sessions)}
    detail = (
        f"opens cleanly: {len(pending)} queued, {inbox} in the inbox, "
        f"{counted(len(sessions), 'session')}, {counted(len(endpoints), 'cached peer record')}"
    )
    return DiskState("ok", detail, peers=peers, counts=counts)


def _inbox_count(state: AgentState) -> int:
    """Unseal every received message, a batch at a time; how many there are."""
    count, after = 0, -1
    while batch := state.inbox(after, 256):
        count += len(batch)
        after = batch[-1][0]
    return count


class LazyDiskState:
    """The disk state, read at most once and only when the daemon is not running."""

    def __init__(self, read: Callable[[], DiskState]) -> None:
        self._read = read
        self._value: DiskState | None = None

    def get(self) -> DiskState:
        if self._value is None:
            self._value = self._read()
        return self._value
