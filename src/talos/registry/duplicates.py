"""Split-brain detection: when two instances of one agent are running at the same time.

An agent draws a new instance id each time it starts, announces a signed peer
record at start and again every quarter of the record lifetime (15 minutes;
``RECORD_LIFETIME / 4`` in :mod:`talos.client`), and each record lives an hour.
After a restart the registry therefore holds two live instances for up to an
hour: the old one, which never announces again, and the new one. Two live
instances prove nothing by themselves.

Rules (``docs/design/registry.md``, "Split brain"):

1. Instances A and B of one agent *overlap* when A announced after B was
   first seen **and** B announced after A was first seen: both kept
   announcing at the same time. A restart never re-announces the old
   instance, so it never overlaps its successor.
2. "After" is the registry's order of acceptance, not a timestamp. The
   registry accepts a record only with a sequence above every record it
   accepted before for that agent, so "A's newest record came after B was
   first seen" is ``A.sequence > B.first_sequence``. Comparing the agent's
   ``issued_ms`` with the registry's ``first_seen_ms`` would mix two clocks,
   and an agent clock running ahead would turn a quick restart into an alarm.
3. An agent is a *duplicate* when any two of its live instances overlap.

Everything here is pure and linear (or n log n) in the number of instances:
an agent controls how many instance ids it announces, and must not be able
to make the registry do quadratic work. The store applies the same rule in
SQL (and a test checks that the two agree).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby

__all__ = ["Activity", "duplicated", "newly_overlapping", "overlap"]


@dataclass(frozen=True, slots=True)
class Activity:
    """What the registry knows of one instance's announcements.

    ``first_sequence`` is the sequence of the first record accepted from the
    instance, ``sequence`` that of its newest one (never smaller).

    Raises:
        ValueError: ``sequence`` is below ``first_sequence``.
    """

    instance_id: bytes
    first_sequence: int
    sequence: int

    def __post_init__(self) -> None:
        if self.sequence < self.first_sequence:
            raise ValueError("an instance's newest sequence cannot precede its first")


def overlap(a: Activity, b: Activity) -> bool:
    """Whether two different instances kept announcing concurrently (rule 1)."""
    return (
        a.instance_id != b.instance_id
        and a.sequence > b.first_sequence
        and b.sequence > a.first_sequence
    )


def duplicated(instances: Iterable[Activity]) -> bool:
    """Whether any two of ``instances`` (distinct instance ids) overlap (rule 3).

    An instance first seen later always announced after an earlier one was
    first seen (its own first record did), so a pair overlaps exactly when
    the earlier one announced after the later one was first seen: sorting by
    first sequence, look for an earlier newest sequence above a first one.
    """
    latest: int | None = None  # the newest sequence of instances first seen strictly earlier
    ordered = sorted(instances, key=lambda a: a.first_sequence)
    for first, group in groupby(ordered, key=lambda a: a.first_sequence):
        tied = list(group)
        if latest is not None and latest > first:
            return True
        if sum(1 for a in tied if a.sequence > first) > 1:  # first seen together, both went on
            return True
        newest = max(a.sequence for a in tied)
        latest = newest if latest is None else max(latest, newest)
    return False


def newly_overlapping(
    before: Activity | None, after: Activity, others: Iterable[Activity]
) -> tuple[bytes, ...]:
    """Instances newly found overlapping when one instance's activity went from ``before``
    (``None``: first seen now) to ``after``; ``others`` are the agent's other live instances.

    Only pairs that involve the updated instance can change. The result holds
    the updated instance and its new partners, sorted, or is empty: an
    identity already known to be duplicated by the same instances is
    reported once.
    """
    partners = [
        other.instance_id
        for other in others
        if overlap(after, other) and (before is None or not overlap(before, other))
    ]
    if not partners:
        return ()
    return tuple(sorted({after.instance_id, *partners}))
