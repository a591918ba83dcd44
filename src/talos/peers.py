"""Who a peer is and where it listens: verified key logs and peer records.

Lookups go local cache → registry → DHT. Whatever comes back is verified
before use: key logs by :class:`~talos.core.keylog.KeyLog` (self-certifying,
and extend-only against what we knew), peer records by the agent's key. The
cache holds only verified data and is persisted, so established peers stay
reachable with the registry and the DHT both down (seed: "Registry
Unavailable").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from talos.core.clock import Clock
from talos.core.crypto import VerifyKey
from talos.core.keylog import IssuerKeys, KeyLog, KeyLookup, check_not_revoked
from talos.core.peer_record import PeerRecord
from talos.discovery.dht import DhtNode
from talos.discovery.registry_client import RegistryClient
from talos.errors import (
    DiscoveryError,
    KeyLogInvalid,
    MalformedFrame,
    PeerNotFound,
    PeerUnknown,
    RegistryUnavailable,
    SignatureInvalid,
    StaleMessage,
    UnsupportedVersion,
)

__all__ = ["DhtSource", "PeerCache", "PeerDirectory", "RecordSource", "RegistrySource"]

_log = logging.getLogger("talos.discovery")
#: Log event of a discovery source that is down, by source name (docs/operations.md, "Logs").
_UNREACHABLE_EVENTS = {"registry": "registry_unreachable", "dht": "dht_unreachable"}


class PeerCache(Protocol):
    """Durable storage of verified key logs and peer records (see AgentState)."""

    def keylog(self, agent_id: str, /) -> bytes | None: ...
    def put_keylog(self, agent_id: str, data: bytes, /) -> object: ...
    def peer_record(self, agent_id: str, /) -> bytes | None: ...
    def put_peer_record(self, record: bytes, /) -> object: ...
    def put_contact(self, agent_id: str, keylog: bytes, record: bytes | None, /) -> object:
        """A first contact's key log and (if not ``None``) record, both verified, in
        one write, which may wait for the cache's next commit (it is fetched again
        if lost); reads answer it meanwhile."""
        ...


class RecordSource(Protocol):
    """A discovery backend (registry client or DHT node)."""

    name: str

    async def keylog(self, agent_id: str, known: KeyLog | None) -> KeyLog: ...
    async def record(self, agent_id: str, keys: KeyLookup, now: float) -> PeerRecord: ...


_SOURCE_ERRORS = (
    DiscoveryError,
    KeyLogInvalid,
    MalformedFrame,
    UnsupportedVersion,
    SignatureInvalid,
    StaleMessage,
)


class PeerDirectory:
    """Verified identities and endpoints of the agents we talk to."""

    def __init__(
        self,
        cache: PeerCache,
        sources: Sequence[RecordSource],
        *,
        clock: Clock,
        own: KeyLog,
        on_source_down: Callable[[str, Exception], None] | None = None,
        on_source_up: Callable[[str], None] | None = None,
    ) -> None:
        self._cache = cache
        self._sources = list(sources)
        self._clock = clock
        self._logs: dict[str, KeyLog] = {own.agent_id: own}
        #: Unknown agents' key logs being fetched, shared by every caller.
        self._fetching: dict[str, asyncio.Future[KeyLog]] = {}
        self._on_source_down = on_source_down
        self._on_source_up = on_source_up
        #: Called with (the log we held, the newer one) whenever a peer's known log
        #: grows, whichever path brought it (offer, registry, DHT, a token's issuer).
        self.on_rotated: Callable[[KeyLog, KeyLog], None] | None = None
        #: Called with ``"peer_record"`` or ``"key_log"`` when a source served one
        #: whose signature does not verify (``talos_signature_failures_total``).
        self.on_signature_failure: Callable[[str], None] | None = None

    # -- key logs -----------------------------------------------------------------

    def known_log(self, agent_id: str) -> KeyLog | None:
        """The verified key log we hold (memory, then the durable cache)."""
        log = self._logs.get(agent_id)
        if log is None:
            data = self._cache.keylog(agent_id)
            if data is not None:
                try:
                    log = KeyLog.from_bytes(data)
                except (MalformedFrame, UnsupportedVersion, KeyLogInvalid):
                    _log.warning(
                        "cached key log of %s does not verify; ignoring it",
                        agent_id,
                        extra={"event": "peer_cache_invalid", "peer_id": agent_id},
                    )
                    return None
                self._logs[agent_id] = log
        return log

    def learn_log(self, log: KeyLog) -> KeyLog:
        """Adopt a verified log, extend-only against the one we knew.

        Raises:
            KeyLogInvalid: it forks or rolls back the known history.
        """
        known = self.known_log(log.agent_id)
        if known is not None:
            if len(log) < len(known):
                if known.events[: len(log)] != log.events:
                    raise KeyLogInvalid(f"key log of {log.agent_id} forks the known one")
                return known
            log = known.extend(log.events)
        if known is None:  # a first contact: its write may wait for the next commit
            self._cache.put_contact(log.agent_id, log.to_bytes(), None)
        elif len(log) != len(known):  # a rotation: written at once, never forgotten
            self._cache.put_keylog(log.agent_id, log.to_bytes())
        self._logs[log.agent_id] = log
        if known is not None and len(log) > len(known) and self.on_rotated is not None:
            self.on_rotated(known, log)
        return log

    async def keylog(self, agent_id: str, *, refresh: bool = False) -> KeyLog:
        """A peer's verified key log; asks discovery when unknown (or ``refresh``).

        Callers asking for the same unknown log at once share one fetch (an
        incoming link's first frame waits for the fetch its handshake started,
        see :meth:`talos.client.keylogs.KeyLogs.prefetch`).

        Raises:
            PeerUnknown: not cached, and every source answered that it knows no such
                agent (also the answer without sources).
            PeerNotFound: not cached, no source knows it and some could not be asked.
            KeyLogInvalid: a source offered a fork of the known history.
        """
        known = self.known_log(agent_id)
        if known is not None and not refresh:
            return known
        if refresh:
            return await self._fetch_log(agent_id, known)
        fetching = self._fetching.get(agent_id)
        if fetching is None:
            fetching = asyncio.ensure_future(self._fetch_log(agent_id, None))
            self._fetching[agent_id] = fetching
            fetching.add_done_callback(functools.partial(self._fetched, agent_id))
        # A caller that is cancelled leaves the fetch to the others (its result is cached).
        return await asyncio.shield(fetching)

    async def stop(self) -> None:
        """Cancel the shared key-log lookups still running (the client is closing;
        their callers were cancelled already)."""
        fetching = list(self._fetching.values())
        for task in fetching:
            task.cancel()
        await asyncio.gather(*fetching, return_exceptions=True)

    def _fetched(self, agent_id: str, fetching: asyncio.Future[KeyLog]) -> None:
        if self._fetching.get(agent_id) is fetching:
            del self._fetching[agent_id]
        if not fetching.cancelled():
            fetching.exception()  # retrieved: every waiter got it (or none was left)

    async def _fetch_log(self, agent_id: str, known: KeyLog | None) -> KeyLog:
        misses: list[str] = []
        for source in self._sources:
            try:
                fetched = await source.keylog(agent_id, known)
            except KeyLogInvalid as exc:
                self._bad_signature("key_log", exc)
                raise
            except _SOURCE_ERRORS as exc:
                self._source_failed(source, exc, agent_id)
                if isinstance(exc, PeerNotFound):
                    misses.append(source.name)
                continue
            self._source_answered(source)
            return self.learn_log(fetched)
        if known is not None:
            return known
        if len(misses) == len(self._sources):  # every source answered: no such agent
            raise PeerUnknown(f"no agent {agent_id}: not in the cache{_not_known_by(misses)}")
        raise PeerNotFound(f"no key log for {agent_id} in the cache or any discovery source")

    def signing_key(self, agent_id: str, sequence: int) -> VerifyKey | None:
        """:data:`KeyLookup` over the known logs (no network).

        Raises:
            KeyRevoked: an emergency rotation of ``agent_id`` revoked that key.
        """
        log = self.known_log(agent_id)
        if log is None:
            return None
        check_not_revoked(log, sequence)
        return log.key_at(sequence)

    def learn_contact(self, log: KeyLog, record: PeerRecord | None) -> KeyLog:
        """:meth:`learn_log` and :meth:`learn_record` for what a first contact brought,
        in one write of the cache, which rides with the cache's next commit (the
        session's, on a new session's path: no commit of its own). A record that
        does not verify under ``log`` is left out (the connection then looks the
        endpoint up itself, and says why).

        Raises:
            KeyLogInvalid: ``log`` forks or rolls back the one we hold (when we
                hold one already, this is learn_log and learn_record).
        """
        if self.known_log(log.agent_id) is not None:
            learned = self.learn_log(log)
            if record is not None:
                with contextlib.suppress(SignatureInvalid, StaleMessage):
                    self.learn_record(record)
            return learned
        keep: bytes | None = None
        if record is not None:
            try:
                record.verify(IssuerKeys([log]), now=self._clock.time())
            except (SignatureInvalid, StaleMessage) as exc:
                _log.info("record of %s not cached from its first contact: %s", log.agent_id, exc)
            else:
                keep = record.to_bytes()
        self._cache.put_contact(log.agent_id, log.to_bytes(), keep)
        self._logs[log.agent_id] = log
        return log

    # -- endpoints ----------------------------------------------------------------

    def cached_record(self, agent_id: str) -> PeerRecord | None:
        """The cached record, if it still verifies and is current."""
        data = self._cache.peer_record(agent_id)
        if data is None:
            return None
        try:
            record = PeerRecord.from_bytes(data)
            record.verify(self.signing_key, now=self._clock.time())
        except (MalformedFrame, UnsupportedVersion, SignatureInvalid, StaleMessage):
            return None
        return record

    def learn_record(self, record: PeerRecord) -> None:
        """Cache a record after verifying it (newer sequences replace older).

        Raises:
            SignatureInvalid, StaleMessage: it does not verify now.
        """
        record.verify(self.signing_key, now=self._clock.time())
        cached = self.cached_record(record.agent_id)
        if cached is None or record.sequence > cached.sequence:
            self._cache.put_peer_record(record.to_bytes())

    async def endpoint(self, agent_id: str, *, refresh: bool = False) -> PeerRecord:
        """Where ``agent_id`` listens: cache first (unless ``refresh``), then sources.

        Raises:
            PeerNotFound: nobody knows a current record and none is cached.
        """
        cached = self.cached_record(agent_id)
        if cached is not None and not refresh:
            return cached
        await self.keylog(agent_id)
        for source in self._sources:
            try:
                record = await self._record_from(source, agent_id)
            except _SOURCE_ERRORS as exc:
                self._bad_signature("peer_record", exc)
                self._source_failed(source, exc, agent_id)
                continue
            self._source_answered(source)
            self.learn_record(record)
            return record
        if cached is not None:
            return cached
        stale = self._cached_even_if_expired(agent_id)
        if stale is not None:
            _log.info("using an expired record of %s: no source answered", agent_id)
            return stale
        raise PeerNotFound(f"no current endpoint for {agent_id}")

    async def _record_from(self, source: RecordSource, agent_id: str) -> PeerRecord:
        """``source``'s record of ``agent_id``, verified.

        A record signed under a key sequence our log of the peer does not reach yet
        means the peer rotated while we were not talking to it: its newer log is
        fetched from the same source (learned extend-only, so ``on_rotated`` follows)
        and the record checked once more. Without this a running peer never found a
        rotated agent that came back on a new endpoint (docs/design/key-rotation-peers.md).

        Raises:
            SignatureInvalid, KeyLogInvalid, DiscoveryError, ...: as the source does.
        """
        beyond: list[int] = []

        def keys(issuer: str, sequence: int) -> VerifyKey | None:
            key = self.signing_key(issuer, sequence)
            if key is None and issuer == agent_id:
                beyond.append(sequence)
            return key

        try:
            return await source.record(agent_id, keys, self._clock.time())
        except SignatureInvalid:
            if not beyond:
                raise
        self.learn_log(await source.keylog(agent_id, self.known_log(agent_id)))
        return await source.record(agent_id, self.signing_key, self._clock.time())

    def _cached_even_if_expired(self, agent_id: str) -> PeerRecord | None:
        """Last resort: a cached record whose signature verifies, however old."""
        data = self._cache.peer_record(agent_id)
        if data is None:
            return None
        try:
            record = PeerRecord.from_bytes(data)
            record.verify(self.signing_key, now=record.issued_ms / 1000)
        except (MalformedFrame, UnsupportedVersion, SignatureInvalid, StaleMessage):
            return None
        return record

    def _bad_signature(self, signed: str, exc: Exception) -> None:
        """Count ``exc`` if a signature of what a source served did not verify."""
        failed = isinstance(exc, SignatureInvalid) or isinstance(exc.__context__, SignatureInvalid)
        if failed and self.on_signature_failure is not None:
            self.on_signature_failure(signed)

    def _source_failed(self, source: RecordSource, exc: Exception, agent_id: str) -> None:
        if isinstance(exc, RegistryUnavailable | DiscoveryError) and not isinstance(
            exc, PeerNotFound
        ):
            _log.warning(
                "discovery source %s unavailable: %s",
                source.name,
                exc,
                extra={
                    "event": _UNREACHABLE_EVENTS.get(source.name, "discovery_unreachable"),
                    "peer_id": agent_id,
                    "source": source.name,
                },
            )
            if self._on_source_down is not None:
                self._on_source_down(source.name, exc)
        else:
            _log.info("discovery source %s: %s", source.name, exc)
            self._source_answered(source)  # it answered, if only "not found"

    def _source_answered(self, source: RecordSource) -> None:
        if self._on_source_up is not None:
            self._on_source_up(source.name)


#: How a message names a discovery source.
_SOURCE_NAMES: Final = {"registry": "the registry", "dht": "the DHT"}


def _not_known_by(sources: list[str]) -> str:
    """``"; the registry does not know it"``, ``"; neither the registry nor the DHT knows it"``."""
    names = [_SOURCE_NAMES.get(name, name) for name in sources]
    if not names:
        return ""
    if len(names) == 1:
        return f"; {names[0]} does not know it"
    if len(names) == 2:
        return f"; neither {names[0]} nor {names[1]} knows it"
    return f"; none of {', '.join(names)} knows it"


class RegistrySource:
    """The registry as a :class:`RecordSource`."""

    name = "registry"

    def __init__(self, client: RegistryClient) -> None:
        self._client = client

    async def keylog(self, agent_id: str, known: KeyLog | None) -> KeyLog:
        return await self._client.fetch_keylog(agent_id, known)

    async def record(self, agent_id: str, keys: KeyLookup, now: float) -> PeerRecord:
        return await self._client.fetch_record(agent_id, keys, now)


class DhtSource:
    """The Kademlia DHT as a :class:`RecordSource` (values carry their key log)."""

    name = "dht"

    def __init__(self, node: DhtNode, clock: Clock) -> None:
        self._node = node
        self._clock = clock

    async def keylog(self, agent_id: str, known: KeyLog | None) -> KeyLog:
        entry = await self._node.lookup(agent_id, now=self._clock.time(), known_log=known)
        return entry.log

    async def record(self, agent_id: str, keys: KeyLookup, now: float) -> PeerRecord:
        record = await self._node.resolve(agent_id, now=now)
        record.verify(keys, now=now)
        return record
