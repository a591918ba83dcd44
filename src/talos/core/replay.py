"""Replay window: which message ids were already accepted (ARCHITECTURE §5).

All times are integer **milliseconds** since the Unix epoch, the unit of the
envelope timestamp, so ``now_ms`` is :func:`talos.core.clock.time_ms`.

Rules:

1. A message is *stale* when ``now_ms - timestamp_ms > window_ms``, or when
   its timestamp is below :attr:`ReplayWindow.floor_ms`, the horizon under
   which ids have been forgotten. The floor only rises, so stepping the clock
   back never resurrects a forgotten id as "new".
2. A message is *from the future* when ``timestamp_ms - now_ms > max_skew_ms``;
   it is rejected as stale too, with a message naming clock skew.
3. Otherwise it is a *duplicate* when its id was recorded before.
4. Every id with a timestamp at or above the floor is remembered. Ids below
   it are dropped (they are stale anyway), amortized O(log n) per record.
   Memory is bounded by ``max_entries``: when full, the oldest ids are
   evicted and the floor rises past them, so the window degrades to a shorter
   one and never to accepting a replay.

:meth:`ReplayWindow.check` does not change anything; :meth:`ReplayWindow.record`
checks again and commits. A receiver checks, decrypts, then records in the
same transaction as the rest of the state (clone-then-commit).
"""

from __future__ import annotations

import heapq
from typing import Any, Final

from talos.core.encoding import canonical_dumps, strict_loads
from talos.errors import (
    ConfigurationError,
    DuplicateMessage,
    LocalProtocolError,
    MalformedFrame,
    StaleMessage,
    UnsupportedVersion,
)

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_SKEW_MS",
    "DEFAULT_WINDOW_MS",
    "REPLAY_FORMAT_VERSION",
    "ReplayWindow",
]

DEFAULT_WINDOW_MS: Final = 3_600_000
DEFAULT_MAX_SKEW_MS: Final = 60_000
DEFAULT_MAX_ENTRIES: Final = 1_000_000
REPLAY_FORMAT_VERSION: Final = 1
#: Longest id accepted: a 16-byte message id, or a 32-byte digest of (sender, id).
MAX_ID_SIZE: Final = 64
_MAX_TIME_MS: Final = 2**63 - 1
#: Default bound for :meth:`ReplayWindow.from_bytes`: about 28 bytes per entry.
_DEFAULT_MAX_STATE_SIZE: Final = 64 * (1 << 20)
_STATE_KEYS: Final = frozenset({"v", "floor", "ids"})


class ReplayWindow:
    """The set of recently accepted message ids, with their timestamps."""

    __slots__ = ("_floor_ms", "_heap", "_seen", "max_entries", "max_skew_ms", "window_ms")

    def __init__(
        self,
        *,
        window_ms: int = DEFAULT_WINDOW_MS,
        max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        """Make an empty window.

        Raises:
            ConfigurationError: a bound is not a positive integer (``max_skew_ms``
                may be zero).
        """
        _check_config(window_ms, max_skew_ms, max_entries)
        self.window_ms = window_ms
        self.max_skew_ms = max_skew_ms
        self.max_entries = max_entries
        self._floor_ms = 0
        self._seen: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

    @property
    def floor_ms(self) -> int:
        """Timestamps below this are stale whatever the clock says."""
        return self._floor_ms

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._seen

    def check(self, message_id: bytes, timestamp_ms: int, now_ms: int) -> None:
        """Decide whether a message may be accepted, without recording it.

        Raises:
            StaleMessage: older than the window or the floor, or further in
                the future than the clock-skew tolerance.
            DuplicateMessage: the id was already recorded.
            LocalProtocolError: the arguments have the wrong type or range.
        """
        _check_args(message_id, timestamp_ms, now_ms)
        if timestamp_ms - now_ms > self.max_skew_ms:
            raise StaleMessage(
                f"timestamp is {timestamp_ms - now_ms} ms ahead of the local clock, beyond "
                f"the {self.max_skew_ms} ms clock-skew tolerance: check for clock skew"
            )
        if now_ms - timestamp_ms > self.window_ms:
            raise StaleMessage(
                f"message is {now_ms - timestamp_ms} ms old, outside the "
                f"{self.window_ms} ms replay window"
            )
        if timestamp_ms < self._floor_ms:
            raise StaleMessage("message is older than the ids this replay window still holds")
        if message_id in self._seen:
            raise DuplicateMessage("message id was already received")

    def record(self, message_id: bytes, timestamp_ms: int, now_ms: int) -> None:
        """Check the message (as :meth:`check`), then remember its id.

        Also forgets ids that have left the window.

        Raises:
            StaleMessage: as :meth:`check`.
            DuplicateMessage: as :meth:`check`.
            LocalProtocolError: as :meth:`check`.
        """
        self.check(message_id, timestamp_ms, now_ms)
        self._seen[message_id] = timestamp_ms
        heapq.heappush(self._heap, (timestamp_ms, message_id))
        self.prune(now_ms)

    def prune(self, now_ms: int) -> None:
        """Forget the ids that are outside the window at ``now_ms``."""
        self._raise_floor(now_ms - self.window_ms)
        while len(self._seen) > self.max_entries:
            self._raise_floor(self._heap[0][0] + 1)

    def _raise_floor(self, floor_ms: int) -> None:
        if floor_ms <= self._floor_ms:
            return
        self._floor_ms = floor_ms
        heap = self._heap
        while heap and heap[0][0] < floor_ms:
            del self._seen[heapq.heappop(heap)[1]]

    def copy(self) -> ReplayWindow:
        """An independent copy, for changing state tentatively (clone-then-commit)."""
        clone = ReplayWindow(
            window_ms=self.window_ms, max_skew_ms=self.max_skew_ms, max_entries=self.max_entries
        )
        clone._floor_ms = self._floor_ms
        clone._seen = dict(self._seen)
        clone._heap = list(self._heap)
        return clone

    # -- persistence -----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The state (floor and ids, not the configuration) as canonical CBOR.

        Entries are sorted by (timestamp, id), so equal states give equal bytes.
        """
        entries = sorted((ts, mid) for mid, ts in self._seen.items())
        state = {
            "v": REPLAY_FORMAT_VERSION,
            "floor": self._floor_ms,
            "ids": [[mid, ts] for ts, mid in entries],
        }
        return canonical_dumps(state)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        window_ms: int = DEFAULT_WINDOW_MS,
        max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_size: int = _DEFAULT_MAX_STATE_SIZE,
    ) -> ReplayWindow:
        """Load state written by :meth:`to_bytes` under the given configuration.

        The configuration is not persisted, so an operator can change it; if
        ``max_entries`` shrank, the oldest ids are evicted (raising the floor).

        Raises:
            MalformedFrame: not a valid replay state (wrong fields or types,
                ids unsorted or repeated, an id below the floor, too large).
            UnsupportedVersion: a state format this build does not know.
            ConfigurationError: as the constructor.
        """
        window = cls(window_ms=window_ms, max_skew_ms=max_skew_ms, max_entries=max_entries)
        raw = strict_loads(data, max_size=max_size)
        floor, entries = _parse_state(raw)
        window._floor_ms = floor
        window._seen = {mid: ts for ts, mid in entries}
        window._heap = entries  # sorted, hence already a heap
        while len(window._seen) > max_entries:
            window._raise_floor(window._heap[0][0] + 1)
        return window


def _check_config(window_ms: int, max_skew_ms: int, max_entries: int) -> None:
    for name, value, low in (
        ("window_ms", window_ms, 1),
        ("max_skew_ms", max_skew_ms, 0),
        ("max_entries", max_entries, 1),
    ):
        if type(value) is not int or not low <= value <= _MAX_TIME_MS:
            raise ConfigurationError(f"{name} must be an integer >= {low}")


def _check_args(message_id: bytes, timestamp_ms: int, now_ms: int) -> None:
    if type(message_id) is not bytes or not 1 <= len(message_id) <= MAX_ID_SIZE:
        raise LocalProtocolError(f"message id must be 1..{MAX_ID_SIZE} bytes")
    for value in (timestamp_ms, now_ms):
        if type(value) is not int or not 0 <= value <= _MAX_TIME_MS:
            raise LocalProtocolError("times must be integers of milliseconds in 0..2**63-1")


def _parse_state(raw: Any) -> tuple[int, list[tuple[int, bytes]]]:
    if type(raw) is not dict:
        raise MalformedFrame("replay state must be a CBOR map")
    version = raw.get("v")
    if type(version) is not int:
        raise MalformedFrame("replay state version must be an integer")
    if version != REPLAY_FORMAT_VERSION:
        raise UnsupportedVersion(f"replay state version {version} is not supported")
    if raw.keys() != _STATE_KEYS:
        raise MalformedFrame("replay state must have exactly the fields v, floor, ids")
    floor = _parse_time(raw["floor"])
    if type(raw["ids"]) is not list:
        raise MalformedFrame("replay state ids must be an array")
    entries = [_parse_entry(item) for item in raw["ids"]]
    for previous, current in zip(entries, entries[1:], strict=False):
        if previous >= current:
            raise MalformedFrame("replay state ids must be sorted by (timestamp, id)")
    if len({mid for _, mid in entries}) != len(entries):
        raise MalformedFrame("replay state ids must be distinct")
    if entries and entries[0][0] < floor:
        raise MalformedFrame("replay state holds an id below its floor")
    return floor, entries


def _parse_entry(item: Any) -> tuple[int, bytes]:
    if type(item) is not list or len(item) != 2:
        raise MalformedFrame("replay state entry must be an [id, timestamp] pair")
    mid, ts = item
    if type(mid) is not bytes or not 1 <= len(mid) <= MAX_ID_SIZE:
        raise MalformedFrame(f"replay state id must be 1..{MAX_ID_SIZE} bytes")
    return _parse_time(ts), mid


def _parse_time(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_TIME_MS:
        raise MalformedFrame("replay state time must be an integer in 0..2**63-1")
    return value
