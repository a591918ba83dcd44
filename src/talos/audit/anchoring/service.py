"""Anchoring beside a running agent: the wallet, the chain, and :meth:`Anchorer.run` as a task.

:meth:`AnchoringService.start` fails fast on what the operator must fix (a
key file that is not a key, a wrong keystore passphrase, a malformed
address); a chain that does not answer is not fatal: the driver counts the
failures and retries (docs/design/anchoring.md).
"""

from __future__ import annotations

import asyncio
import os
from typing import Final

from talos.audit.anchoring.chain import Chain
from talos.audit.anchoring.driver import Anchorer, AnchorMetrics
from talos.audit.anchoring.settings import PASSPHRASE_ENV, AnchorSettings
from talos.audit.anchoring.wallet import load_wallet
from talos.audit.anchoring.watch import AnchorWatch
from talos.audit.log import AuditLog
from talos.core.anchoring import Finality, Schedule
from talos.core.clock import Clock
from talos.core.rng import Rng

__all__ = ["AnchoringService"]
#: Seconds one JSON-RPC call of a running agent may take.
_RPC_TIMEOUT: Final = 5.0


class AnchoringService:
    """One agent's anchoring task."""

    def __init__(self, anchorer: Anchorer, chain: Chain) -> None:
        self.anchorer = anchorer
        self._chain = chain
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(anchorer.run(self._stop), name="anchoring")

    @classmethod
    def start(
        cls,
        settings: AnchorSettings,
        log: AuditLog,
        *,
        clock: Clock,
        rng: Rng,
        metrics: AnchorMetrics | None,
    ) -> AnchoringService:
        """Load the wallet and start anchoring (call on the event loop).

        Raises:
            AnchorKeyInvalid, WrongPassphrase: the key file.
            ConfigurationError: a malformed RPC URL or contract address.
        """
        wallet = load_wallet(
            settings.key_file, lambda: settings.passphrase or os.environ.get(PASSPHRASE_ENV)
        )
        chain = Chain(settings.rpc, timeout=_RPC_TIMEOUT)
        try:
            anchorer = Anchorer(
                log,
                chain,
                wallet,
                settings.contract,
                schedule=Schedule(interval=settings.interval, poll=settings.poll),
                finality=Finality(settings.confirmations),
                clock=clock,
                rng=rng,
                metrics=metrics,
                watch=AnchorWatch(
                    log,
                    chain,
                    settings.contract,
                    wallet.address,
                    interval=settings.interval,
                    metrics=metrics,
                ),
            )
        except BaseException:
            chain.close()
            raise
        return cls(anchorer, chain)

    async def stop(self) -> None:
        """Let the step in progress finish, then stop (before the log closes)."""
        self._stop.set()
        try:
            await self._task
        finally:
            self._chain.close()
