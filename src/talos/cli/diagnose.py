"""``talos diagnose``: what is wrong with this agent, its network, its disk or its clock.

Four checks; without a flag all four run (``--all`` excepted)::

    --network           registry reachable (GET /v1/time) and how fast; DHT bootstrap
                        nodes; the agent's listener; each peer's connection and queue
    --storage           audit log integrity (the verify-chain scan, in its child
                        process); key log and key file; token store and agent state
                        open and decode; free disk space against the log's size limit
    --check-duplicates  whether the registry lists several live instances of this
                        identity (``--all``: of any identity); what the agent saw
    --check-clock       NTP-style offset from the registry's clock, best of
                        :data:`CLOCK_SAMPLES` round trips; the peers' offsets the
                        running agent measured from signed ACKs

Rules this module keeps:

* Every check works with the daemon (``talos run``) running or not. While it
  runs, it is asked through its control socket (``status``, ``peers``) and
  its stores are left to it; otherwise the on-disk state is opened read-only,
  which needs the identity's key (the state is sealed under it). Without the
  key, those lines say so instead of failing.
* Diagnose only reads. It opens nothing for writing that does not already
  exist, and never repairs: the hints name the command that does.
* A finding is ``ok``, ``info``, ``skip``, ``warn`` or ``fail``. Exit status 1
  means at least one ``fail`` (a duplicate instance, a clock beyond the
  rejection tolerance, damaged storage, an endpoint that does not answer);
  warnings alone exit 0. A check asked for by name that cannot start at all
  (no registry known, no identity) is an error with the exit status of
  ``docs/cli.md``; when every check runs by default, it is skipped instead.
* The registry is the one given with ``--registry``, else the running agent's,
  else ``$TALOS_REGISTRY_URL`` (what ``talos run`` defaults to). The home
  does not record which registry the agent used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import click
import lmdb
from rich.console import Console
from rich.markup import escape
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from talos.audit import AuditLog
from talos.audit.config import AuditConfig
from talos.cli.agent import _call, _parse_bootstrap
from talos.cli.audit import scan_chain
from talos.cli.context import CliContext
from talos.cli.identity import key_passphrase_option
from talos.cli.lockfile import running_agent_pid
from talos.cli.passphrases import KEY_ENV, existing_passphrase
from talos.core.capability import DEFAULT_CLOCK_SKEW, Capability
from talos.core.clock import Clock
from talos.core.clocksync import WARN_OFFSET, ClockSample, offset_from
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.replay import DEFAULT_MAX_SKEW_MS
from talos.core.sealed import KIND_KEYFILE, check_intact
from talos.discovery.dht import DhtNode
from talos.discovery.registry_client import DuplicateReport, RegistryClient
from talos.errors import (
    ConfigurationError,
    DiscoveryError,
    IdentityNotFound,
    KeyLogInvalid,
    MalformedFrame,
    PeerNotFound,
    StorageError,
    StoreCorrupted,
    TalosError,
    UnsupportedVersion,
    WrongPassphrase,
)
from talos.storage.agent_state import AgentState, derive_storage_key
from talos.storage.home import AgentHome
from talos.storage.lmdb import DATA_FILE
from talos.storage.tokens import TokenStore

__all__ = [
    "CLOCK_SAMPLES",
    "REJECT_TOLERANCE",
    "Finding",
    "best_sample",
    "clock_status",
    "diagnose",
    "disk_status",
]

Status = Literal["ok", "info", "skip", "warn", "fail"]
Address = tuple[str, int]

#: Beyond this offset (seconds) envelopes (replay window) and capabilities are refused.
REJECT_TOLERANCE: Final = min(DEFAULT_MAX_SKEW_MS / 1000, DEFAULT_CLOCK_SKEW)
#: Round trips to the registry's clock; the one with the shortest delay is kept.
CLOCK_SAMPLES: Final = 5
#: Round trips timed for the registry's latency.
LATENCY_SAMPLES: Final = 3
#: Seconds to wait for the agent's control socket, a listener, a DHT node.
AGENT_TIMEOUT: Final = 10.0
CONNECT_TIMEOUT: Final = 5.0
DHT_TIMEOUT: Final = 2.0
#: Free space below this is a failure: the audit log (and so every send) is about to stop.
FULL_DISK_BYTES: Final = 1 << 20
REGISTRY_ENV: Final = "TALOS_REGISTRY_URL"
EXIT_PROBLEM: Final = 1

_CHECKS: Final = ("network", "storage", "duplicates", "clock")
_MARKS: Final[dict[Status, str]] = {
    "ok": "green",
    "info": "cyan",
    "skip": "dim",
    "warn": "yellow",
    "fail": "bold red",
}
_SPLIT_BRAIN_HINT = (
    "stop every instance, decide which one's state is authoritative, rotate the keys "
    "(`talos rotate`), then run that one instance only"
)
_CLOCK_HINT = "synchronize the host clock (NTP), then restart the agent"
_DAMAGED_HINT = "stop the agent and restore it from a backup (see docs/operations.md, Storage)"


# -- findings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One line of the report: what was looked at, its verdict, and the evidence."""

    subject: str
    status: Status
    detail: str
    hint: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.data,
            "subject": self.subject,
            "status": self.status,
            "detail": self.detail,
            "hint": self.hint or None,
        }


def clock_status(offset: float, *, warn: float, tolerance: float = REJECT_TOLERANCE) -> Status:
    """``fail`` beyond the rejection tolerance, ``warn`` beyond ``warn``, else ``ok``."""
    if abs(offset) > tolerance:
        return "fail"
    if abs(offset) > warn:
        return "warn"
    return "ok"


def best_sample(samples: list[ClockSample]) -> ClockSample:
    """The sample with the shortest round trip: its offset has the smallest error bound.

    Raises:
        ValueError: no samples.
    """
    return min(samples, key=lambda sample: sample.delay)


# -- the agent, as seen from outside ---------------------------------------------------


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
            status = _call(home, {"op": "status"}, timeout=AGENT_TIMEOUT)["status"]
            peers = _call(home, {"op": "peers"}, timeout=AGENT_TIMEOUT)["peers"]
        except TalosError as exc:
            return cls(pid=pid, problem=f"{type(exc).__name__}: {exc}")
        return cls(pid=pid, status=status, peers=peers)


def _agent_finding(agent: AgentView) -> Finding:
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


# -- the on-disk agent state (daemon not running) ---------------------------------------


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
            return cls("fail", f"damaged: {exc}", _DAMAGED_HINT)
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
    key = derive_storage_key(identity.signing_key.seed())
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
        f"{_count(len(sessions), 'session')}, {_count(len(endpoints), 'cached peer record')}"
    )
    return DiskState("ok", detail, peers=peers, counts=counts)


def _inbox_count(state: AgentState) -> int:
    """Unseal every received message, a batch at a time; how many there are."""
    count, after = 0, -1
    while batch := state.inbox(after, 256):
        count += len(batch)
        after = batch[-1][0]
    return count


class _Lazy:
    """The disk state, read at most once and only when the daemon is not running."""

    def __init__(self, read: Callable[[], DiskState]) -> None:
        self._read = read
        self._value: DiskState | None = None

    def get(self) -> DiskState:
        if self._value is None:
            self._value = self._read()
        return self._value


# -- network --------------------------------------------------------------------------


async def _registry_reachability(registry: RegistryClient | None, source: str) -> Finding:
    if registry is None:
        return Finding("registry", "skip", "none known", _registry_hint())
    latencies = []
    try:
        for _ in range(LATENCY_SAMPLES):
            started = time.monotonic()
            await registry.time_ms()
            latencies.append(time.monotonic() - started)
    except TalosError as exc:
        return Finding(
            "registry",
            "fail",
            f"{registry.base_url} does not answer: {exc}",
            "established peers keep working; new peers need the registry or the DHT",
            {"url": registry.base_url, "source": source},
        )
    best = min(latencies)
    return Finding(
        "registry",
        "ok",
        f"{registry.base_url} answers in {best * 1000:.1f} ms (best of {len(latencies)})",
        data={"url": registry.base_url, "source": source, "latency_ms": round(best * 1000, 3)},
    )


async def _listener(endpoint: str) -> Finding:
    started = time.monotonic()
    try:
        async with connect(endpoint, open_timeout=CONNECT_TIMEOUT, compression=None):
            elapsed = time.monotonic() - started
    except (OSError, TimeoutError, WebSocketException) as exc:
        return Finding(
            "listener",
            "fail",
            f"{endpoint} does not accept WebSocket connections: {type(exc).__name__}: {exc}",
            "peers cannot reach this agent; see the agent's log",
            {"endpoint": endpoint},
        )
    return Finding(
        "listener",
        "ok",
        f"{endpoint} accepts WebSocket connections ({elapsed * 1000:.1f} ms)",
        data={"endpoint": endpoint, "latency_ms": round(elapsed * 1000, 3)},
    )


async def _dht_nodes(targets: list[tuple[str, Address]]) -> list[Finding]:
    """Ping each DHT node from a short-lived node of our own."""
    if not targets:
        return []
    node = DhtNode(rpc_timeout=DHT_TIMEOUT, lookup_timeout=2 * DHT_TIMEOUT)
    try:
        # Any interface: the answers must reach us from wherever the nodes are.
        await node.start(0, "0.0.0.0")  # noqa: S104 -- an ephemeral client socket
    except DiscoveryError as exc:
        return [Finding(label, "fail", f"not checked: {exc}") for label, _ in targets]
    try:
        return [await _dht_ping(node, label, address) for label, address in targets]
    finally:
        await node.stop()


async def _dht_ping(node: DhtNode, label: str, address: Address) -> Finding:
    where = f"{address[0]}:{address[1]}"
    try:
        answered = await node.bootstrap([address]) > 0
    except DiscoveryError as exc:
        answered, where = False, f"{where} ({exc})"
    if answered:
        return Finding(label, "ok", f"{where} answers", data={"address": where})
    return Finding(
        label,
        "fail",
        f"{where} does not answer",
        "the DHT is the fallback when the registry is down; check the address and UDP port",
        {"address": where},
    )


def _peer_findings(agent: AgentView, disk: _Lazy) -> list[Finding]:
    if agent.running:
        rows = _running_peers(agent)
    elif agent.problem:
        return [Finding("peers", "skip", "the agent does not answer")]
    else:
        state = disk.get()
        if state.status != "ok":
            return [Finding("peers", "skip", f"agent not running; {state.detail}", state.hint)]
        rows = state.peers
    if not rows:
        return [Finding("peers", "info", "no known peers")]
    return [_peer_finding(row) for row in rows]


def _running_peers(agent: AgentView) -> list[dict[str, Any]]:
    status = agent.status or {}
    queued: dict[str, int] = status.get("queued_by_peer", {})
    connected = set(status.get("connected", []))
    sessions = set(status.get("sessions", []))
    endpoints = {row["agent_id"]: row.get("endpoint") for row in agent.peers}
    return [
        {
            "agent_id": peer,
            "endpoint": endpoints.get(peer),
            "session": peer in sessions,
            "connected": peer in connected,
            "queued": int(queued.get(peer, 0)),
        }
        for peer in sorted(set(endpoints) | set(queued) | connected | sessions)
    ]


def _peer_finding(row: dict[str, Any]) -> Finding:
    connected = row["connected"]
    state = {
        True: "connected",
        False: "not connected",
        None: "not connected (agent not running)",
    }[connected]
    parts = [row["agent_id"], state, "session" if row["session"] else "no session"]
    parts.append(f"{row['queued']} queued")
    if row.get("endpoint"):
        parts.append(str(row["endpoint"]))
    status: Status = "warn" if row["queued"] and connected is False else "info"
    hint = "queued messages are delivered, in order, when the peer is reachable"
    return Finding("peer", status, ", ".join(parts), hint if status == "warn" else "", row)


async def _network_checks(
    agent: AgentView,
    registry: RegistryClient | None,
    source: str,
    bootstrap: list[Address],
    disk: _Lazy,
) -> list[Finding]:
    findings = [await _registry_reachability(registry, source)]
    targets = [("dht bootstrap", address) for address in bootstrap]
    status = agent.status or {}
    if agent.running and status.get("dht"):
        host, _, port = str(status["dht"]).rpartition(":")
        targets.append(("agent dht node", (host, int(port))))
    findings += await _dht_nodes(targets)
    findings.append(_agent_finding(agent))
    if agent.running and status.get("endpoint"):
        findings.append(await _listener(str(status["endpoint"])))
    if agent.running and status.get("registry_reachable") is False:
        findings.append(
            Finding(
                "agent registry",
                "warn",
                f"the agent could not reach {status.get('registry')} at its last attempt",
                "it retries; established peers keep working meanwhile",
            )
        )
    return findings + _peer_findings(agent, disk)


# -- storage ----------------------------------------------------------------------------


def _identity_findings(home: AgentHome) -> list[Finding]:
    try:
        keylog = home.load_public_keylog()
    except StoreCorrupted as exc:
        return [Finding("key log", "fail", str(exc), "`talos recover --backup FILE`")]
    if keylog is None:
        return [Finding("identity", "skip", f"no identity in {home.path} (`talos init`)")]
    findings = [
        Finding(
            "key log",
            "ok",
            f"verifies: {keylog.agent_id}, key sequence {keylog.state.sequence}",
            data={"agent_id": keylog.agent_id, "sequence": keylog.state.sequence},
        )
    ]
    try:
        with home.identity_path.open("rb") as handle:
            check_intact(handle.read(1 << 20), kind=KIND_KEYFILE)
    except FileNotFoundError:
        findings.append(Finding("key file", "fail", f"{home.identity_path} is missing"))
    except (OSError, StoreCorrupted, UnsupportedVersion) as exc:
        findings.append(
            Finding(
                "key file",
                "fail",
                f"{home.identity_path}: {exc}",
                "`talos recover --backup FILE` restores it",
            )
        )
    else:
        findings.append(Finding("key file", "ok", "intact (checksum matches)"))
    return findings


def _audit_finding(ctx: CliContext) -> Finding:
    path = ctx.agent_home.audit_path
    if not (path / DATA_FILE).is_file():
        return Finding("audit log", "skip", f"no audit log at {path} yet")
    try:
        trusted = ctx.trusted_log_keys()
    except StoreCorrupted:
        trusted = None  # reported by the key log line
    try:
        report = scan_chain(path, trusted)
    except (StorageError, UnsupportedVersion) as exc:
        return Finding("audit log", "fail", f"not verified: {exc}")
    against = "this agent's key log" if trusted is not None else "the keys the blocks carry"
    data = {"entries": report.entries, "blocks": report.blocks, "path": str(path)}
    if not report.ok:
        return Finding(
            "audit log",
            "fail",
            f"damaged: {report.problem}",
            "keep the damaged log; `talos audit restore --backup DIR` (agent stopped)",
            data,
        )
    return Finding(
        "audit log",
        "ok",
        f"intact: {_count(report.entries, 'entry', 'entries')}, {_count(report.blocks, 'block')}, "
        f"signatures checked against {against}",
        data={**data, "root": report.root.hex()},
    )


def _token_finding(home: AgentHome) -> Finding:
    path = home.path / "capabilities"
    if not (path / DATA_FILE).is_file():
        return Finding("token store", "skip", "no token store yet (no capability granted or held)")
    try:
        with TokenStore.open(path) as store:
            granted = [Capability.from_bytes(data) for data in store.granted()]
            held = [Capability.from_bytes(data) for data in store.held()]
            logs = [KeyLog.from_bytes(data) for data in store.keylogs()]
            lists = list(store.revocation_lists())
    except (MalformedFrame, UnsupportedVersion, KeyLogInvalid, StorageError, lmdb.Error) as exc:
        return Finding("token store", "fail", f"{path}: {exc}", _DAMAGED_HINT)
    counts = {
        "granted": len(granted),
        "held": len(held),
        "key_logs": len(logs),
        "revocation_lists": len(lists),
    }
    return Finding(
        "token store",
        "ok",
        f"opens cleanly: {len(granted)} granted, {len(held)} held, "
        f"{_count(len(logs), 'key log')}, {_count(len(lists), 'revocation list')}",
        data=counts,
    )


def _state_finding(agent: AgentView, disk: _Lazy) -> Finding:
    if agent.running:
        status = agent.status or {}
        return Finding(
            "agent state",
            "ok",
            f"open in the running agent (pid {agent.pid}): {status.get('queue_depth')} queued, "
            f"{status.get('inbox_depth')} in the inbox",
        )
    if agent.problem:
        return Finding("agent state", "skip", "held by an agent that does not answer")
    state = disk.get()
    return Finding("agent state", state.status, state.detail, state.hint, state.counts)


def _disk_finding(home: AgentHome, max_size: int | None) -> Finding:
    data_file = home.audit_path / DATA_FILE
    where = next((p for p in (home.audit_path, home.path) if p.is_dir()), None)
    if where is None:
        return Finding("disk", "skip", f"{home.path} does not exist")
    usage = shutil.disk_usage(where)
    used = data_file.stat().st_size if data_file.is_file() else 0
    status, detail, hint = disk_status(usage.free, usage.total, used, max_size)
    data = {"free_bytes": usage.free, "log_bytes": used, "max_size_bytes": max_size}
    return Finding("disk", status, detail, hint, data)


def disk_status(free: int, total: int, used: int, limit: int | None) -> tuple[Status, str, str]:
    """Verdict, detail and hint on the disk under an audit log of ``used`` bytes.

    ``fail``: less than :data:`FULL_DISK_BYTES` free, or the log at its
    ``limit``. ``warn``: the disk would fill before the log reaches its limit,
    the log is over 90% of it, or (no limit) under 10% of the disk is free.
    """
    text = f"{_size(free)} free of {_size(total)}; the audit log holds {_size(used)}"
    if free < FULL_DISK_BYTES:
        full = "free space now: audit appends fail (AuditFull), and so do sends"
        return "fail", f"{text}: the disk is full", full
    if limit is None:
        text += ", with no size limit: it grows until the disk is full"
        if free < total // 10:
            return "warn", text, "less than 10% of the disk is free"
        return "ok", text, ""
    room = limit - used
    text += f" of its {_size(limit)} limit"
    if room <= 0:
        return "fail", f"{text}: the log is full", "raise max_size_gb"
    if free < room:
        early = f"{text}: the disk fills {_size(room - free)} before the log reaches its limit"
        return "warn", early, "free disk space, or lower max_size_gb"
    if used > limit * 0.9:
        return "warn", f"{text}: over 90% used", "raise max_size_gb"
    return "ok", text, ""


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _storage_checks(
    ctx: CliContext, agent: AgentView, disk: _Lazy, max_size: int | None
) -> list[Finding]:
    home = ctx.agent_home
    return [
        *_identity_findings(home),
        _audit_finding(ctx),
        _token_finding(home),
        _state_finding(agent, disk),
        _disk_finding(home, max_size),
    ]


# -- duplicates -------------------------------------------------------------------------


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _report_finding(report: DuplicateReport, agent: AgentView) -> Finding:
    status = agent.status or {}
    own_instance = status.get("instance_id") if status.get("agent_id") == report.agent_id else None
    instances = [
        {
            "instance_id": i.instance_id,
            "endpoint": i.endpoint,
            "first_seen": _iso(i.first_seen_ms),
            "issued": _iso(i.issued_ms),
            "expires": _iso(i.expires_ms),
            "this_agent": i.instance_id == own_instance,
        }
        for i in report.instances
    ]
    data = {"agent_id": report.agent_id, "duplicate": report.duplicate, "instances": instances}
    if not report.duplicate:
        count = len(instances)
        return Finding(
            "registry",
            "ok",
            f"{report.agent_id}: {_count(count, 'live instance')}, no duplicate",
            data=data,
        )
    listed = "; ".join(
        f"{i.instance_id[:12]} at {i.endpoint} (first seen {_iso(i.first_seen_ms)}"
        + (", this agent)" if i.instance_id == own_instance else ")")
        for i in report.instances
    )
    return Finding(
        "registry",
        "fail",
        f"{report.agent_id} runs as {len(instances)} live instances: {listed}",
        _SPLIT_BRAIN_HINT,
        data,
    )


async def _duplicate_checks(
    registry: RegistryClient | None,
    agent_id: str | None,
    every: bool,
    agent: AgentView,
) -> list[Finding]:
    findings: list[Finding] = []
    if registry is None:
        findings.append(Finding("registry", "skip", "no registry known", _registry_hint()))
    else:
        findings += await _registry_duplicates(registry, agent_id, every, agent)
    return findings + _seen_duplicates(agent)


async def _registry_duplicates(
    registry: RegistryClient, agent_id: str | None, every: bool, agent: AgentView
) -> list[Finding]:
    findings: list[Finding] = []
    try:
        if agent_id is None:
            findings.append(Finding("registry", "skip", "no (valid) identity in this home"))
        else:
            findings.append(_report_finding(await registry.duplicates(agent_id), agent))
        if every:
            reports = [r for r in await registry.all_duplicates() if r.duplicate]
            findings += [_report_finding(r, agent) for r in reports]
            if not reports:
                findings.append(
                    Finding("registry", "ok", "no identity the registry knows has duplicates")
                )
    except PeerNotFound as exc:
        findings.append(
            Finding(
                "registry",
                "warn",
                f"the registry does not report duplicates (an older version?): {exc}",
            )
        )
    except TalosError as exc:
        findings.append(
            Finding(
                "registry",
                "fail",
                f"duplicates not checked: {type(exc).__name__}: {exc}",
                "retry when the registry answers (see --network)",
            )
        )
    return findings


def _seen_duplicates(agent: AgentView) -> list[Finding]:
    if not agent.running:
        return [Finding("agent", "skip", "agent not running: no observations of peer instances")]
    seen: dict[str, int] = (agent.status or {}).get("duplicate_instances") or {}
    if not seen:
        return [Finding("agent", "ok", "the agent saw no peer speak from two instances at once")]
    return [
        Finding(
            "agent",
            "fail",
            f"{peer} spoke from two instances at once ({_count(count, 'time')})",
            f"tell {peer}'s operator: {_SPLIT_BRAIN_HINT}",
            {"agent_id": peer, "count": count},
        )
        for peer, count in sorted(seen.items())
    ]


# -- clock ------------------------------------------------------------------------------


async def _registry_offset(registry: RegistryClient, clock: Clock) -> ClockSample:
    """Best of :data:`CLOCK_SAMPLES` NTP exchanges; the sample's offset is registry - local.

    Raises:
        TalosError: the registry does not answer (or not with a time).
    """
    samples = []
    for _ in range(CLOCK_SAMPLES):
        t1 = clock.time()
        server = await registry.time_ms() / 1000  # one timestamp: t2 = t3
        samples.append(offset_from(t1, server, server, clock.time()))
    return best_sample(samples)


def _describe_offset(ahead: float) -> str:
    return f"{abs(ahead):.3f} s {'ahead of' if ahead >= 0 else 'behind'}"


async def _clock_checks(
    registry: RegistryClient | None, clock: Clock, agent: AgentView, warn: float
) -> list[Finding]:
    findings: list[Finding] = []
    if registry is None:
        findings.append(Finding("registry", "skip", "no registry known", _registry_hint()))
    else:
        findings.append(await _registry_clock(registry, clock, warn))
    return findings + _peer_clocks(agent, warn)


async def _registry_clock(registry: RegistryClient, clock: Clock, warn: float) -> Finding:
    try:
        sample = await _registry_offset(registry, clock)
    except TalosError as exc:
        return Finding(
            "registry",
            "fail",
            f"not measured: {type(exc).__name__}: {exc}",
            "retry when the registry answers (see --network)",
        )
    ours = -sample.offset  # positive: this host is ahead
    status = clock_status(ours, warn=warn)
    detail = (
        f"this host's clock is {_describe_offset(ours)} the registry's "
        f"(± {sample.delay / 2 * 1000:.1f} ms, best of {CLOCK_SAMPLES})"
    )
    return Finding(
        "registry",
        status,
        detail + _consequence(status, warn),
        _CLOCK_HINT if status != "ok" else "",
        {
            "url": registry.base_url,
            "offset_s": round(ours, 6),
            "delay_s": round(sample.delay, 6),
            "samples": CLOCK_SAMPLES,
        },
    )


def _consequence(status: Status, warn: float) -> str:
    if status == "fail":
        return (
            f"; beyond the {REJECT_TOLERANCE:g} s clock-skew tolerance, envelopes and "
            "capabilities are refused"
        )
    if status == "warn":
        return f"; above the {warn:g} s warning threshold"
    return ""


def _peer_clocks(agent: AgentView, warn: float) -> list[Finding]:
    if not agent.running:
        return [Finding("peers", "skip", "agent not running: peer clocks are measured by it")]
    status = agent.status or {}
    findings = []
    if status.get("clock_offset_s") is not None:
        ours = float(status["clock_offset_s"])
        findings.append(
            Finding(
                "agent",
                "info",
                f"at its last announcement the agent found this host {_describe_offset(ours)} "
                "the registry",
                data={"offset_s": ours},
            )
        )
    measured: dict[str, dict[str, float]] = status.get("peer_clock") or {}
    if not measured:
        findings.append(
            Finding("peers", "info", "no peer measured yet (from signed ACKs to sent messages)")
        )
    for peer, sample in sorted(measured.items()):
        theirs = float(sample["offset_s"])  # positive: the peer is ahead
        verdict = clock_status(theirs, warn=warn)
        detail = (
            f"{peer}'s clock is {_describe_offset(theirs)} this host's "
            f"(± {float(sample['delay_s']) / 2 * 1000:.1f} ms, {float(sample['age_s']):.0f} s ago)"
        )
        findings.append(
            Finding(
                "peer",
                verdict,
                detail + _consequence(verdict, warn),
                "the host that is off must synchronize (NTP)" if verdict != "ok" else "",
                {"agent_id": peer, **sample},
            )
        )
    return findings


# -- the command ------------------------------------------------------------------------


def _registry_hint() -> str:
    return f"pass --registry URL or set ${REGISTRY_ENV}, or start the agent with one"


def _registry_url(option: str | None, agent: AgentView) -> tuple[str | None, str]:
    """The registry to ask and where its URL came from."""
    if option:
        return option, "--registry"
    running = (agent.status or {}).get("registry")
    if running:
        return str(running), "the running agent"
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return env, f"${REGISTRY_ENV}"
    return None, ""


@dataclass(frozen=True)
class _Options:
    checks: tuple[str, ...]
    explicit: bool
    every: bool
    warn: float
    bootstrap: list[Address]
    max_size: int | None
    passphrase_file: Path | None


def _preconditions(options: _Options, url: str | None, home: AgentHome) -> str | None:
    """The local agent id for the duplicate check (None: none, or not needed).

    Raises:
        ConfigurationError: a check asked for by name needs a registry and none is known.
        IdentityNotFound, StoreCorrupted: --check-duplicates without --all and no
            (valid) identity.
    """
    needs_registry = {"duplicates", "clock"} & set(options.checks)
    if options.explicit and needs_registry and url is None:
        raise ConfigurationError(
            f"--check-{'clock' if 'clock' in needs_registry else 'duplicates'} needs a registry; "
            + _registry_hint()
        )
    if "duplicates" not in options.checks:
        return None
    try:
        keylog = home.load_public_keylog()
    except StoreCorrupted:
        if options.explicit and not options.every:
            raise
        return None
    if keylog is None and options.explicit and not options.every:
        raise IdentityNotFound(f"no identity in {home.path}; the duplicate check needs one")
    return None if keylog is None else keylog.agent_id


async def _remote_checks(
    ctx: CliContext,
    options: _Options,
    agent: AgentView,
    url: tuple[str | None, str],
    agent_id: str | None,
    disk: _Lazy,
) -> dict[str, list[Finding]]:
    results: dict[str, list[Finding]] = {}
    registry = None if url[0] is None else RegistryClient(url[0])
    try:
        if "network" in options.checks:
            results["network"] = await _network_checks(
                agent, registry, url[1], options.bootstrap, disk
            )
        if "duplicates" in options.checks:
            results["duplicates"] = await _duplicate_checks(
                registry, agent_id, options.every, agent
            )
        if "clock" in options.checks:
            results["clock"] = await _clock_checks(registry, ctx.clock, agent, options.warn)
    finally:
        if registry is not None:
            await registry.aclose()
    return results


def _print_report(
    ctx: CliContext, agent: AgentView, url: tuple[str | None, str], results: dict[str, Any]
) -> None:
    console = Console(highlight=False, soft_wrap=True)
    registry = "none known" if url[0] is None else f"{url[0]} (from {url[1]})"
    state = (
        f"running (pid {agent.pid})"
        if agent.running
        else ("not answering" if agent.problem else "not running")
    )
    for label, value in (("home", str(ctx.home)), ("agent", state), ("registry", registry)):
        console.print(f"{label:<10}{escape(value)}")
    for check in _CHECKS:
        if check in results:
            console.print(f"\n[bold]{check}[/]")
            for finding in results[check]:
                _print_finding(console, finding)
    problems, warnings = _tally(results)
    console.print()
    if problems:
        console.print(
            f"[bold red]{_count(problems, 'problem')} found[/]"
            + (f", {_count(warnings, 'warning')}" if warnings else "")
        )
    elif warnings:
        console.print(f"[yellow]no problem found; {_count(warnings, 'warning')}[/]")
    else:
        console.print("[green]no problem found[/]")


def _print_finding(console: Console, finding: Finding) -> None:
    mark = f"[{_MARKS[finding.status]}]{finding.status.upper():<5}[/]"
    console.print(f"  {mark} {escape(finding.subject):<15} {escape(finding.detail)}")
    if finding.hint:
        console.print(f"  {'':<5} {'':<15} [dim]hint: {escape(finding.hint)}[/]")


def _tally(results: dict[str, list[Finding]]) -> tuple[int, int]:
    findings = [f for check in results.values() for f in check]
    return sum(f.status == "fail" for f in findings), sum(f.status == "warn" for f in findings)


def _json_report(
    ctx: CliContext, agent: AgentView, url: tuple[str | None, str], results: dict[str, Any]
) -> dict[str, Any]:
    problems, warnings = _tally(results)
    return {
        "ok": problems == 0,
        "problems": problems,
        "warnings": warnings,
        "home": str(ctx.home),
        "agent": {
            "running": agent.running,
            "pid": agent.pid,
            "problem": agent.problem or None,
        },
        "registry": {"url": url[0], "source": url[1] or None},
        "checks": {
            check: [finding.to_json() for finding in findings]
            for check, findings in results.items()
        },
    }


def _max_size(ctx: click.Context, param: click.Parameter, value: float | None) -> int | None:
    try:
        return AuditConfig.from_mapping({"max_size_gb": value}).max_size_bytes
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@contextlib.contextmanager
def _quiet_dht() -> Iterator[None]:
    """Keep kademlia's per-RPC logging of an unanswered ping off the report."""
    loggers = [logging.getLogger(name) for name in ("kademlia", "rpcudp", "talos.discovery.dht")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@click.command()
@click.option("--network", is_flag=True, help="Registry, DHT, listener, peers and queues.")
@click.option("--storage", is_flag=True, help="Audit log, key files, token store, state, disk.")
@click.option(
    "--check-duplicates", is_flag=True, help="Is this identity running as several instances?"
)
@click.option(
    "--all", "every", is_flag=True, help="With --check-duplicates: any identity with duplicates."
)
@click.option("--check-clock", is_flag=True, help="This host's clock against the registry's.")
@click.option(
    "--warn-threshold",
    type=click.FloatRange(min=0),
    default=WARN_OFFSET,
    show_default=True,
    metavar="S",
    help="Warn about clock offsets above S seconds.",
)
@click.option(
    "--registry",
    "registry_url",
    default=None,
    metavar="URL",
    help=f"Registry to ask (default: the running agent's, else ${REGISTRY_ENV}).",
)
@click.option(
    "--dht-bootstrap",
    multiple=True,
    metavar="HOST:PORT",
    callback=_parse_bootstrap,
    help="A DHT node to check (repeatable).",
)
@click.option(
    "--audit-max-size-gb",
    type=float,
    default=None,
    callback=_max_size,
    metavar="G",
    help="The audit log's size limit, as given to audit_config (default: none).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@key_passphrase_option
@click.pass_obj
def diagnose(
    ctx: CliContext,
    network: bool,
    storage: bool,
    check_duplicates: bool,
    every: bool,
    check_clock: bool,
    warn_threshold: float,
    registry_url: str | None,
    dht_bootstrap: list[Address],
    audit_max_size_gb: int | None,
    as_json: bool,
    key_passphrase_file: Path | None,
) -> None:
    """Check network, storage, duplicate instances and clock; exit 1 if a problem is found.

    Without a check flag every check runs. Works whether the agent runs or not.
    \f
    Raises:
        ConfigurationError: a check asked for by name needs a registry and none is known,
            or the registry URL is invalid.
        IdentityNotFound: --check-duplicates (without --all) in a home without an identity.
    """
    if every and not check_duplicates:
        raise click.UsageError("--all goes with --check-duplicates")
    flags = {
        "network": network,
        "storage": storage,
        "duplicates": check_duplicates,
        "clock": check_clock,
    }
    explicit = any(flags.values())
    options = _Options(
        checks=tuple(c for c in _CHECKS if flags[c] or not explicit),
        explicit=explicit,
        every=every,
        warn=warn_threshold,
        bootstrap=dht_bootstrap,
        max_size=audit_max_size_gb,
        passphrase_file=key_passphrase_file,
    )
    agent = AgentView.read(ctx.home)
    url = _registry_url(registry_url, agent)
    agent_id = _preconditions(options, url[0], ctx.agent_home)
    disk = _Lazy(lambda: DiskState.read(ctx.agent_home, key_passphrase_file, ctx.clock))
    with _quiet_dht():
        results = asyncio.run(_remote_checks(ctx, options, agent, url, agent_id, disk))
    if "storage" in options.checks:
        results["storage"] = _storage_checks(ctx, agent, disk, options.max_size)
    results = {check: results[check] for check in _CHECKS if check in results}
    if as_json:
        click.echo(json.dumps(_json_report(ctx, agent, url, results), indent=2, sort_keys=True))
    else:
        _print_report(ctx, agent, url, results)
    if _tally(results)[0]:
        raise click.exceptions.Exit(EXIT_PROBLEM)
