"""Shares of one-time prekeys: how fast one client address may drain an agent's pool.

Anyone may fetch a bundle, and each fetch consumes a one-time prekey, so
one client in a loop could empty every pool. Each client address therefore
gets a share (``docs/design/registry.md``, "One-time prekeys under drain"):

1. at most ``per_agent`` one-time prekeys of each agent per minute (and in a
   burst), as a token bucket keyed by (address, agent), at most 65,536
   buckets kept, least recently used forgotten;
2. at most ten times that across all agents, so that one client cannot cycle
   through agents to push its own buckets out of the table and start them
   full again; for the same reason a request for an unknown agent leaves no
   bucket behind (:meth:`PrekeyLimiter.forget`);
3. an IPv6 client counts by its /64 (one host commonly holds the whole
   prefix), an IPv4-mapped address by its IPv4.

Past its share an address still gets a bundle, without a one-time prekey:
nobody is refused service. Everything here is pure; time is a parameter.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from talos.core.clock import Clock
from talos.core.ratelimit import RateLimiter

__all__ = [
    "ACROSS_AGENTS",
    "ONE_TIME_PREKEYS_PER_MINUTE",
    "REFILL_SECONDS",
    "MemoryShares",
    "PrekeyLimiter",
    "client_key",
]

#: One-time prekeys of one agent that one client address may take per minute
#: (and in a burst); the server hands out bundles without one past that. An
#: agent opening sessions to many peers takes one prekey per peer.
ONE_TIME_PREKEYS_PER_MINUTE: Final = 20
#: A client's share across all agents, in shares of one agent (rule 2).
ACROSS_AGENTS: Final = 10
#: Seconds an empty bucket takes to be full again (both buckets refill in a minute).
REFILL_SECONDS: Final = 60.0


class PrekeyLimiter:
    """How many one-time prekeys a client may take: ``per_agent`` per minute of each
    agent's pool, and ten times that per minute across all agents (rules 1 and 2).
    """

    def __init__(self, per_agent: int) -> None:
        across = ACROSS_AGENTS * per_agent
        self._pairs = RateLimiter(rate=per_agent / REFILL_SECONDS, burst=per_agent, max_keys=65_536)
        self._clients = RateLimiter(rate=across / REFILL_SECONDS, burst=across, max_keys=16_384)

    def allow(self, client: str, agent: str, now: float) -> bool:
        """Take one of ``agent``'s one-time prekeys for ``client`` at ``now`` (seconds)."""
        return self._clients.allow(client, now) and self._pairs.allow((client, agent), now)

    def forget(self, client: str, agent: str) -> None:
        """Drop the (client, agent) bucket: ``agent`` turned out to be unknown."""
        self._pairs.forget((client, agent))


class MemoryShares:
    """Shares kept in this process (a :class:`~talos.registry.backend.DrainShares`):
    right for one registry process, as over SQLite; timed by the monotonic clock."""

    def __init__(self, per_agent: int) -> None:
        self._limiter = PrekeyLimiter(per_agent)

    def allow(self, client: str, agent: str, clock: Clock) -> bool:
        """Take one of ``agent``'s one-time prekeys for ``client`` now, if its shares allow."""
        return self._limiter.allow(client, agent, clock.monotonic())

    def forget(self, client: str, agent: str) -> None:
        """Drop the (client, agent) bucket: ``agent`` turned out to be unknown."""
        self._limiter.forget(client, agent)


def client_key(host: str) -> str:
    """The key ``host`` (a client's address) is counted by (rule 3); not an address: as is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return (
        str(address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else host
    )
