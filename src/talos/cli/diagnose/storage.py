"""``talos diagnose --storage``: key files, audit log, token store, lost state, agent state, disk.

The audit log is scanned in a child process
(:func:`talos.audit.chain_check.scan_chain`), like ``talos audit verify-chain``.
Nothing is opened for writing that does not already exist, and nothing is
repaired. The ``lost state`` line compares every store with the agent's
signed watermark (:mod:`talos.storage.lost_state`): a store missing, emptied
or shorter than recorded is a FAIL with the refusal ``talos run`` gives.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Final

import lmdb

from talos.audit import ChainReport
from talos.audit.chain_check import ScannedLog, scan_chain, scan_home_chain
from talos.cli.context import CliContext
from talos.cli.diagnose.agent_view import AgentView, LazyDiskState
from talos.cli.diagnose.findings import DAMAGED_HINT, Finding, Status, counted, human_size
from talos.cli.passphrases import KEY_ENV, passphrase_from
from talos.core.capability import Capability
from talos.core.crypto import VerifyKey
from talos.core.keylog import KeyLog
from talos.core.sealed import KIND_KEYFILE, check_intact
from talos.errors import (
    KeyLogInvalid,
    MalformedFrame,
    StateLost,
    StorageError,
    StoreCorrupted,
    TalosError,
    UnsupportedVersion,
)
from talos.storage.home import RECOVER_HINT, AgentHome
from talos.storage.lmdb import DATA_FILE
from talos.storage.lost_state import check_home, keylog_for_checks
from talos.storage.tokens import TokenStore
from talos.storage.watermark import Watermark, load_watermark

__all__ = ["FULL_DISK_BYTES", "disk_status", "storage_checks"]

#: Free space below this is a failure: the audit log (and so every send) is about to stop.
FULL_DISK_BYTES: Final = 1 << 20


def _identity_findings(home: AgentHome) -> list[Finding]:
    try:
        keylog = home.load_public_keylog()
    except StoreCorrupted as exc:
        return [Finding("key log", "fail", str(exc), "`talos recover --backup FILE`")]
    if keylog is None and home.has_identity():
        findings = [
            Finding(
                "key log",
                "warn",
                f"{home.keylog_path} is missing: signatures are checked against the key "
                "file's key log",
                RECOVER_HINT,
            )
        ]
        return [*findings, _key_file_finding(home)]
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
    return [*findings, _key_file_finding(home)]


def _key_file_finding(home: AgentHome) -> Finding:
    try:
        with home.identity_path.open("rb") as handle:
            check_intact(handle.read(1 << 20), kind=KIND_KEYFILE)
    except FileNotFoundError:
        return Finding("key file", "fail", f"{home.identity_path} is missing")
    except (OSError, StoreCorrupted, UnsupportedVersion) as exc:
        return Finding(
            "key file",
            "fail",
            f"{home.identity_path}: {exc}",
            "`talos recover --backup FILE` restores it",
        )
    return Finding("key file", "ok", "intact (checksum matches)")


def _audit_finding(
    ctx: CliContext, keylog: KeyLog | None, watermark: Watermark | None
) -> tuple[Finding, ScannedLog | None]:
    path = ctx.agent_home.audit_path
    if not (path / DATA_FILE).is_file():
        if watermark is not None and watermark.marks.audit_blocks:
            size = watermark.marks.audit_size
            missing = f"{path / DATA_FILE} is missing; the agent signed a checkpoint of {size}"
            return Finding("audit log", "fail", f"{missing} entries", StateLost.hint), None
        return Finding("audit log", "skip", f"no audit log at {path} yet"), None
    trusted = None if keylog is None else [VerifyKey(e.signing_key) for e in keylog.events]
    scanned = None
    try:
        if watermark is None:
            report = scan_chain(path, trusted)
        else:
            scanned = scan_home_chain(path, trusted, watermark.marks.audit_size)
            report = scanned.report
    except (StorageError, UnsupportedVersion) as exc:
        return Finding("audit log", "fail", f"not verified: {exc}"), None
    finding = _chain_finding(report, path, keylog is not None)
    return finding, scanned if report.ok else None


def _chain_finding(report: ChainReport, path: Path, trusted: bool) -> Finding:
    against = "this agent's key log" if trusted else "the keys the blocks carry"
    data = {"entries": report.entries, "blocks": report.blocks, "path": str(path)}
    if not report.ok:
        return Finding(
            "audit log",
            "fail",
            f"damaged: {report.problem}",
            "keep the damaged log; `talos audit restore --backup DIR` or "
            "`talos audit rebuild` (agent stopped; see `talos audit verify-chain`)",
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


def _token_finding(home: AgentHome) -> tuple[Finding, int | None]:
    """The token store's line, and its generation (None: no store, or damaged)."""
    path = home.path / "capabilities"
    if not (path / DATA_FILE).is_file():
        skip = Finding("token store", "skip", "no token store yet (no capability granted or held)")
        return skip, None
    try:
        with TokenStore.open(path) as store:
            granted = [Capability.from_bytes(data) for data in store.granted()]
            held = [Capability.from_bytes(data) for data in store.held()]
            logs = [KeyLog.from_bytes(data) for data in store.keylogs()]
            lists = list(store.revocation_lists())
            generation = store.generation()
    except (MalformedFrame, UnsupportedVersion, KeyLogInvalid, StorageError, lmdb.Error) as exc:
        return Finding("token store", "fail", f"{path}: {exc}", DAMAGED_HINT), None
    counts = {
        "granted": len(granted),
        "held": len(held),
        "key_logs": len(logs),
        "revocation_lists": len(lists),
    }
    finding = Finding(
        "token store",
        "ok",
        f"opens cleanly: {len(granted)} granted, {len(held)} held, "
        f"{counted(len(logs), 'key log')}, {counted(len(lists), 'revocation list')}",
        data={**counts, "generation": generation},
    )
    return finding, generation


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


def _agent_keylog(home: AgentHome) -> tuple[KeyLog | None, Finding | None]:
    """The key log to check against, or the failure that stops the lost-state check."""
    try:
        return keylog_for_checks(home, passphrase_from(None, KEY_ENV)), None
    except StateLost as exc:
        return None, Finding("lost state", "fail", str(exc), exc.hint)
    except TalosError as exc:  # damaged: reported by the key log and key file lines
        return None, Finding("lost state", "skip", f"not checked: {exc}")


def _watermark(home: AgentHome, keylog: KeyLog | None) -> tuple[Watermark | None, Finding | None]:
    if keylog is None:
        return None, None
    try:
        return load_watermark(home, keylog), None
    except StoreCorrupted as exc:  # StateLost too: signed by a key the log lacks
        return None, Finding("lost state", "fail", str(exc), exc.hint)


def _lost_state_finding(
    home: AgentHome,
    keylog: KeyLog | None,
    watermark: Watermark | None,
    audit: ScannedLog | None,
    generation: int | None,
) -> Finding:
    if keylog is None or not home.has_identity():
        return Finding("lost state", "skip", "no identity, so no watermark to compare with")
    if watermark is None:
        return Finding(
            "lost state",
            "warn",
            f"no watermark in {home.path}: the agent adopts its stores as they are at its "
            "next start (a home of an older Talos, or the file was deleted)",
        )
    if audit is None and (home.audit_path / DATA_FILE).is_file():
        return Finding("lost state", "skip", "not compared: the audit log is damaged")
    _, losses = check_home(home, keylog, audit=audit, capabilities=generation)
    if losses:
        return Finding(
            "lost state",
            "fail",
            "; ".join(str(loss) for loss in losses),
            StateLost.hint,
            {"lost": [str(loss) for loss in losses]},
        )
    marks = watermark.marks
    return Finding(
        "lost state",
        "ok",
        f"every store holds what the agent recorded: {marks.audit_size} entries signed, "
        f"capabilities generation {marks.capabilities}, {counted(marks.keys, 'key event')}",
    )


def storage_checks(
    ctx: CliContext, agent: AgentView, disk: LazyDiskState, max_size: int | None
) -> list[Finding]:
    home = ctx.agent_home
    keylog, problem = _agent_keylog(home)
    watermark, damaged = _watermark(home, keylog)
    audit, scanned = _audit_finding(ctx, keylog, watermark)
    tokens, generation = _token_finding(home)
    lost = problem or damaged or _lost_state_finding(home, keylog, watermark, scanned, generation)
    return [
        *_identity_findings(home),
        audit,
        tokens,
        lost,
        _state_finding(agent, disk),
        _disk_finding(home, max_size),
    ]
