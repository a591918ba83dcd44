"""Clock offset estimation from four timestamps, and duplicate-instance detection.

Both are passive observers of traffic the agent exchanges anyway:

- **Clock offset.** A signed ACK carries the receiver's clock (``t2 = t3``,
  the moment it answered) and the sender knows when it sent the message
  (``t1``) and when the ACK arrived (``t4``). As in NTP, the offset of the
  peer's clock from ours is ``((t2 - t1) + (t3 - t4)) / 2`` and the round
  trip is ``(t4 - t1) - (t3 - t2)``; the error of the offset is at most half
  the round trip, so of the recent samples the one with the smallest round
  trip is kept. A positive offset means the *peer* is ahead of us.
- **Duplicate instances.** Every envelope names the sender's instance id
  (random per process). A restart produces a new id and the old one is
  never heard again; an identity running on two hosts at once alternates:
  ``A, B, A``. :class:`InstanceTracker` reports the second case only.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final

__all__ = [
    "WARN_OFFSET",
    "ClockSample",
    "InstanceTracker",
    "PeerClocks",
    "offset_from",
]

#: Offsets (seconds) beyond this are worth a warning; rejection starts at the
#: clock-skew tolerance of envelopes and capabilities (60 s).
WARN_OFFSET: Final = 5.0

#: Samples kept per peer; the best (smallest round trip) of them is reported.
SAMPLES_PER_PEER: Final = 8


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One offset estimate: the peer's clock minus ours, seconds, and its round trip."""

    offset: float
    delay: float
    at: float  # our clock (seconds) when the answer arrived


def offset_from(t1: float, t2: float, t3: float, t4: float) -> ClockSample:
    """The NTP estimate from our send ``t1``, the peer's receive ``t2`` and answer ``t3``,
    and our receipt ``t4`` (all seconds). A negative round trip (our clock stepped)
    is reported as 0."""
    offset = ((t2 - t1) + (t3 - t4)) / 2
    delay = max(0.0, (t4 - t1) - (t3 - t2))
    return ClockSample(offset, delay, t4)


class PeerClocks:
    """The recent clock samples of up to ``max_peers`` peers (least recently heard evicted)."""

    def __init__(self, *, max_peers: int = 1024) -> None:
        self._max_peers = max_peers
        self._samples: OrderedDict[str, deque[ClockSample]] = OrderedDict()

    def add(self, peer: str, sample: ClockSample) -> ClockSample:
        """Record ``sample``; return the peer's best current estimate."""
        samples = self._samples.get(peer)
        if samples is None:
            samples = self._samples[peer] = deque(maxlen=SAMPLES_PER_PEER)
            while len(self._samples) > self._max_peers:
                self._samples.popitem(last=False)
        else:
            self._samples.move_to_end(peer)
        samples.append(sample)
        return self.best(peer) or sample

    def best(self, peer: str) -> ClockSample | None:
        """The sample with the smallest round trip, or None if the peer was never measured."""
        samples = self._samples.get(peer)
        if not samples:
            return None
        return min(samples, key=lambda s: s.delay)

    def estimates(self) -> dict[str, ClockSample]:
        """Every measured peer's best sample."""
        return {peer: min(s, key=lambda x: x.delay) for peer, s in self._samples.items() if s}


class InstanceTracker:
    """Spots one identity speaking from two processes at once.

    For each sender the instance ids are remembered in the order they were
    last heard from. Hearing an id again after a *different* id was heard
    since is the signature of two live instances (a restarted agent never
    reuses its old id). Bounded: ``max_peers`` senders, ``max_instances`` ids each.
    """

    def __init__(self, *, max_peers: int = 1024, max_instances: int = 4) -> None:
        self._max_peers = max_peers
        self._max_instances = max_instances
        self._seen: OrderedDict[str, list[bytes]] = OrderedDict()
        self.duplicates: dict[str, int] = {}

    def observe(self, sender: str, instance: bytes) -> bool:
        """Note a frame from ``sender``'s ``instance``; True if it reveals a duplicate."""
        order = self._seen.get(sender)
        if order is None:
            self._seen[sender] = [instance]
            while len(self._seen) > self._max_peers:
                self._seen.popitem(last=False)
            return False
        self._seen.move_to_end(sender)
        if order[-1] == instance:
            return False
        duplicate = instance in order
        if duplicate:
            order.remove(instance)
            self.duplicates[sender] = self.duplicates.get(sender, 0) + 1
        order.append(instance)
        del order[: -self._max_instances]
        return duplicate
