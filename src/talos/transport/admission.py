"""Which incoming links an agent keeps open: the transport's admission policy, sans I/O.

This module owns the rules; :class:`~talos.transport.links.Transport` owns the
sockets and timers and acts on what :class:`AdmissionPolicy` decides. The
policy sees each open incoming link as a :class:`LinkFacts` snapshot and the
time as a plain ``now`` (seconds on a monotonic clock), so every rule is a
pure function that tests drive with plain numbers.

Rules:

1. At most ``max_incoming`` incoming links are open at once, and at most
   ``max_per_host`` of them from one remote address. Links this agent opened
   itself are not the policy's concern (callers pass incoming links only).
2. A link earns its place with an accepted message (it is *verified*). An
   unverified link is due to be closed once ``verify_within`` seconds have
   passed since it opened (``opened_at + verify_within <= now``).
3. Of one sender's verified links only the newest ``max_verified_per_peer``
   (by the time of their first accepted message; equal times by opening
   order) hold their place; older ones are displaceable like unverified ones.
4. A newcomer that fits is admitted. One that does not fit displaces the
   oldest displaceable link at least ``evictable_after`` seconds old
   (``opened_at <= now - evictable_after``), taken from its own address's
   links when that address holds its share, else from every incoming link.
   With no such link the newcomer is refused.
5. A link that sends frames that cannot be decoded spends a budget of
   ``MALFORMED_BURST`` such frames, refilled at ``MALFORMED_REFILL`` per
   second; the frame past it closes the link, and its remote address is
   throttled (:class:`HostThrottle`): newcomers from it are refused for
   ``THROTTLE_SECONDS``.

This module imports nothing but the standard library and :mod:`talos.errors`:
no asyncio, sockets, clocks or logging.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final

from talos.errors import ConfigurationError

__all__ = [
    "EVICTABLE_AFTER",
    "MALFORMED_BURST",
    "MALFORMED_REFILL",
    "MAX_INCOMING",
    "MAX_INCOMING_PER_HOST",
    "MAX_THROTTLED_HOSTS",
    "MAX_VERIFIED_PER_PEER",
    "THROTTLE_SECONDS",
    "VERIFY_WITHIN",
    "Admit",
    "AdmissionPolicy",
    "Crowded",
    "Decision",
    "Displace",
    "HostThrottle",
    "LinkFacts",
    "Refuse",
]

#: Incoming links one agent keeps open at once; more are refused at the handshake.
MAX_INCOMING: Final = 256
#: Of those, the most from one remote address: one flooding host cannot take
#: every place (agents behind one NAT share an address, hence a generous share).
MAX_INCOMING_PER_HOST: Final = 64
#: Seconds an incoming link may stay open without an accepted message. A peer
#: connects to send one; an idle link it opened is simply opened again later.
VERIFY_WITHIN: Final = 10.0
#: An incoming link younger than this is not displaced by a newcomer, so that a
#: real peer has time for its first message (a key-log lookup may precede it).
EVICTABLE_AFTER: Final = 2.0
#: Verified incoming links kept per sending agent; its older ones are
#: displaceable like unverified ones (one identity cannot hold every place).
MAX_VERIFIED_PER_PEER: Final = 4
#: Undecodable frames a link may send before it is closed (rule 5). An honest
#: peer sends none: its frames are built by the same codec that reads them
#: (only a version this build does not know is refused, and it would be
#: refused every time); a few are tolerated so that one corrupted frame does
#: not cut a peer off.
MALFORMED_BURST: Final = 8
#: Undecodable frames per second a link earns back (one a minute): a steady
#: trickle is tolerated, a stream is not.
MALFORMED_REFILL: Final = 1 / 60
#: Seconds newcomers from an address whose link was closed for malformed frames
#: are refused. A flooder then gets 8 frames in per handshake and 10 s, nothing
#: worth its while; a real peer behind the same address (NAT) that needs a
#: new link meanwhile sees one delivery retry, at most 10 s later.
THROTTLE_SECONDS: Final = 10.0
#: Addresses a :class:`HostThrottle` remembers at most (the oldest go first).
MAX_THROTTLED_HOSTS: Final = 4096


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What the policy knows of one open incoming link.

    ``serial`` tells links apart and orders them by opening (a later link has a
    larger serial); times are seconds on the caller's monotonic clock.
    """

    serial: int
    host: str
    opened_at: float
    #: The agent whose accepted message arrived on the link, if one did.
    verified_by: str | None = None
    #: When the first such message arrived.
    verified_at: float | None = None


class Crowded(enum.StrEnum):
    """Which limit a newcomer ran into."""

    #: ``max_per_host`` links are open from the newcomer's address.
    HOST = "host"
    #: ``max_incoming`` links are open in all.
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Admit:
    """A free place: take the newcomer."""


@dataclass(frozen=True, slots=True)
class Displace:
    """No free place: close ``victim`` to make one for the newcomer."""

    victim: LinkFacts
    crowded: Crowded


@dataclass(frozen=True, slots=True)
class Refuse:
    """No free place and none that may be taken: refuse the newcomer."""

    crowded: Crowded
    #: Incoming links open in all, and from the newcomer's address.
    incoming: int
    from_host: int


Decision = Admit | Displace | Refuse


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """The limits of :mod:`talos.transport.admission`'s rules, and the rules themselves.

    Raises:
        ConfigurationError: a limit is not positive (``evictable_after`` may be 0).
    """

    max_incoming: int = MAX_INCOMING
    max_per_host: int = MAX_INCOMING_PER_HOST
    verify_within: float = VERIFY_WITHIN
    evictable_after: float = EVICTABLE_AFTER
    max_verified_per_peer: int = MAX_VERIFIED_PER_PEER

    def __post_init__(self) -> None:
        if min(self.max_incoming, self.max_per_host, self.max_verified_per_peer) < 1 or not (
            self.verify_within > 0 and self.evictable_after >= 0
        ):
            raise ConfigurationError("transport limits must be positive")

    def decide(self, host: str, links: Collection[LinkFacts], now: float) -> Decision:
        """Whether a newcomer from ``host`` gets a place among the open incoming ``links``
        at ``now`` (rules 1, 3 and 4). ``links`` excludes the newcomer itself."""
        from_host = [link for link in links if link.host == host]
        if len(links) < self.max_incoming and len(from_host) < self.max_per_host:
            return Admit()
        if len(from_host) >= self.max_per_host:
            crowded, pool = Crowded.HOST, from_host
        else:
            crowded, pool = Crowded.ALL, list(links)
        held = self._held_by_verified(links)
        ripe = now - self.evictable_after
        candidates = [link for link in pool if link.opened_at <= ripe and link.serial not in held]
        if not candidates:
            return Refuse(crowded, incoming=len(links), from_host=len(from_host))
        victim = min(candidates, key=lambda link: (link.opened_at, link.serial))
        return Displace(victim, crowded)

    def _held_by_verified(self, links: Iterable[LinkFacts]) -> set[int]:
        """The serials of the links that hold their place by rule 3."""
        by_sender: dict[str, list[tuple[float, int]]] = {}
        for link in links:
            if link.verified_by is not None and link.verified_at is not None:
                by_sender.setdefault(link.verified_by, []).append((link.verified_at, link.serial))
        held: set[int] = set()
        for verified in by_sender.values():
            held.update(serial for _, serial in sorted(verified)[-self.max_verified_per_peer :])
        return held

    def overdue(self, links: Iterable[LinkFacts], now: float) -> list[LinkFacts]:
        """The unverified ``links`` due to be closed at ``now`` (rule 2)."""
        return [
            link
            for link in links
            if link.verified_by is None and link.opened_at + self.verify_within <= now
        ]

    def next_deadline(self, links: Iterable[LinkFacts]) -> float | None:
        """When the first of the unverified ``links`` falls due (``None``: none can)."""
        return min(
            (link.opened_at + self.verify_within for link in links if link.verified_by is None),
            default=None,
        )


class HostThrottle:
    """Remote addresses refused until a time (rule 5), in bounded memory.

    At most ``max_hosts`` are held; past that the one throttled first is
    forgotten (it is let back in early, which only costs the flooder less).
    """

    def __init__(
        self, seconds: float = THROTTLE_SECONDS, max_hosts: int = MAX_THROTTLED_HOSTS
    ) -> None:
        if not (seconds > 0 and max_hosts >= 1):
            raise ConfigurationError("throttle needs seconds > 0 and max_hosts >= 1")
        self.seconds, self._max_hosts = seconds, max_hosts
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, host: str, now: float) -> None:
        """Refuse newcomers from ``host`` until ``now + seconds``."""
        self._until.pop(host, None)
        self._until[host] = now + self.seconds
        while len(self._until) > self._max_hosts:
            self._until.popitem(last=False)

    def holds(self, host: str, now: float) -> bool:
        """Whether ``host`` is throttled at ``now`` (an expired entry is dropped)."""
        until = self._until.get(host)
        if until is None:
            return False
        if until <= now:
            del self._until[host]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)
