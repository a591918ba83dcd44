"""What a Talos DHT node keeps: verified values only, newest sequence first.

:class:`ValidatingStorage` is the storage a kademlia node is given. It owns
the values this node holds and the rule for replacing one (see
``docs/design/dht.md``): a value is kept only if it verifies
(:func:`~talos.discovery.dht_value.verify_value`) under the key it is sent
for, its log extends the log already held (no rollback, no fork), and its
record's ``sequence`` is higher (re-storing the identical value is a harmless
refresh). The highest sequence stays as a floor after the record expires.
Time comes from the injected clock; the module does no I/O.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, cast

# kademlia ships no type information: its IStorage base class is Any here.
from kademlia.storage import IStorage  # type: ignore[import-untyped, unused-ignore]

from talos.core.clock import Clock
from talos.discovery.dht_value import ID_SIZE, DhtEntry, verify_value
from talos.errors import TalosError
from talos.logs import LimitedLog
from talos.system import SYSTEM_CLOCK

__all__ = ["DEFAULT_MAX_ENTRIES", "ValidatingStorage"]

#: The DHT's logs all go to one logger, whatever module writes them.
log = logging.getLogger("talos.discovery.dht")

DEFAULT_MAX_ENTRIES: Final = 10_000


@dataclass(slots=True)
class _Stored:
    value: bytes
    entry: DhtEntry
    stored_at: float


class ValidatingStorage(IStorage):  # type: ignore[misc]  # kademlia's IStorage is untyped
    """Kademlia storage that keeps only verified peer records, newest sequence first.

    Implements kademlia's ``IStorage`` interface (``__setitem__``, ``get``,
    ``__getitem__``, ``__iter__``, ``iter_older_than``); :meth:`put` is the
    same as ``__setitem__`` but says whether the value was accepted. At most
    ``max_entries`` keys are kept; the least recently stored goes first.
    """

    def __init__(
        self,
        clock: Clock = SYSTEM_CLOCK,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock_skew: float = 60.0,
    ) -> None:
        self._clock = clock
        #: Any node can send us values: what they cause in the log is rate-limited.
        self.logs = LimitedLog(log, clock)
        self._max_entries = max_entries
        self._skew = clock_skew
        self._data: OrderedDict[bytes, _Stored] = OrderedDict()

    def put(self, key: object, value: object) -> bool:
        """Store ``value`` under ``key`` if it verifies and is newer; True if stored."""
        if type(key) is not bytes or len(key) != ID_SIZE:
            return False
        old = self._data.get(key)
        try:
            entry = verify_value(
                value,
                now=self._clock.time(),
                key=key,
                known_log=old.entry.log if old else None,
                clock_skew=self._skew,
            )
        except TalosError as exc:
            self.logs.log(
                logging.DEBUG,
                "dht_datagram_refused",
                "DHT storage refused a value for %s: %s",
                key.hex(),
                exc,
            )
            return False
        if old is not None and value != old.value:
            if entry.record.sequence <= old.entry.record.sequence:
                self.logs.log(
                    logging.DEBUG,
                    "dht_datagram_refused",
                    "DHT storage refused a value for %s: sequence not higher",
                    key.hex(),
                )
                return False
        self._data[key] = _Stored(cast(bytes, value), entry, self._clock.monotonic())
        self._data.move_to_end(key)
        while len(self._data) > self._max_entries:
            self._data.popitem(last=False)
        return True

    def entry(self, key: bytes) -> DhtEntry | None:
        """The verified, unexpired entry under ``key``, if any."""
        stored = self._data.get(key)
        if stored is None or not self._current(stored):
            return None
        return stored.entry

    def __setitem__(self, key: object, value: object) -> None:
        self.put(key, value)

    def get(self, key: object, default: Any = None) -> Any:
        stored = self._data.get(key) if type(key) is bytes else None
        if stored is None or not self._current(stored):
            return default
        return stored.value

    def __getitem__(self, key: object) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return cast(bytes, value)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter([(k, s.value) for k, s in self._data.items() if self._current(s)])

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """Unexpired (key, value) pairs stored at least ``seconds_old`` ago (to republish)."""
        cutoff = self._clock.monotonic() - seconds_old
        return [
            (k, s.value)
            for k, s in self._data.items()
            if s.stored_at <= cutoff and self._current(s)
        ]

    def _current(self, stored: _Stored) -> bool:
        return stored.entry.record.expires_ms + self._skew * 1000 >= self._clock.time() * 1000
