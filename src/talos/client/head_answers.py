"""A witness's answer to a head query (talos.core.audit.head_query; docs/design/audit-recovery.md).

A peer whose audit database died asks, with ``talos audit rebuild
--from-peers``, which head of *its own* log we hold as its witness. The
answer is that head (the ``witnessed`` record of the capabilities store),
freshly cosigned over the bare checkpoint body, or ``REFUSED no_head``.
Nothing is stored. Queries have their own rate limit per origin, so a
rebuild is never starved by the checkpoint limiter (nor the reverse).
:class:`~talos.client.witnessing.Witnessing` hands CHECKPOINT envelopes
whose note is ``HEAD_QUERY`` here, with its way to answer. A refused query
is counted and logged as what it is, a head query refused
(``talos_audit_witness_head_queries_total{outcome}``,
``witness_head_query_refused``), never as a refused checkpoint: nothing was
submitted for cosigning.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from talos.client.own_keys import OwnIdentity
from talos.core import wire
from talos.core.audit.checkpoint import Checkpoint
from talos.core.audit.cosignature import Cosignature, WitnessedHead, origin_of
from talos.core.audit.head_query import NO_HEAD
from talos.core.clock import Clock
from talos.core.ratelimit import RateLimiter
from talos.errors import MalformedFrame, TalosError
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.storage.tokens import TokenStore
from talos.transport import Link

__all__ = ["HEAD_QUERY_BURST", "HEAD_QUERY_RATE", "HeadAnswers"]

_log = logging.getLogger("talos.client")

#: Head queries answered per origin: a burst, then this many per second.
HEAD_QUERY_BURST: Final = 16
HEAD_QUERY_RATE: Final = 1 / 5

#: ``Witnessing._answer(link, envelope, checkpoint, status, held, reason, cosig)``.
Answer = Callable[
    [
        Link,
        wire.Envelope,
        Checkpoint | None,
        wire.CosignStatus,
        WitnessedHead | None,
        str,
        Cosignature | None,
    ],
    Awaitable[None],
]


class HeadAnswers:
    """Answers head queries with the heads this agent holds as a witness."""

    def __init__(
        self,
        *,
        own: OwnIdentity,
        tokens: TokenStore,
        clock: Clock,
        answer: Answer,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._own, self._tokens, self._clock = own, tokens, clock
        self._metrics = metrics
        self._answer = answer
        self._limit = RateLimiter(rate=HEAD_QUERY_RATE, burst=HEAD_QUERY_BURST)
        self._logs = LimitedLog(_log, clock)

    async def answer(self, link: Link, envelope: wire.Envelope) -> None:
        """The sender asks which head of its own log we hold: answer it, freshly
        cosigned (``rebuild --from-peers`` checks the rebuilt log against it)."""
        origin = envelope.sender
        if not self._limit.allow(origin, self._clock.monotonic()):
            await self._refuse(link, envelope, "rate_limited", "too many head queries")
            return
        try:
            stored = self._tokens.witnessed(origin)
            held = None if stored is None else WitnessedHead.from_bytes(stored)
        except (TalosError, MalformedFrame) as exc:
            await self._refuse(link, envelope, "storage", f"witness store: {exc}")
            return
        if held is None:
            self._count(NO_HEAD)
            await self._answer(link, envelope, None, wire.CosignStatus.REFUSED, None, NO_HEAD, None)
            return
        checkpoint = Checkpoint(origin_of(origin), held.size, held.root)
        identity = self._own.current
        cosig = Cosignature.sign(
            checkpoint.body(),
            witness=identity.agent_id,
            key_sequence=identity.sequence,
            key=identity.signing_key,
            timestamp=int(self._clock.time()),
        )
        self._count("answered")
        _log.info(
            "told %s the head of its audit log we hold: size %d",
            origin,
            held.size,
            extra={"event": "witness_head_served", "peer_id": origin, "size": held.size},
        )
        await self._answer(link, envelope, checkpoint, wire.CosignStatus.COSIGNED, held, "", cosig)

    async def _refuse(self, link: Link, envelope: wire.Envelope, reason: str, detail: str) -> None:
        """Refuse a head query: counted and logged as one (not as a refused checkpoint)."""
        self._count(reason)
        self._logs.warning(
            "witness_head_query_refused",
            "refusing the head query %s sent: %s (%s)",
            envelope.sender,
            reason,
            detail,
            source=envelope.sender,
            peer_id=envelope.sender,
            reason=reason,
        )
        await self._answer(link, envelope, None, wire.CosignStatus.REFUSED, None, reason, None)

    def _count(self, outcome: str) -> None:
        """``talos_audit_witness_head_queries_total{outcome}`` (docs/metrics.md)."""
        if self._metrics is not None:
            self._metrics.witness_head_query(outcome)
