"""The heads a witness keeps: one per origin, for a bounded number of origins.

(docs/design/witnesses.md.) A witness stores the newest head it accepted of each origin's log (the
``witnessed`` table of the capabilities store, one record of at most
:data:`~talos.core.audit.cosignature.MAX_WITNESSED_RECORD` bytes per origin).
Any agent whose key log verifies can send a checkpoint, so the number of
origins is capped (``audit_config["witness_max_origins"]``, default 1024):

* Under the cap, a new origin's head is stored.
* At the cap, a new origin takes the place of the *unprotected* origin whose
  head was accepted longest ago (:func:`~talos.core.audit.cosignature.evictable`),
  in one durable transaction; counted and logged (``witness_origin_evicted``).
* Protected origins (the peers we have a session with, our configured
  witnesses) are never evicted; when every stored head is theirs, a new
  stranger is refused (``witness_full``) and a new protected origin is
  stored past the cap (their number is bounded by our own sessions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from talos.core.audit.cosignature import MAX_WITNESSED_RECORD, WitnessedHead, evictable
from talos.errors import MalformedFrame, TalosError
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.storage.tokens import TokenStore

__all__ = ["WitnessHeads"]


class WitnessHeads:
    """Stores witnessed heads within the cap on origins."""

    def __init__(
        self,
        tokens: TokenStore,
        metrics: AgentMetrics,
        logs: LimitedLog,
        *,
        max_origins: int,
        protected: Callable[[], frozenset[str]],
    ) -> None:
        self._tokens, self._metrics, self._logs = tokens, metrics, logs
        self._max, self._protected = max_origins, protected

    def store(self, origin: str, record: bytes, *, new: bool) -> bool:
        """Store ``origin``'s new head (``new``: none was stored); False when a new
        stranger finds no room.

        Raises:
            TalosError: the store failed, or the record is past its bound.
        """
        if len(record) > MAX_WITNESSED_RECORD:
            raise TalosError(f"a witnessed head of {len(record)} bytes is past the bound")
        if not new or self._tokens.witnessed_count() < self._max:
            self._tokens.put_witnessed(origin, record)
            return True
        protected = self._protected()
        heads = [(other, _accepted_ms(raw)) for other, raw in self._tokens.witnessed_all()]
        victim = evictable(heads, protected)
        if victim is None:
            if origin not in protected:
                return False
            self._tokens.put_witnessed(origin, record)  # a peer of ours: past the cap
            return True
        self._tokens.put_witnessed_evicting(origin, record, victim)
        self._metrics.witness_origin_evicted()
        self._logs.log(
            logging.INFO,
            "witness_origin_evicted",
            "dropped the witnessed head of %s to keep the head of %s (at most %d origins)",
            victim,
            origin,
            self._max,
            source="evicted",
            peer_id=victim,
        )
        return True


def _accepted_ms(raw: bytes) -> int:
    """When a stored head was accepted (0, first to go, when it does not decode)."""
    try:
        return WitnessedHead.from_bytes(raw).accepted_ms
    except MalformedFrame:
        return 0
