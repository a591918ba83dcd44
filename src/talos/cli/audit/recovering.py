"""What ``talos audit restore`` and ``rebuild`` share: the home's signer and its watermark.

For the home's own log (no ``--log``) both commands are refused while the
agent runs, sign the entry that records them with the agent's key (so the
key passphrase may be asked for), compare the new log with the signed
watermark, and write the watermark's audit numbers from the new log once
what was lost is recorded in it (docs/design/audit-recovery.md). For a
log named with ``--log`` they do none of this: the entry is appended unsigned.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from talos.audit import AuditLog, LogSigner
from talos.cli.context import CliContext
from talos.cli.identity import load_identity
from talos.cli.lockfile import refuse_while_running
from talos.core.identity import Identity
from talos.errors import StoreCorrupted
from talos.storage.watermark import Watermark, WatermarkKeeper, load_watermark, longest_keylog

__all__ = ["HomeRecovery", "prepare"]

_err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(frozen=True, slots=True)
class HomeRecovery:
    """The home's identity and watermark, as a restore or rebuild of its log needs them."""

    path: Path
    identity: Identity | None = None
    watermark: Watermark | None = None

    @property
    def signer(self) -> LogSigner | None:
        identity = self.identity
        if identity is None:
            return None
        return LogSigner(
            identity.signing_key, name=identity.agent_id, origin=f"{identity.agent_id}/audit"
        )

    @property
    def recorded(self) -> tuple[int, bytes] | None:
        """The audit size and root the watermark records (``None`` without one)."""
        if self.watermark is None:
            return None
        marks = self.watermark.marks
        return marks.audit_size, marks.audit_root

    def follow(self, ctx: CliContext) -> None:
        """Write the watermark's audit numbers from the new log's last block.

        The new log ends in a block this command sealed after recording what
        it did (entries lost, blocks dropped), so its numbers are the agent's
        newest checkpoint, lower than before when something was lost. Only
        the audit numbers change; the capabilities and key-log numbers stay
        as recorded, so a loss elsewhere is still refused at start-up.
        """
        if self.identity is None or self.watermark is None:
            return
        with AuditLog.open(self.path, readonly=True) as log:
            blocks = log.block_count
            last = log.block(blocks - 1) if blocks else None
        marks = replace(
            self.watermark.marks,
            audit_size=0 if last is None else last.tree_size,
            audit_root=self.watermark.marks.audit_root if last is None else last.root,
            audit_blocks=blocks,
        )
        WatermarkKeeper(ctx.agent_home, self.identity, marks).write(marks)


def prepare(
    ctx: CliContext, log: Path | None, key_passphrase_file: Path | None, command: str
) -> HomeRecovery:
    """Refuse while the agent runs and load its identity and watermark (home log only).

    Raises:
        WrongPassphrase, KeyFileCorrupted: the identity cannot be opened.
    """
    path = ctx.audit_path(log)
    home = ctx.agent_home
    if log is not None or not home.has_identity():
        if log is None:
            refuse_while_running(home.path, command)
        return HomeRecovery(path)
    refuse_while_running(home.path, command)
    identity = load_identity(home, key_passphrase_file)
    keylog, _ = longest_keylog(home, identity)
    try:
        watermark = load_watermark(home, keylog)
    except StoreCorrupted as exc:
        _err.print(
            f"[yellow]note:[/] the watermark does not verify ({exc}); it is left as it is: "
            "`talos run` names it, `talos audit accept-lost-state` replaces it"
        )
        watermark = None
    return HomeRecovery(path, identity, watermark)
