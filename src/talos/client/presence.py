"""Answering presence challenges: this instance proves it holds the key (docs/design/diagnose.md).

``talos diagnose --check-duplicates`` connects to each instance the registry
lists for an identity and sends a PRESENCE ``CHALLENGE``
(:mod:`talos.core.presence`) signed by that identity's key. An agent answers
only challenges signed by its own identity's current key, fresh, within a
rate limit, with a ``PROOF`` naming its instance id and signed by the same
key; everything else is dropped (``presence_refused``, rate-limited lines).
Two more refusals bind a proof to the listing challenged:

* a challenge naming an endpoint this instance neither listens on nor
  announces (:meth:`PresenceAnswers.listening_at`) was relayed to it from
  another listing: no proof, or the relay would make this instance answer
  for that listing and hide it (``presence_relayed``; a challenge of an
  older version, naming no endpoint, is still answered);
* a challenge already answered (its nonce among the last
  :data:`ANSWERED_KEPT`) is a replay: no second proof (``presence_replayed``).

The diagnose process holds no lock: it is a client like any peer.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

from talos.client.own_keys import OwnIdentity
from talos.core import presence, wire
from talos.core.clock import Clock, time_ms
from talos.core.ratelimit import RateLimiter
from talos.core.rng import Rng
from talos.errors import PeerUnreachable, RemoteProtocolError, SignatureInvalid
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.transport import Link

__all__ = ["ANSWERED_KEPT", "CHALLENGES_PER_SECOND", "PresenceAnswers"]

_log = logging.getLogger("talos.client")

#: Challenges answered per second per remote host (after a burst of :attr:`PresenceAnswers.BURST`).
CHALLENGES_PER_SECOND: Final = 1.0
#: Nonces of answered challenges remembered (a replay within the freshness
#: window needs one among these: at one a second, 1,024 s > 2 x 60 s).
ANSWERED_KEPT: Final = 1024


class PresenceAnswers:
    """Answers PRESENCE challenges sent as this agent's own identity."""

    #: Challenges answered at once from one remote host before the rate applies.
    BURST: Final = 5

    def __init__(
        self, *, own: OwnIdentity, instance: bytes, metrics: AgentMetrics, clock: Clock, rng: Rng
    ) -> None:
        self._own, self._instance, self._clock, self._rng = own, instance, clock, rng
        self._metrics = metrics
        self._limiter = RateLimiter(rate=CHALLENGES_PER_SECOND, burst=self.BURST)
        self._logs = LimitedLog(_log, clock)
        self._endpoints: frozenset[str] = frozenset()
        self._answered: OrderedDict[bytes, None] = OrderedDict()

    def listening_at(self, endpoints: Iterable[str]) -> None:
        """The endpoints this instance listens on and announces: the only ones a
        challenge may name (until this is called, none: a challenge naming one is refused)."""
        self._endpoints = frozenset(endpoints)

    async def on_presence(self, link: Link, unverified: wire.UnverifiedEnvelope) -> None:
        """Answer a challenge with a signed proof, or drop the frame."""
        if unverified.sender != self._own.agent_id:
            self._refused(link, "not sent as this identity")
            return
        if not self._limiter.allow(link.remote_host or "?", self._clock.monotonic()):
            self._refused(link, "rate limit")
            return
        try:
            envelope = wire.verify(unverified, self._own.current.state.signing_key)
            if envelope.presence_kind is not presence.PresenceKind.CHALLENGE:
                return
            body = presence.decode_body(envelope.presence_kind, envelope.presence_body or b"")
        except (SignatureInvalid, RemoteProtocolError) as exc:
            self._refused(link, f"{type(exc).__name__}: {exc}")
            return
        now = time_ms(self._clock)
        if abs(envelope.timestamp_ms - now) > presence.MAX_PROOF_SKEW_MS:
            self._refused(link, "stale challenge")
            return
        assert isinstance(body, presence.Challenge)  # noqa: S101 -- decoded as a CHALLENGE
        if body.endpoint is not None and body.endpoint not in self._endpoints:
            self._relayed(link, body.endpoint)
            return
        if body.nonce in self._answered:
            self._replayed(link)
            return
        self._answered[body.nonce] = None
        while len(self._answered) > ANSWERED_KEPT:
            self._answered.popitem(last=False)
        await self._prove(link, body.nonce, now)
        self._metrics.presence_challenged("proved")
        _log.info(
            "proved this instance holds the key to a presence challenge from %s",
            link.remote,
            extra={"event": "presence_proved", "remote": link.remote},
        )

    async def _prove(self, link: Link, nonce: bytes, now: int) -> None:
        proof = presence.Proof(nonce, self._instance, now)
        envelope = wire.Envelope(
            type=wire.EnvelopeType.PRESENCE,
            message_id=wire.new_message_id(self._rng),
            sender=self._own.agent_id,
            sender_instance=self._instance,
            recipient=self._own.agent_id,
            timestamp_ms=now,
            presence_kind=presence.PresenceKind.PROOF,
            presence_body=presence.encode_body(proof),
        )
        with contextlib.suppress(PeerUnreachable):
            await link.send(wire.seal(envelope, self._own.current.signing_key))

    def _relayed(self, link: Link, endpoint: str) -> None:
        self._metrics.presence_challenged("relayed")
        self._logs.warning(
            "presence_relayed",
            "not answering a presence challenge from %s: it was sent to %s, an endpoint "
            "this instance neither listens on nor announces (relayed from another listing)",
            link.remote,
            endpoint,
            source=link.remote_host,
            remote=link.remote,
            endpoint=endpoint,
        )

    def _replayed(self, link: Link) -> None:
        self._metrics.presence_challenged("replayed")
        self._logs.warning(
            "presence_replayed",
            "not answering a presence challenge from %s: already answered (a replay)",
            link.remote,
            source=link.remote_host,
            remote=link.remote,
        )

    def _refused(self, link: Link, why: str) -> None:
        self._metrics.presence_challenged("refused")
        self._logs.warning(
            "presence_refused",
            "not answering a presence challenge from %s: %s",
            link.remote,
            why,
            remote=link.remote,
        )
