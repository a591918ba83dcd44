"""Token buckets keyed by who caused the work: bounds what unauthenticated input can cost.

A peer (or anyone who can reach our port) can make us do work before any
signature has been checked — look up an unknown agent id, write a
SIGNATURE_FAILURE or REPLAY_DROPPED audit entry. Each of these goes through
a :class:`RateLimiter`: ``rate`` events per second with bursts of
``burst``, per key, in bounded memory (the least recently used keys are
forgotten first). Time is passed in; nothing here reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from talos.errors import ConfigurationError

__all__ = ["RateLimiter"]


class RateLimiter:
    """Per-key token buckets; :meth:`allow` says whether one more event may happen."""

    def __init__(self, *, rate: float, burst: int, max_keys: int = 4096) -> None:
        if not (rate > 0 and burst >= 1 and max_keys >= 1):
            raise ConfigurationError("rate limiter needs rate > 0, burst >= 1, max_keys >= 1")
        self._rate, self._burst, self._max_keys = rate, float(burst), max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        #: Events refused so far (for logs and metrics).
        self.refused = 0

    def _tokens(self, key: Hashable, now: float) -> tuple[float, float]:
        tokens, last = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + max(0.0, now - last) * self._rate), last

    def available(self, key: Hashable, now: float) -> bool:
        """Whether :meth:`allow` would grant ``key`` a token at ``now``, taking none.

        For limits that combine several buckets: check them all first, then take
        from each, so that a refusal by one does not spend another's token.
        """
        return self._tokens(key, now)[0] >= 1.0

    def allow(self, key: Hashable, now: float) -> bool:
        """Take one token for ``key`` at ``now`` (seconds); False when none is left."""
        tokens, last = self._tokens(key, now)
        self._buckets.pop(key, None)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self.refused += 1
        self._buckets[key] = (tokens, max(now, last))
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s bucket (it was charged for something that turned out not to
        count), so that keys nobody needs cannot push real ones out."""
        self._buckets.pop(key, None)
