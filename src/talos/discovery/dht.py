"""Kademlia DHT fallback for peer discovery: the node that publishes and looks up records.

The ``kademlia`` package stores whatever any node sends it and waits 5 s per
unanswered RPC. Talos wraps it so that (see ``docs/design/dht.md``):

1. A DHT value is a canonical CBOR bundle of a peer record and the key log
   that vouches for it (:mod:`talos.discovery.dht_value`), stored under
   :func:`dht_key` of the record's agent id.
2. A node stores a value only if it verifies and is newer than what it holds
   for that key (:class:`ValidatingStorage`, in
   :mod:`talos.discovery.dht_storage`).
3. A reader trusts no node: every value found is verified again, against the
   reader's own copy of the agent's log when it has one, and the highest
   valid sequence wins. A malicious node can withhold records or serve an
   old-but-valid one; it cannot forge one, and expiry bounds the staleness.
4. Each RPC waits at most ``rpc_timeout`` and each operation at most
   ``lookup_timeout``; a lookup that runs out of time returns the best valid
   record found so far. Only Talos errors leave this module.

This module owns :class:`DhtNode` (start, stop, bootstrap, publish, lookup);
the hardened kademlia classes it drives are in
:mod:`talos.discovery.dht_protocol`. The value and storage names are
re-exported here, so ``talos.discovery.dht`` stays the DHT's public path.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, Final, TypeVar, cast

# kademlia ships no type information: every object that comes from it is Any here.
from kademlia.crawling import NodeSpiderCrawl  # type: ignore[import-untyped, unused-ignore]
from kademlia.node import Node  # type: ignore[import-untyped, unused-ignore]

from talos.core.agent_id import check_agent_id
from talos.core.clock import Clock
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.rng import Rng
from talos.discovery.dht_protocol import Address, DhtProtocol, DhtServer, ValueCrawl
from talos.discovery.dht_storage import DEFAULT_MAX_ENTRIES, ValidatingStorage
from talos.discovery.dht_value import (
    DHT_KEY_DOMAIN,
    ID_SIZE,
    MAX_VALUE_SIZE,
    DhtEntry,
    dht_key,
    encode_value,
    is_node_id,
    verify_value,
)
from talos.errors import DiscoveryError, LocalProtocolError, PeerNotFound, TalosError
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG

__all__ = [
    "DEFAULT_LOOKUP_TIMEOUT",
    "DEFAULT_RPC_TIMEOUT",
    "DHT_KEY_DOMAIN",
    "MAX_VALUE_SIZE",
    "DhtEntry",
    "DhtNode",
    "ValidatingStorage",
    "dht_key",
    "encode_value",
    "verify_value",
]

log = logging.getLogger(__name__)

DEFAULT_RPC_TIMEOUT: Final = 1.0
DEFAULT_LOOKUP_TIMEOUT: Final = 4.0

_T = TypeVar("_T")


class DhtNode:
    """One participant in the Talos DHT: stores others' records, publishes and resolves.

    Time comes from ``clock`` (record expiry), node ids from ``rng``. Each RPC
    waits at most ``rpc_timeout`` seconds and each publish, lookup or
    bootstrap at most ``lookup_timeout`` seconds.
    """

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: Rng = SYSTEM_RNG,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        lookup_timeout: float = DEFAULT_LOOKUP_TIMEOUT,
        ksize: int = 20,
        alpha: int = 3,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        refresh_interval: float = 3600.0,
    ) -> None:
        self.storage = ValidatingStorage(clock, max_entries=max_entries)
        self._clock = clock
        self._lookup_timeout = lookup_timeout
        self._server = DhtServer(
            self.storage,
            rng.bytes(ID_SIZE),
            ksize=ksize,
            alpha=alpha,
            rpc_timeout=rpc_timeout,
            refresh_interval=refresh_interval,
        )
        self._address: Address | None = None

    @property
    def node_id(self) -> bytes:
        return cast(bytes, self._server.node.id)

    @property
    def address(self) -> Address:
        """The (host, port) this node listens on.

        Raises:
            LocalProtocolError: the node is not started.
        """
        if self._address is None:
            raise LocalProtocolError("DHT node is not started")
        return self._address

    def neighbours(self) -> list[Address]:
        """Addresses of the nodes in this node's routing table."""
        if self._address is None:
            return []
        return [
            (n.ip, n.port) for n in self._server.protocol.router.find_neighbors(self._server.node)
        ]

    async def start(
        self, port: int = 0, host: str = "127.0.0.1", bootstrap: Sequence[Address] = ()
    ) -> None:
        """Listen on UDP ``host:port`` (0 picks a free port) and join through ``bootstrap``.

        Unreachable bootstrap nodes are logged, not fatal: others can still
        join through this node.

        Raises:
            LocalProtocolError: already started.
            DiscoveryError: the port cannot be bound.
        """
        if self._address is not None:
            raise LocalProtocolError("DHT node is already started")
        try:
            await self._server.listen(port, interface=host)
        except OSError as exc:
            raise DiscoveryError(f"cannot listen for the DHT on {host}:{port}: {exc}") from None
        sockname = self._server.transport.get_extra_info("sockname")
        self._address = (sockname[0], sockname[1])
        if not bootstrap:
            return
        try:
            reached = await self.bootstrap(bootstrap)
        except DiscoveryError as exc:
            log.warning(
                "DHT bootstrap did not complete: %s", exc, extra={"event": "dht_unreachable"}
            )
            return
        if reached == 0:
            log.warning(
                "no DHT bootstrap node answered: %s",
                list(bootstrap),
                extra={"event": "dht_unreachable"},
            )

    async def stop(self) -> None:
        """Close the socket and settle every outstanding RPC and background task."""
        if self._address is None:
            return
        self._server.stop()
        await cast(DhtProtocol, self._server.protocol).abort()
        self._address = None

    async def bootstrap(self, addresses: Iterable[Address]) -> int:
        """Ping ``addresses`` and crawl towards this node's id; the number that answered.

        Raises:
            LocalProtocolError: the node is not started.
            DiscoveryError: the deadline passed.
        """
        protocol = self._protocol()

        async def join() -> int:
            found = await asyncio.gather(*(self._ping(a) for a in addresses))
            nodes = [n for n in found if n is not None]
            if nodes:
                await NodeSpiderCrawl(protocol, self._server.node, nodes, *self._params()).find()
            return len(nodes)

        return await self._deadline(join(), "bootstrap")

    async def publish(
        self, record_bytes: bytes, keylog_bytes: bytes, bundle_bytes: bytes | None = None
    ) -> int:
        """Store a signed record (with its agent's key log and, optionally, a prekey
        bundle without one-time key) locally and on the closest nodes.

        Returns the number of *other* nodes that accepted it (0 when this
        node knows no others yet; the record is still served from here).

        Raises:
            LocalProtocolError: the record does not verify with the log, is
                expired, is too large, or its sequence is not higher than
                the one already published here.
            DiscoveryError: the deadline passed before the stores completed.
        """
        protocol = self._protocol()
        try:
            value = encode_value(record_bytes, keylog_bytes, bundle_bytes)
            entry = verify_value(value, now=self._clock.time())
        except TalosError as exc:
            raise LocalProtocolError(f"refusing to publish: {exc}") from None
        key = dht_key(entry.record.agent_id)
        if not self.storage.put(key, value):
            raise LocalProtocolError(
                f"refusing to publish: sequence {entry.record.sequence} is not higher than "
                "the record already published"
            )

        async def store() -> int:
            target = Node(key)
            nearest = protocol.router.find_neighbors(target)
            nodes = await NodeSpiderCrawl(protocol, target, nearest, *self._params()).find()
            nodes = [n for n in nodes if n.id != self.node_id]
            results = await asyncio.gather(*(protocol.call_store(n, key, value) for n in nodes))
            return sum(1 for ok, accepted in results if ok and accepted is True)

        return await self._deadline(store(), "publish")

    async def lookup(
        self, agent_id: str, *, now: float, known_log: KeyLog | None = None
    ) -> DhtEntry:
        """Find the newest valid record of ``agent_id`` here or on the closest nodes.

        Every value is verified at ``now`` (and against ``known_log``, a
        log of this agent the caller already trusts); invalid values are
        ignored. When the deadline passes, the best record found so far is
        returned.

        Raises:
            MalformedFrame: ``agent_id`` is not an agent id.
            LocalProtocolError: the node is not started, or ``known_log`` is another agent's.
            PeerNotFound: no node answered with a valid record in time.
        """
        check_agent_id(agent_id)
        if known_log is not None and known_log.agent_id != agent_id:
            raise LocalProtocolError("known_log belongs to another agent")
        protocol = self._protocol()
        key = dht_key(agent_id)

        def check(value: object) -> DhtEntry | None:
            try:
                entry = verify_value(value, now=now, key=key, known_log=known_log)
            except TalosError as exc:
                self.storage.logs.log(
                    logging.INFO,
                    "dht_datagram_refused",
                    "ignoring an invalid DHT value for %s: %s",
                    agent_id,
                    exc,
                )
                return None
            return entry if entry.record.agent_id == agent_id else None

        target = Node(key)
        nearest = protocol.router.find_neighbors(target)
        crawl = ValueCrawl(protocol, target, nearest, *self._params(), check)
        try:
            await self._deadline(crawl.find(), "lookup")
        except DiscoveryError:
            log.info("DHT lookup of %s ran out of time; using what was found", agent_id)
        local = self.storage.get(key)
        candidates = [e for _, e in crawl.found]
        if local is not None and (entry := check(local)) is not None:
            candidates.append(entry)
        if not candidates:
            raise PeerNotFound(f"no DHT node holds a valid record of {agent_id}")
        best = max(candidates, key=lambda e: e.record.sequence)
        self._repair(crawl, key, best)
        return best

    async def resolve(
        self, agent_id: str, *, now: float, known_log: KeyLog | None = None
    ) -> PeerRecord:
        """:meth:`lookup`, returning only the verified record.

        Raises:
            MalformedFrame: ``agent_id`` is not an agent id.
            LocalProtocolError: the node is not started, or ``known_log`` is another agent's.
            PeerNotFound: no node answered with a valid record in time.
        """
        return (await self.lookup(agent_id, now=now, known_log=known_log)).record

    # -- internals ------------------------------------------------------------

    def _protocol(self) -> Any:
        if self._address is None:
            raise LocalProtocolError("DHT node is not started")
        return self._server.protocol

    def _params(self) -> tuple[int, int]:
        return self._server.ksize, self._server.alpha

    async def _ping(self, address: Address) -> Any:
        host, port = address
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM
            )
        except OSError:
            log.warning(
                "cannot resolve DHT bootstrap host %s",
                host,
                extra={"event": "dht_unreachable", "host": host},
            )
            return None
        ip, resolved_port = str(infos[0][4][0]), int(infos[0][4][1])
        ok, node_id = await self._server.protocol.ping((ip, resolved_port), self.node_id)
        return Node(node_id, ip, resolved_port) if ok and is_node_id(node_id) else None

    def _repair(self, crawl: ValueCrawl, key: bytes, best: DhtEntry) -> None:
        """Hand the newest record to asked nodes that had none or an older one."""
        protocol = cast(DhtProtocol, self._server.protocol)
        # The carried log always equals the merged one (it must extend any
        # known log), so this re-encoding is the value as found.
        value = best.to_bytes()
        stale = [p for p, e in crawl.found if e.record.sequence < best.record.sequence]
        for peer in stale + crawl.without_value[:1]:
            if peer is not None:
                protocol.spawn(protocol.call_store(peer, key, value))

    async def _deadline(self, work: Coroutine[Any, Any, _T], what: str) -> _T:
        try:
            return await asyncio.wait_for(work, self._lookup_timeout)
        except TimeoutError:
            raise DiscoveryError(
                f"DHT {what} did not finish within {self._lookup_timeout:g} s"
            ) from None
        except TalosError:
            raise
        except Exception as exc:  # kademlia raises bare exceptions on hostile answers
            raise DiscoveryError(f"DHT {what} failed: {type(exc).__name__}") from None
