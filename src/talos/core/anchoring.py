"""Anchoring as data: the life of one anchor and when to try again, without I/O.

An *anchor* is one transaction calling ``TalosAnchor.anchor(logId, size, root)``
for a signed checkpoint. Rules this module keeps (docs/design/anchoring.md):

1. **States.** ``pending`` (signed and persisted, maybe broadcast) →
   ``included`` (a receipt in the chain's canonical view) → ``final`` (the
   block is at or below the chain's ``finalized`` block, or has ``N``
   confirmations). Only ``final`` anchors count.
2. **Reorgs.** An included anchor whose receipt disappears goes back to
   ``pending`` (and is broadcast again); one whose receipt moved to another
   block stays ``included`` with the new block.
3. **One nonce, one content.** Every broadcast of an anchor (the first and
   each fee-raising replacement) has the same nonce and the same call; only
   the fees change, each replacement raising both. An anchor whose nonce was
   taken by a transaction that is not one of its broadcasts is ``lost``; one
   whose transaction reverted is ``reverted``. Both leave the nonce used:
   the next anchor takes a later one.
4. **Merging.** At most one anchor is in flight. When none is, the newest
   checkpoint is anchored, which covers every smaller size not yet anchored.
5. **Schedule.** A new anchor at most once per ``interval`` (and only when
   the log grew past the last final anchor); while one is in flight the
   chain is polled every ``poll`` seconds; after a failure the next try
   waits an exponential backoff with jitter (:class:`~talos.core.backoff.Backoff`),
   never longer than ``interval``.

Time (``now``, monotonic seconds) and randomness (:class:`~talos.core.rng.Rng`)
are arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import Any, Final

from talos.core.backoff import Backoff
from talos.core.rng import Rng
from talos.errors import ConfigurationError, MalformedFrame

__all__ = [
    "ANCHOR_RECORD_VERSION",
    "Anchor",
    "AnchorState",
    "Broadcast",
    "Finality",
    "Inclusion",
    "Observation",
    "Outcome",
    "Schedule",
    "follow",
    "wants_anchor",
]

#: Version of the stored anchor record (:meth:`Anchor.to_map`).
ANCHOR_RECORD_VERSION: Final = 1

#: First retry delay after a failure, in seconds (then doubling, capped at the interval).
DEFAULT_RETRY_BASE: Final = 2.0

_MAX_U64: Final = 2**64 - 1


class AnchorState(StrEnum):
    PENDING = "pending"
    INCLUDED = "included"
    FINAL = "final"


class Outcome(Enum):
    """What one look at the chain did to an in-flight anchor."""

    WAITING = "waiting"  # still pending: broadcast it (again)
    INCLUDED = "included"  # in a block, not final yet
    FINAL = "final"  # final: record it, the next anchor may start
    REORGED = "reorged"  # its block left the canonical chain: pending again
    REVERTED = "reverted"  # mined but reverted: failed, nonce used
    LOST = "lost"  # its nonce was used by another transaction: failed


@dataclass(frozen=True)
class Broadcast:
    """One signed version of an anchor's transaction."""

    tx_hash: bytes
    raw: bytes
    max_fee: int
    priority_fee: int


@dataclass(frozen=True)
class Inclusion:
    """Where a broadcast of the anchor was mined, in the chain's current view."""

    tx_hash: bytes
    block_number: int
    block_hash: bytes


@dataclass(frozen=True)
class Anchor:
    """One anchor of checkpoint (``tree_size``, ``root``), at ``nonce``."""

    tree_size: int
    root: bytes
    nonce: int
    broadcasts: tuple[Broadcast, ...]
    state: AnchorState = AnchorState.PENDING
    inclusion: Inclusion | None = None
    #: Wall-clock time the anchor was first signed (for people, not for scheduling).
    created: float = 0.0

    @property
    def latest(self) -> Broadcast:
        return self.broadcasts[-1]

    def with_broadcast(self, broadcast: Broadcast) -> Anchor:
        """A fee-raising replacement added (same nonce and call, both fees higher).

        Raises:
            ValueError: the replacement does not raise both fees.
        """
        if not (
            broadcast.max_fee > self.latest.max_fee
            and broadcast.priority_fee > self.latest.priority_fee
        ):
            raise ValueError("a replacement must raise both fees")
        return replace(self, broadcasts=(*self.broadcasts, broadcast))

    def to_map(self) -> dict[str, Any]:
        """The stored form (a CBOR map, version :data:`ANCHOR_RECORD_VERSION`)."""
        found = self.inclusion
        return {
            "v": ANCHOR_RECORD_VERSION,
            "size": self.tree_size,
            "root": self.root,
            "nonce": self.nonce,
            "state": self.state.value,
            "created": self.created,
            "txs": [[b.tx_hash, b.raw, b.max_fee, b.priority_fee] for b in self.broadcasts],
            "incl": None
            if found is None
            else [found.tx_hash, found.block_number, found.block_hash],
        }

    @classmethod
    def from_map(cls, value: Any) -> Anchor:
        """Decode :meth:`to_map`'s form.

        Raises:
            MalformedFrame: not a version-1 anchor record.
        """
        try:
            if not isinstance(value, dict) or value.get("v") != ANCHOR_RECORD_VERSION:
                raise MalformedFrame("not a version-1 anchor record")
            broadcasts = tuple(
                Broadcast(_hash(h), _bytes(raw), _uint(fee), _uint(tip))
                for h, raw, fee, tip in value["txs"]
            )
            incl = value["incl"]
            inclusion = (
                None if incl is None else Inclusion(_hash(incl[0]), _uint(incl[1]), _hash(incl[2]))
            )
            anchor = cls(
                _uint(value["size"]),
                _hash(value["root"]),
                _uint(value["nonce"]),
                broadcasts,
                AnchorState(value["state"]),
                inclusion,
                float(value["created"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedFrame(f"anchor record: {exc}") from None
        if not broadcasts or (anchor.state is AnchorState.PENDING) != (inclusion is None):
            raise MalformedFrame("anchor record: inconsistent state")
        return anchor


def _uint(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= 2**256:
        raise ValueError("not an unsigned integer")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("not a byte string")
    return value


def _hash(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError("not a 32-byte hash")
    return value


@dataclass(frozen=True)
class Finality:
    """When an included anchor is final: ``confirmations`` blocks, or the chain's ``finalized``."""

    confirmations: int | None = None

    def __post_init__(self) -> None:
        if self.confirmations is not None and not 1 <= self.confirmations <= 10_000:
            raise ConfigurationError("anchor confirmations must be between 1 and 10000")

    def reached(self, block: int, head: int, finalized: int | None) -> bool:
        if self.confirmations is not None:
            return head - block + 1 >= self.confirmations
        return finalized is not None and finalized >= block


@dataclass(frozen=True)
class Observation:
    """What the chain says now about an in-flight anchor's broadcasts."""

    #: A successful receipt of one of its broadcasts, in the canonical chain.
    inclusion: Inclusion | None
    #: One of its broadcasts was mined and reverted.
    reverted: bool
    #: The latest block number, and the ``finalized`` one (None if the chain has none).
    head: int
    finalized: int | None
    #: The wallet's mined nonce is past the anchor's (some transaction took the nonce).
    nonce_used: bool


def follow(anchor: Anchor, seen: Observation, finality: Finality) -> tuple[Anchor, Outcome]:
    """The anchor after ``seen``, and what happened (rules 1-3)."""
    if seen.inclusion is None:
        if seen.reverted:
            return anchor, Outcome.REVERTED
        if seen.nonce_used:
            return anchor, Outcome.LOST
        if anchor.state is not AnchorState.PENDING:
            return replace(anchor, state=AnchorState.PENDING, inclusion=None), Outcome.REORGED
        return anchor, Outcome.WAITING
    if finality.reached(seen.inclusion.block_number, seen.head, seen.finalized):
        return replace(anchor, state=AnchorState.FINAL, inclusion=seen.inclusion), Outcome.FINAL
    moved = anchor.inclusion is not None and anchor.inclusion != seen.inclusion
    included = replace(anchor, state=AnchorState.INCLUDED, inclusion=seen.inclusion)
    return included, Outcome.REORGED if moved else Outcome.INCLUDED


def wants_anchor(checkpoint_size: int, final_size: int, in_flight: Anchor | None) -> bool:
    """Whether a new anchor should start: none in flight and the log grew (rule 4)."""
    return in_flight is None and checkpoint_size > final_size


@dataclass(frozen=True)
class Schedule:
    """When the driver looks at the chain next (rule 5). ``now`` is monotonic seconds."""

    interval: float
    poll: float
    retry_base: float = DEFAULT_RETRY_BASE
    #: Consecutive failed steps.
    failures: int = 0
    #: When the next step is due.
    next_at: float = 0.0
    #: When the last anchor was started (None: never in this process).
    last_start: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.poll <= self.interval:
            raise ConfigurationError("anchoring needs 0 < poll <= interval")
        if not 0 < self.retry_base:
            raise ConfigurationError("anchoring retry base must be positive")

    def may_start(self, now: float) -> bool:
        """Whether a new anchor may start now (at most one per interval)."""
        return self.last_start is None or now >= self.last_start + self.interval

    def started(self, now: float) -> Schedule:
        return replace(self, last_start=now)

    def succeeded(self, now: float, *, in_flight: bool) -> Schedule:
        """A step that worked: poll while an anchor is in flight, else wait for the next start."""
        if in_flight:
            wait = self.poll
        elif self.last_start is None:
            wait = self.poll
        else:
            wait = max(self.poll, self.last_start + self.interval - now)
        return replace(self, failures=0, next_at=now + wait)

    def failed(self, now: float, rng: Rng) -> Schedule:
        """A step that failed: back off (exponential, jittered, never past the interval)."""
        backoff = Backoff(base=min(self.retry_base, self.interval), cap=self.interval)
        delay = backoff.delay(self.failures, rng)
        return replace(self, failures=self.failures + 1, next_at=now + delay)
