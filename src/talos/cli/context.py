"""State shared by every CLI command: the home, the clock, the random source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from talos.audit import AuditLog, LogSigner
from talos.core.clock import Clock
from talos.core.crypto import VerifyKey
from talos.core.identity import Identity
from talos.core.rng import Rng
from talos.storage.home import AgentHome
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG


@dataclass
class CliContext:
    """What the ``talos`` group hands to its commands."""

    home: Path
    clock: Clock = field(default=SYSTEM_CLOCK)
    rng: Rng = field(default=SYSTEM_RNG)

    @property
    def agent_home(self) -> AgentHome:
        return AgentHome(self.home)

    def audit_path(self, log: Path | None = None) -> Path:
        """``--log DIR`` if given, else the home's audit log."""
        return log if log is not None else self.agent_home.audit_path

    def open_audit_log(
        self, *, identity: Identity | None = None, log: Path | None = None, readonly: bool = False
    ) -> AuditLog:
        """Open the audit log; with ``identity``, blocks are signed by its current key.

        Raises:
            StorageError: the log cannot be opened (StoreCorrupted if damaged).
        """
        signer = None
        if identity is not None:
            signer = LogSigner(
                identity.signing_key, name=identity.agent_id, origin=f"{identity.agent_id}/audit"
            )
        return AuditLog.open(
            self.audit_path(log), clock=self.clock, signer=signer, readonly=readonly
        )

    def trusted_log_keys(self) -> list[VerifyKey] | None:
        """Every signing key in this agent's public key log (None if it has none).

        Raises:
            StoreCorrupted: the public key log is invalid.
        """
        keylog = self.agent_home.load_public_keylog()
        if keylog is None:
            return None
        return [VerifyKey(event.signing_key) for event in keylog.events]
