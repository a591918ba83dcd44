"""``talos diagnose --storage``: key files, audit log, token store, agent state, disk.

The audit log is scanned in a child process
(:func:`talos.audit.chain_check.scan_chain`), like ``talos audit verify-chain``.
Nothing is opened for writing that does not already exist, and nothing is
repaired.
"""

from __future__ import annotations

import shutil
from typing import Final

import lmdb

from talos.audit.chain_check import scan_chain
from talos.cli.context import CliContext
from talos.cli.diagnose.agent_view import AgentView, LazyDiskState
from talos.cli.diagnose.findings import DAMAGED_HINT, Finding, Status, counted, human_size
from talos.core.capability import Capability
from talos.core.keylog import KeyLog
from talos.core.sealed import KIND_KEYFILE, check_intact
from talos.errors import (
    KeyLogInvalid,
    MalformedFrame,
    StorageError,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.storage.home import AgentHome
from talos.storage.lmdb import DATA_FILE
from talos.storage.tokens import TokenStore

__all__ = ["FULL_DISK_BYTES", "disk_status", "storage_checks"]

#: Free space below this is a failure: the audit log (and so every send) is about to stop.
FULL_DISK_BYTES: Final = 1 << 20


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
        f"intact: {counted(report.entries, 'entry', 'entries')}, "
        f"{counted(report.blocks, 'block')}, "
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
        return Finding("token store", "fail", f"{path}: {exc}", DAMAGED_HINT)
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
        f"{counted(len(logs), 'key log')}, {counted(len(lists), 'revocation list')}",
        data=counts,
    )


def _state_finding(agent: AgentView, disk: LazyDiskState) -> Finding:
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
    text = f"{human_size(free)} free of {human_size(total)}; the audit log holds {human_size(used)}"
    if free < FULL_DISK_BYTES:
        full = "free space now: audit appends fail (AuditFull), and so do sends"
        return "fail", f"{text}: the disk is full", full
    if limit is None:
        text += ", with no size limit: it grows until the disk is full"
        if free < total // 10:
            return "warn", text, "less than 10% of the disk is free"
        return "ok", text, ""
    room = limit - used
    text += f" of its {human_size(limit)} limit"
    if room <= 0:
        return "fail", f"{text}: the log is full", "raise max_size_gb"
    if free < room:
        early = f"{text}: the disk fills {human_size(room - free)} before the log reaches its limit"
        return "warn", early, "free disk space, or lower max_size_gb"
    if used > limit * 0.9:
        return "warn", f"{text}: over 90% used", "raise max_size_gb"
    return "ok", text, ""


def storage_checks(
    ctx: CliContext, agent: AgentView, disk: LazyDiskState, max_size: int | None
) -> list[Finding]:
    home = ctx.agent_home
    return [
        *_identity_findings(home),
        _audit_finding(ctx),
        _token_finding(home),
        _state_finding(agent, disk),
        _disk_finding(home, max_size),
    ]
