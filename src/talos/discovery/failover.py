"""Which registry replica to ask next: the failover policy, pure.

An agent may be given several registry URLs (``talos run --registry URL``
repeated, ``registry_url=[...]``). They must be replicas of one registry,
sharing one database (``talos registry serve --db postgresql://...``):
an agent announces to one of them only and reads from whichever answers.
Two independent registries (two SQLite files) are not a supported setup.

Rules (``now`` is the injected clock's wall time):

1. A request goes to the *current* URL first (the first URL at start).
2. When a URL does not answer (connection refused or reset, timeout, a
   5xx), the next one in :meth:`Failover.order` is tried at once; a 4xx
   (refusal, not found) is an answer and is never retried elsewhere.
3. The first URL that answers becomes the current one (a *failover*, or a
   *failback* when it is the first URL).
4. Away from the first URL for :data:`RETURN_AFTER` seconds, the next
   request tries the first URL first (the preferred replica, usually the
   nearest); when it still does not answer, the current URL serves the
   request and the first URL is tried again :data:`RETURN_AFTER` later.
5. When the current URL fails, the others are tried in configured order,
   so the first URL comes back as soon as it answers again.

:class:`Failover` holds the state (current URL, since when) and returns
:class:`Switch` facts; the I/O side (:mod:`talos.discovery.registry_http`)
logs and counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from talos.errors import ConfigurationError

__all__ = ["RETURN_AFTER", "Failover", "Switch", "public_url"]

#: Seconds away from the first URL before it is tried first again.
RETURN_AFTER: Final = 60.0


@dataclass(frozen=True, slots=True)
class Switch:
    """The current URL changed from index ``old`` to ``new`` (``failback``: back to the first)."""

    old: int
    new: int

    @property
    def failback(self) -> bool:
        return self.new == 0


class Failover:
    """The failover state over ``count`` URLs (indices into the configured list)."""

    def __init__(self, count: int, *, return_after: float = RETURN_AFTER) -> None:
        """Raises: ConfigurationError: no URL, or a negative ``return_after``."""
        if count < 1:
            raise ConfigurationError("at least one registry URL is needed")
        if return_after < 0:
            raise ConfigurationError("return_after must not be negative")
        self.count = count
        self.return_after = return_after
        self.current = 0
        #: When the first URL was last left or last tried (rule 4).
        self._away_since = 0.0

    def order(self, now: float) -> list[int]:
        """The URLs to try for one request, in order (rules 1, 4 and 5)."""
        first = [self.current]
        if self.current != 0 and now - self._away_since >= self.return_after:
            first = [0, self.current]
        return first + [i for i in range(self.count) if i not in first]

    def answered(self, index: int, now: float) -> Switch | None:
        """URL ``index`` answered (rule 3): the switch it makes, if any."""
        if index == self.current:
            return None
        switch = Switch(self.current, index)
        self.current = index
        self._away_since = now
        return switch

    def failed(self, index: int, now: float) -> None:
        """URL ``index`` did not answer; a failed return to the first URL waits again (rule 4)."""
        if index == 0 and self.current != 0:
            self._away_since = now


def public_url(url: str) -> str:
    """``url`` without its user information, query or fragment: what logs and labels show.

    A registry URL may carry credentials (``https://user:secret@host``) for a
    proxy in front of the registry; they never appear in a log line or a
    metric label.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/")
