"""A running agent reads its own anchors back from the chain: ``ANCHOR_MISMATCH`` as it happens.

Once per anchoring interval, after the driver's own work
(:meth:`talos.audit.anchoring.driver.Anchorer.step`; also when that work
failed, say for a wallet emptied by whoever else holds its key, but not when
the chain is unreachable), :meth:`AnchorWatch.check`
lists every ``Anchored`` event of the log's ``logId`` on the configured
contract and judges each against the local log
(:func:`talos.audit.anchoring.verify.judge`). The wallets that count are the
agent's configured anchoring wallet and the wallets of the log's earlier
``AUDIT_ANCHORED`` entries on this chain and contract (a wallet rotated
away from still speaks for the sizes it anchored); the entries themselves are
looked up once, at the first check.

* An anchor by one of those wallets whose root is not the log's at that size
  (or whose size is past the log's end), or an ``AUDIT_ANCHORED`` entry whose
  transaction is no longer in its block, is a **mismatch**: audited
  (``ANCHOR_MISMATCH``: chain, contract, transaction, block, size, root,
  submitter, reason), logged (``anchor_mismatch``, ERROR) and counted
  (``talos_audit_anchor_mismatches_total``, the ``AuditAnchorMismatch``
  alert). Each is reported once: the transactions of the log's
  ``ANCHOR_MISMATCH`` entries are not reported again after a restart.
* An anchor by any other wallet is **foreign**: anyone may call the contract
  with any ``logId``, so it is neither trusted nor an error, and it is not
  audited (a stranger paying gas must not write into the log). It is logged
  (``anchor_foreign``, WARNING when its root disagrees with the log, INFO
  when it agrees) and counted (``talos_audit_anchor_foreign_total{agrees}``),
  once per anchor per process.

A chain that does not answer makes the step fail like any anchoring failure
(counted, backed off): while it lasts the agent cannot see its anchors.
"""

from __future__ import annotations

import logging
from typing import Any, Final, Protocol

from talos.audit.anchoring.chain import Chain, check_address
from talos.audit.anchoring.contract import log_id
from talos.audit.anchoring.verify import (
    FOREIGN,
    MISMATCH,
    AnchorCheck,
    LogName,
    anchor_checks,
    anchored_names,
)
from talos.audit.log import AuditLog
from talos.core.audit.entry import MAX_TEXT_FIELD, AuditKind

__all__ = ["AnchorWatch", "WatchMetrics"]

_log = logging.getLogger("talos.audit.anchoring")
_EMPTY: Final = b""


class WatchMetrics(Protocol):
    """What the watch reports (:class:`talos.metrics.AgentMetrics` implements it)."""

    def audit_anchor_mismatched(self) -> None: ...

    def audit_anchor_foreign_found(self, *, agrees: bool) -> None: ...


class AnchorWatch:
    """Checks every anchor of ``log`` on ``contract`` once per ``interval`` (monotonic seconds)."""

    def __init__(
        self,
        log: AuditLog,
        chain: Chain,
        contract: str,
        wallet: str,
        *,
        interval: float,
        metrics: WatchMetrics | None = None,
    ) -> None:
        self._log = log
        self._chain = chain
        self._contract = check_address(contract)
        self._wallet = check_address(wallet)
        self._interval = interval
        self._metrics = metrics
        self._next_at = 0.0
        self._names: list[LogName] | None = None
        self._gone: list[AnchorCheck] = []
        self._reported: set[bytes] | None = None
        self._foreign: set[bytes] = set()

    def due(self, now: float) -> bool:
        return now >= self._next_at

    def check(self, now: float) -> list[AnchorCheck]:
        """Read and judge every anchor of the log; report what is new. Returns every check.

        Raises:
            ChainUnavailable, RpcError: the chain did not answer.
            AnchorMismatch: the contract is not TalosAnchor.
            AuditFull, StorageError: a mismatch could not be audited.
        """
        if self._names is None:
            self._names, self._gone = self._learn()
        if self._reported is None:
            self._reported = {
                bytes(entry.data.get("tx", _EMPTY))
                for entry in self._log.query(kind=AuditKind.ANCHOR_MISMATCH)
            }
        checks = [*self._gone, *anchor_checks(self._log, self._chain, self._names)]
        for check in checks:
            if check.verdict == MISMATCH and check.tx_hash not in self._reported:
                self._mismatch(check)
                self._reported.add(check.tx_hash)
            elif check.verdict == FOREIGN and check.tx_hash not in self._foreign:
                self._foreign_anchor(check)
                self._foreign.add(check.tx_hash)
        self._next_at = now + self._interval
        return checks

    def _learn(self) -> tuple[list[LogName], list[AnchorCheck]]:
        names, gone = anchored_names(self._log, self._chain)
        own = LogName(self._contract, log_id(self._log.checkpoint().origin), frozenset())
        merged = {(name.contract, name.log_id): name.wallets for name in names}
        key = (own.contract, own.log_id)
        merged[key] = merged.get(key, frozenset()) | {self._wallet}
        return [LogName(c, n, w) for (c, n), w in sorted(merged.items())], gone

    def _mismatch(self, check: AnchorCheck) -> None:
        data: dict[str, Any] = {
            "chain": self._chain.chain_id(),
            "contract": bytes.fromhex(self._contract[2:]),
            "tx": check.tx_hash,
            "block": check.block_number,
            "size": check.tree_size,
            "root": check.root,
            "submitter": bytes.fromhex(check.submitter[2:]) if check.submitter else _EMPTY,
            "reason": check.reason[:MAX_TEXT_FIELD],
        }
        seq = self._log.append(AuditKind.ANCHOR_MISMATCH, data)
        _log.error(
            "ANCHOR MISMATCH: %s (tx 0x%s, by %s)",
            check.reason,
            check.tx_hash.hex(),
            check.submitter or "the log's wallet",
            extra={
                "event": "anchor_mismatch",
                "tree_size": check.tree_size,
                "tx": check.tx_hash,
                "submitter": check.submitter,
                "entry": seq,
            },
        )
        if self._metrics is not None:
            self._metrics.audit_anchor_mismatched()

    def _foreign_anchor(self, check: AnchorCheck) -> None:
        agrees = bool(check.agrees)
        _log.log(
            logging.INFO if agrees else logging.WARNING,
            "another wallet (%s) anchored this log at size %d, %s; not trusted",
            check.submitter,
            check.tree_size,
            "with the log's root" if agrees else "with a root the log does not have",
            extra={
                "event": "anchor_foreign",
                "tree_size": check.tree_size,
                "tx": check.tx_hash,
                "submitter": check.submitter,
                "agrees": agrees,
            },
        )
        if self._metrics is not None:
            self._metrics.audit_anchor_foreign_found(agrees=agrees)
