"""The anchoring driver: one agent's anchors, moved along by looking at the chain.

:class:`Anchorer` applies the rules of :mod:`talos.core.anchoring` to the
chain (:class:`~talos.audit.anchoring.chain.Chain`), the store
(:class:`~talos.audit.anchoring.store.AnchorStore`) and the log. Each
:meth:`Anchorer.step` is one round, blocking (run it in a worker thread):

1. the anchor in flight, if any, is looked up on chain (receipts of each of
   its broadcasts, the head, the ``finalized`` block, the wallet's nonce) and
   moved on: rebroadcast while pending ("already known" is success; "nonce
   too low" means it was mined, or lost its nonce, after the look: the step
   looks once more, logged as ``anchor_nonce_used``), replaced with higher
   fees when pending longer than ``replace_after``, recorded with its
   ``AUDIT_ANCHORED`` entry once final, back to pending after a reorg;
2. with none in flight, the newest signed checkpoint is anchored if the log
   grew past the last final anchor and the interval since the last start has
   passed: signed, **saved, then broadcast**;
3. once per interval, the :class:`~talos.audit.anchoring.watch.AnchorWatch`
   (if given; also after a failed 1 or 2, unless the chain is unreachable)
   reads every anchor of the log back from the chain and reports
   the ones that contradict the log (``ANCHOR_MISMATCH``) or come from
   another wallet.
4. with ``prune_after_anchor`` (the log's setting), after the first step and
   after each final anchor, the payloads the anchor covers are pruned
   (:meth:`talos.audit.AuditLog.prune_anchored`); a failure there is logged
   (``audit_prune_failed``) and tried again next step, never counted as an
   anchoring failure. The ``AUDIT_PRUNED`` entries alone do not make the log
   "grown" (no anchor is paid for them alone).

A failure of any kind (the RPC is down, times out or answers garbage; the
transaction is refused or reverts; the store fails) never reaches the
caller: it is counted (``talos_audit_anchor_failures_total``), logged
(``anchor_failed`` with the cause), and the next step is scheduled after an
exponential, jittered backoff capped at the interval. Local audit and
messaging go on untouched. :meth:`Anchorer.run` loops over the steps until
told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from talos.audit.anchoring.chain import Chain, NonceTooLow, RpcError, check_address
from talos.audit.anchoring.contract import anchor_calldata, artifact, log_id
from talos.audit.anchoring.store import AnchorStore
from talos.audit.anchoring.wallet import Wallet
from talos.audit.anchoring.watch import AnchorWatch, WatchMetrics
from talos.audit.log import AuditLog
from talos.audit.records import AuditRecord
from talos.core.anchoring import (
    Anchor,
    AnchorState,
    Broadcast,
    Finality,
    Inclusion,
    Observation,
    Outcome,
    Schedule,
    follow,
    wants_anchor,
)
from talos.core.audit.entry import AuditKind
from talos.core.clock import Clock
from talos.core.rng import Rng
from talos.errors import AnchoringError, AnchorRejected, ChainUnavailable, TalosError

__all__ = ["AnchorMetrics", "Anchorer", "StepReport"]

_log = logging.getLogger("talos.audit.anchoring")

#: Gas allowance over the node's estimate.
_GAS_MARGIN: Final = 1.25


class AnchorMetrics(WatchMetrics, Protocol):
    """What the driver and its watch report (:class:`talos.metrics.AgentMetrics` implements it)."""

    def audit_anchor_attempted(self, *, succeeded: bool) -> None: ...

    def track_audit_anchor_lag(self, lag: Callable[[], float]) -> None: ...

    def audit_pruned(self, entries: int) -> None: ...


@dataclass(frozen=True)
class StepReport:
    """What the last step saw, for tests and ``status``."""

    outcome: Outcome | None
    in_flight: Anchor | None
    error: TalosError | None


class Anchorer:
    """Anchors ``log``'s checkpoints through ``contract`` on ``chain``, paid by ``wallet``."""

    def __init__(
        self,
        log: AuditLog,
        chain: Chain,
        wallet: Wallet,
        contract: str,
        *,
        schedule: Schedule,
        finality: Finality,
        clock: Clock,
        rng: Rng,
        replace_after: float | None = None,
        metrics: AnchorMetrics | None = None,
        watch: AnchorWatch | None = None,
    ) -> None:
        self._log = log
        self._watch = watch
        self._store = AnchorStore(log)
        self._chain = chain
        self._wallet = wallet
        self._contract = check_address(contract)
        self.schedule = schedule
        self._finality = finality
        self._clock = clock
        self._rng = rng
        self._replace_after = schedule.interval if replace_after is None else replace_after
        self._metrics = metrics
        self._chain_id: int | None = None
        self._sent_at: float | None = None
        self._name: bytes | None = None
        self.last = StepReport(None, None, None)
        #: Whether a pruning pass is owed (at start, and after each final anchor).
        self._prune_due = True
        if metrics is not None:
            log.watch_pruning(lambda step: metrics.audit_pruned(step.entries))
            # At every scrape, not at each step: during an outage with a long
            # backoff the lag still grows as entries are appended.
            metrics.track_audit_anchor_lag(lambda: max(0, log.size - self._store.covered()))

    @property
    def store(self) -> AnchorStore:
        return self._store

    # -- one round ---------------------------------------------------------------------

    def step(self) -> float:
        """One round (see the module docstring); the monotonic time the next one is due."""
        now = self._clock.monotonic()
        outcome: Outcome | None = None
        anchor: Anchor | None = None
        failure: tuple[TalosError, Exception | None] | None = None
        try:
            self._check_chain()
            anchor = self._store.current()
            if anchor is not None:
                anchor, outcome = self._follow(anchor, now)
            if anchor is None:
                anchor = self._maybe_start(now)
        except Exception as exc:  # a bug must not end anchoring for good
            failure = _failure(exc)
        # After its own work, even when that failed (a drained wallet must not blind the
        # agent to what its wallet anchors), unless the chain is out of reach.
        unreachable = failure is not None and isinstance(failure[0], ChainUnavailable)
        if self._watch is not None and self._watch.due(now) and not unreachable:
            try:
                self._watch.check(now)
            except Exception as exc:
                failure = failure or _failure(exc)
        if failure is not None:
            self._failed(*failure, now)
            self.last = StepReport(outcome, None, failure[0])
        else:
            if self.schedule.failures:
                _log.info(
                    "anchoring works again after %d failed attempts",
                    self.schedule.failures,
                    extra={"event": "anchor_recovered", "failures": self.schedule.failures},
                )
            self.schedule = self.schedule.succeeded(now, in_flight=anchor is not None)
            self.last = StepReport(outcome, anchor, None)
        self._maybe_prune()
        return self.schedule.next_at

    async def run(self, stop: asyncio.Event) -> None:
        """Step until ``stop`` is set, waiting between steps as the schedule says."""
        while not stop.is_set():
            next_at = await asyncio.to_thread(self.step)
            delay = max(0.0, next_at - self._clock.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    # -- the chain and the contract ----------------------------------------------------

    def _check_chain(self) -> None:
        """Once: the chain id, and that ``contract`` holds TalosAnchor's code."""
        if self._chain_id is not None:
            return
        chain_id = self._chain.chain_id()
        code = self._chain.code(self._contract)
        if not code or not artifact().bytecode.endswith(code):
            raise AnchorRejected(f"{self._contract} does not hold the TalosAnchor contract")
        self._chain_id = chain_id

    def _observe(self, anchor: Anchor) -> Observation:
        head = self._chain.block_number()
        finalized = None
        if self._finality.confirmations is None:
            block = self._chain.block("finalized")
            finalized = None if block is None else block.number
        inclusion, reverted = self._receipts(anchor)
        nonce_used = False
        if inclusion is None and not reverted:
            if self._chain.nonce(self._wallet.address, "latest") > anchor.nonce:
                # Mined between the two looks? Look once more before calling it lost.
                inclusion, reverted = self._receipts(anchor)
                nonce_used = inclusion is None and not reverted
        return Observation(inclusion, reverted, head, finalized, nonce_used)

    def _receipts(self, anchor: Anchor) -> tuple[Inclusion | None, bool]:
        for broadcast in reversed(anchor.broadcasts):
            receipt = self._chain.receipt(broadcast.tx_hash)
            if receipt is not None:
                if not receipt.succeeded:
                    return None, True
                return Inclusion(receipt.tx_hash, receipt.block_number, receipt.block_hash), False
        return None, False

    # -- following the anchor in flight ------------------------------------------------

    def _follow(
        self, anchor: Anchor, now: float, *, again: bool = True
    ) -> tuple[Anchor | None, Outcome]:
        moved, outcome = follow(anchor, self._observe(anchor), self._finality)
        if outcome is Outcome.FINAL:
            self._finish(moved)
            return None, outcome
        if outcome in (Outcome.REVERTED, Outcome.LOST):
            self._store.drop()
            self._sent_at = None
            what = "reverted" if outcome is Outcome.REVERTED else "lost its nonce to another one"
            raise AnchorRejected(f"the anchor of size {anchor.tree_size} {what}")
        if moved != anchor:
            self._store.save(moved)
        if outcome is Outcome.REORGED:
            _log.warning(
                "the anchor of size %d left its block (reorg); now %s",
                moved.tree_size,
                moved.state.value,
                extra={"event": "anchor_reorged", "tree_size": moved.tree_size},
            )
        if moved.state is AnchorState.PENDING:
            if again:  # the look after a refusal only rebroadcasts what was sent
                moved = self._renewed(moved, now)
            try:
                self._chain.send_raw(moved.latest.raw)
            except NonceTooLow:
                if not again:
                    raise
                # Its nonce was used after the look: this anchor was mined meanwhile (anvil's
                # automine, a block landing), or another transaction took it. One more look
                # tells which; only a second refusal in a row is a failure.
                _log.info(
                    "the anchor of size %d lost its nonce after the look (mined meanwhile, or "
                    "another transaction took it): looking again",
                    moved.tree_size,
                    extra={"event": "anchor_nonce_used", "tree_size": moved.tree_size},
                )
                return self._follow(moved, now, again=False)
        return moved, outcome

    def _renewed(self, anchor: Anchor, now: float) -> Anchor:
        """A pending anchor to broadcast again: replaced with higher fees when it waited long."""
        if self._sent_at is None:
            self._sent_at = now
        elif now - self._sent_at >= self._replace_after:
            anchor = self._replace(anchor)
            self._sent_at = now
        return anchor

    def _replace(self, anchor: Anchor) -> Anchor:
        latest = anchor.latest
        fees = self._chain.fees()
        old = type(fees)(latest.max_fee, latest.priority_fee, fees.eip1559)
        offered = fees.at_least(old.raised())
        replacement = self._sign(anchor.tree_size, anchor.root, anchor.nonce, offered)
        anchor = anchor.with_broadcast(replacement)
        self._store.save(anchor)  # before the broadcast, as every version
        _log.info(
            "anchor of size %d replaced with higher fees",
            anchor.tree_size,
            extra={"event": "anchor_replaced", "tree_size": anchor.tree_size},
        )
        return anchor

    def _finish(self, anchor: Anchor) -> None:
        found = anchor.inclusion
        assert found is not None  # noqa: S101 -- follow() sets it on FINAL
        if not self._of_this_log(anchor):
            self._abandon(anchor)
            return
        data: dict[str, Any] = {
            "chain": self._chain_id,
            "contract": bytes.fromhex(self._contract[2:]),
            "tx": found.tx_hash,
            "block": found.block_number,
            "block_hash": found.block_hash,
            "size": anchor.tree_size,
            "root": anchor.root,
        }
        seq = self._store.finish(anchor, AuditRecord(AuditKind.AUDIT_ANCHORED, data))
        self._sent_at = None
        self._prune_due = True
        _log.info(
            "audit log anchored at size %d (block %d)",
            anchor.tree_size,
            found.block_number,
            extra={
                "event": "anchor_final",
                "tree_size": anchor.tree_size,
                "block": found.block_number,
                "tx": found.tx_hash,
                "entry": seq,
            },
        )

    def _of_this_log(self, anchor: Anchor) -> bool:
        """Whether ``anchor``'s root is this log's root at its size (a restore or rebuild
        since it was prepared may have replaced the log with another history)."""
        size = anchor.tree_size
        return size <= self._log.size and self._log.root_at(size) == anchor.root

    def _abandon(self, anchor: Anchor) -> None:
        """An anchor of a log that was replaced became final: it is not this log's
        anchor, so it is not recorded (no ``AUDIT_ANCHORED``); its nonce stays used."""
        self._store.drop()
        self._sent_at = None
        found = anchor.inclusion
        _log.warning(
            "the anchor of size %d is final but its root is not this log's (the log was "
            "restored or rebuilt since it was sent): not recorded; the log is anchored anew",
            anchor.tree_size,
            extra={
                "event": "anchor_abandoned",
                "tree_size": anchor.tree_size,
                "tx": None if found is None else found.tx_hash,
            },
        )

    # -- starting an anchor ------------------------------------------------------------

    def _maybe_start(self, now: float) -> Anchor | None:
        covered = self._store.covered()
        if not self.schedule.may_start(now) or not wants_anchor(self._log.size, covered, None):
            return None
        checkpoint = self._log.checkpoint()
        nonce = max(self._chain.nonce(self._wallet.address, "pending"), self._store.next_nonce())
        broadcast = self._sign(checkpoint.size, checkpoint.root, nonce, self._chain.fees())
        anchor = Anchor(
            checkpoint.size, checkpoint.root, nonce, (broadcast,), created=self._clock.time()
        )
        self._store.save(anchor)  # before the broadcast: a restart sends the same bytes
        self.schedule = self.schedule.started(now)
        self._sent_at = now
        _log.info(
            "anchoring the audit log at size %d (nonce %d)",
            anchor.tree_size,
            nonce,
            extra={"event": "anchor_submitted", "tree_size": anchor.tree_size, "nonce": nonce},
        )
        self._chain.send_raw(broadcast.raw)
        if self._metrics is not None:
            self._metrics.audit_anchor_attempted(succeeded=True)
        return anchor

    def _sign(self, size: int, root: bytes, nonce: int, fees: Any) -> Broadcast:
        call = "0x" + anchor_calldata(self._log_id(), size, root).hex()
        estimate = self._chain.estimate_gas(
            {"from": self._wallet.address, "to": self._contract, "data": call}
        )
        transaction = {
            "chainId": self._chain_id,
            "nonce": nonce,
            "to": self._contract,
            "data": call,
            "value": 0,
            "gas": int(estimate * _GAS_MARGIN),
            **fees.fields(),
        }
        signed = self._wallet.sign(transaction)
        return Broadcast(signed.tx_hash, signed.raw, fees.max_fee, fees.priority_fee)

    def _log_id(self) -> bytes:
        if self._name is None:
            self._name = log_id(self._log.checkpoint().origin)
        return self._name

    # -- pruning -----------------------------------------------------------------------

    def _maybe_prune(self) -> None:
        """Prune what the final anchors cover, if the log says so and a pass is owed."""
        if not (self._prune_due and self._log.prune_after_anchor):
            return
        try:
            steps = self._log.prune_anchored()
            self._store.pass_over([step.seq for step in steps])
        except TalosError as error:
            _log.warning(
                "pruning the audit log failed (%s): %s; trying again next step",
                type(error).__name__,
                error,
                extra={"event": "audit_prune_failed", "reason": type(error).__name__},
            )
            return
        self._prune_due = False

    # -- failures ------------------------------------------------------------------------

    def _failed(self, error: TalosError, bug: Exception | None, now: float) -> None:
        self.schedule = self.schedule.failed(now, self._rng)
        if self._metrics is not None:
            self._metrics.audit_anchor_attempted(succeeded=False)
        cause = error.message if isinstance(error, RpcError) else str(error)
        _log.log(
            logging.WARNING if bug is None else logging.ERROR,
            "anchoring failed (%s): %s; next try in %.1f s",
            type(error).__name__,
            cause,
            self.schedule.next_at - now,
            extra={
                "event": "anchor_failed",
                "reason": type(error).__name__,
                "failures": self.schedule.failures,
                "retry_in": round(self.schedule.next_at - now, 3),
            },
            exc_info=bug,
        )


def _failure(error: Exception) -> tuple[TalosError, Exception | None]:
    """A step's failure: the error to report, and the exception when it is a bug."""
    if isinstance(error, TalosError):
        return error, None
    return AnchoringError(f"unexpected {type(error).__name__}: {error}"), error
