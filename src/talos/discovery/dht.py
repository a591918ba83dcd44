"""Kademlia DHT fallback for peer discovery, with validating storage and bounded lookups.

The ``kademlia`` package stores whatever any node sends it and waits 5 s per
unanswered RPC. This module wraps it so that (see ``docs/design/dht.md``):

1. A DHT value is a canonical CBOR bundle ``{"v": 1, "rec": peer record
   bytes, "log": key event log bytes}`` of at most :data:`MAX_VALUE_SIZE`
   bytes, stored under :func:`dht_key` of the record's agent id. The key log
   is self-certifying (the agent id is the digest of its inception event), so
   any node can verify the record without knowing the agent beforehand.
2. A node stores a value only if it verifies (:func:`verify_value`): the
   record is signed by the *latest* key of the log it carries, is not
   expired, and is stored under its agent's key. Against what the node
   already holds for that key, the carried log must extend the stored one
   (no rollback, no fork) and the record's ``sequence`` must be higher
   (re-storing the identical value is a harmless refresh). The highest
   sequence stays as a floor after the record expires.
3. A reader trusts no node: every value found is verified again, against the
   reader's own copy of the agent's log when it has one, and the highest
   valid sequence wins. A malicious node can withhold records or serve an
   old-but-valid one; it cannot forge one, and expiry bounds the staleness.
4. Each RPC waits at most ``rpc_timeout`` and each operation at most
   ``lookup_timeout``; a lookup that runs out of time returns the best valid
   record found so far. Only Talos errors leave this module.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

# u-msgpack-python ships a .pyi but no py.typed marker, so mypy skips it.
import umsgpack  # type: ignore[import-untyped, unused-ignore]

# kademlia and rpcudp ship no type information: every object that comes from
# them is Any here, kept inside the private classes below.
from kademlia.crawling import (  # type: ignore[import-untyped, unused-ignore]
    NodeSpiderCrawl,
    RPCFindResponse,
    ValueSpiderCrawl,
)
from kademlia.network import Server  # type: ignore[import-untyped, unused-ignore]
from kademlia.node import Node  # type: ignore[import-untyped, unused-ignore]
from kademlia.protocol import KademliaProtocol  # type: ignore[import-untyped, unused-ignore]
from kademlia.storage import IStorage  # type: ignore[import-untyped, unused-ignore]

from talos.core.agent_id import check_agent_id
from talos.core.clock import Clock
from talos.core.crypto import sha256
from talos.core.encoding import canonical_dumps, check_versioned_map, strict_loads
from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.rng import Rng
from talos.core.x3dh import PrekeyBundle
from talos.errors import (
    DiscoveryError,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    SignatureInvalid,
    TalosError,
)
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

DHT_KEY_DOMAIN: Final = b"talos/dht/v1\x00"
VALUE_VERSION: Final = 1
#: rpcudp refuses requests over 8 KiB; this leaves room for the STORE framing.
#: A key log of about 25 events still fits beside a peer record.
MAX_VALUE_SIZE: Final = 7168
DEFAULT_RPC_TIMEOUT: Final = 1.0
DEFAULT_LOOKUP_TIMEOUT: Final = 4.0
DEFAULT_MAX_ENTRIES: Final = 10_000
_ID_SIZE: Final = 20
_FIELDS: Final = frozenset({"v", "rec", "log"})
#: With the optional prekey bundle (signed prekey only, never a one-time key).
_FIELDS_WITH_BUNDLE: Final = _FIELDS | {"pre"}

Address = tuple[str, int]
_T = TypeVar("_T")


def dht_key(agent_id: str) -> bytes:
    """The 160-bit DHT key of an agent: SHA-256(``talos/dht/v1\\0`` + agent id)[:20]."""
    return sha256(DHT_KEY_DOMAIN + agent_id.encode())[:_ID_SIZE]


# -- values: encoding and verification (pure) ------------------------------------


@dataclass(frozen=True, slots=True)
class DhtEntry:
    """A verified DHT value: the peer record, the key log that vouches for it, and
    (optionally) a prekey bundle to start a session without the registry."""

    record: PeerRecord
    log: KeyLog
    bundle: PrekeyBundle | None = None

    def to_bytes(self) -> bytes:
        return encode_value(
            self.record.to_bytes(),
            self.log.to_bytes(),
            None if self.bundle is None else self.bundle.to_bytes(),
        )


def encode_value(
    record_bytes: bytes, keylog_bytes: bytes, bundle_bytes: bytes | None = None
) -> bytes:
    """Bundle a serialized peer record, key log and (optional) prekey bundle into one
    DHT value.

    The prekey bundle carries the signed prekey only: a DHT value is read by
    anyone, so a one-time prekey in it would be handed out many times.

    Raises:
        MalformedFrame: the bundle would exceed :data:`MAX_VALUE_SIZE`.
    """
    fields: dict[str, object] = {"v": VALUE_VERSION, "rec": record_bytes, "log": keylog_bytes}
    if bundle_bytes is not None:
        fields["pre"] = bundle_bytes
    value = canonical_dumps(fields)
    if len(value) > MAX_VALUE_SIZE:
        raise MalformedFrame(
            f"DHT value of {len(value)} bytes exceeds the {MAX_VALUE_SIZE}-byte limit "
            "(key log too long for the DHT)"
        )
    return value


def verify_value(
    value: object,
    *,
    now: float,
    key: bytes | None = None,
    known_log: KeyLog | None = None,
    clock_skew: float = 60.0,
) -> DhtEntry:
    """Decode and verify an untrusted DHT value.

    ``key``, when given, is the DHT key the value is stored under; it must be
    the record's :func:`dht_key`. ``known_log`` is a log of the same agent
    the verifier already trusts: the carried log must equal or extend it.
    The returned entry holds the longer of the two logs.

    Raises:
        MalformedFrame: not a well-formed bundle, record or log, or stored
            under another agent's key.
        UnsupportedVersion: a bundle, record or log format this build does not know.
        KeyLogInvalid: the carried log is invalid, or forks or rolls back ``known_log``.
        SignatureInvalid: the record is not signed by the latest key of the log.
        StaleMessage: the record is expired (or issued in the future).
    """
    if type(value) is not bytes:
        raise MalformedFrame("DHT value must be bytes")
    decoded = strict_loads(value, max_size=MAX_VALUE_SIZE)
    fields = _FIELDS_WITH_BUNDLE if type(decoded) is dict and "pre" in decoded else _FIELDS
    raw = check_versioned_map(decoded, fields=fields, version=VALUE_VERSION, what="DHT value")
    if any(type(raw[name]) is not bytes for name in fields - {"v"}):
        raise MalformedFrame("DHT value fields must be byte strings")
    record = PeerRecord.from_bytes(raw["rec"])
    keylog = KeyLog.from_bytes(raw["log"])
    if key is not None and dht_key(record.agent_id) != key:
        raise MalformedFrame("DHT value is stored under another agent's key")
    keylog = _merge_logs(known_log, keylog, record.agent_id)
    if record.key_sequence != keylog.state.sequence:
        raise SignatureInvalid(
            f"peer record of {record.agent_id} is signed with key {record.key_sequence}, "
            f"not the current key {keylog.state.sequence}"
        )
    record.verify(IssuerKeys([keylog]), now=now, clock_skew=clock_skew)
    bundle = None if "pre" not in raw else _verified_bundle(raw["pre"], keylog)
    return DhtEntry(record, keylog, bundle)


def _verified_bundle(data: bytes, keylog: KeyLog) -> PrekeyBundle:
    """A carried prekey bundle, checked against the agent's current keys.

    Raises:
        MalformedFrame: not a bundle, another agent's, or with a one-time prekey.
        UnsupportedVersion: a bundle format this build does not know.
        SignatureInvalid: not the current keys, or the signed prekey does not verify.
    """
    bundle = PrekeyBundle.from_bytes(data)
    if bundle.agent_id != keylog.agent_id:
        raise MalformedFrame("DHT value carries another agent's prekey bundle")
    if bundle.one_time_prekey is not None:
        raise MalformedFrame("a DHT prekey bundle must not carry a one-time prekey")
    state = keylog.state
    if bundle.identity_signing_key != state.signing_key.raw or bundle.identity_dh_key != (
        state.dh_key
    ):
        raise SignatureInvalid("DHT prekey bundle is not made with the agent's current keys")
    bundle.verify()
    return bundle


def _merge_logs(known: KeyLog | None, carried: KeyLog, agent_id: str) -> KeyLog:
    if carried.agent_id != agent_id:
        raise SignatureInvalid(f"DHT value carries the key log of another agent than {agent_id}")
    if known is None:
        return carried
    if known.agent_id != agent_id:
        raise LocalProtocolError("known_log belongs to another agent")
    return known.extend(carried.events)


# -- validating storage for kademlia nodes ----------------------------------------


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
        self._max_entries = max_entries
        self._skew = clock_skew
        self._data: OrderedDict[bytes, _Stored] = OrderedDict()

    def put(self, key: object, value: object) -> bool:
        """Store ``value`` under ``key`` if it verifies and is newer; True if stored."""
        if type(key) is not bytes or len(key) != _ID_SIZE:
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
            log.debug("DHT storage refused a value for %s: %s", key.hex(), exc)
            return False
        if old is not None and value != old.value:
            if entry.record.sequence <= old.entry.record.sequence:
                log.debug("DHT storage refused a value for %s: sequence not higher", key.hex())
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


# -- hardened kademlia protocol ---------------------------------------------------


def _is_id(value: object) -> bool:
    return type(value) is bytes and len(value) == _ID_SIZE


def _is_contact(value: object) -> bool:
    if not isinstance(value, list | tuple) or len(value) != 3:
        return False
    node_id, host, port = value
    return _is_id(node_id) and type(host) is str and type(port) is int and 0 < port < 65536


def _well_formed_answer(data: object) -> bool:
    """What an honest node answers to ping, store, find_node or find_value."""
    if type(data) is bool or _is_id(data):
        return True
    if type(data) is dict:
        return data.keys() == {"value"} and type(data["value"]) is bytes
    return type(data) is list and all(_is_contact(item) for item in data)


class _Protocol(KademliaProtocol):  # type: ignore[misc]  # kademlia is untyped
    """KademliaProtocol with bounded waits, input checks, and tracked tasks.

    rpcudp decodes untrusted datagrams inside fire-and-forget tasks and calls
    ``set_result`` on futures a cancelled lookup may have abandoned; both
    raise on hostile or merely late input. Here every datagram is handled
    under a guard, malformed answers count as no answer, and :meth:`abort`
    settles everything outstanding so a stopped node leaves nothing pending.
    """

    def __init__(
        self, source_node: Any, storage: ValidatingStorage, ksize: int, wait: float
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = wait
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # Hostile datagrams make kademlia and umsgpack raise anything: log, never crash.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("DHT background task failed: %r", exc)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.spawn(self._solve_datagram(data, addr))

    async def _solve_datagram(self, datagram: bytes, address: Address) -> None:
        # rpcudp framing: 1 byte kind (0 request, 1 response), 20 bytes id, msgpack body.
        if len(datagram) < 22:
            return
        msg_id, data = datagram[1:21], umsgpack.unpackb(datagram[21:])
        if datagram[:1] == b"\x00":
            await self._accept_request(msg_id, data, address)
        elif datagram[:1] == b"\x01":
            self._accept_response(msg_id, data, address)

    async def _accept_request(self, msg_id: bytes, data: Any, address: Address) -> None:
        # Every RPC Talos answers carries the caller's node id first.
        if type(data) is not list or len(data) != 2 or type(data[1]) is not list:
            return
        if data[0] not in ("ping", "store", "find_node", "find_value"):
            return
        if not data[1] or not _is_id(data[1][0]):
            return
        await super()._accept_request(msg_id, data, address)

    def _accept_response(self, msg_id: bytes, data: Any, address: Address) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is None:
            return
        future, timer = pending
        timer.cancel()
        if not future.done():
            future.set_result((True, data) if _well_formed_answer(data) else (False, None))

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result((False, None))

    def rpc_store(self, sender: Address, nodeid: bytes, key: object, value: object) -> bool:
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return cast(ValidatingStorage, self.storage).put(key, value)

    def rpc_find_node(self, sender: Address, nodeid: bytes, key: object) -> Any:
        if not _is_id(key):
            return []
        return super().rpc_find_node(sender, nodeid, key)

    def rpc_find_value(self, sender: Address, nodeid: bytes, key: object) -> Any:
        if not _is_id(key):
            return []
        return super().rpc_find_value(sender, nodeid, key)

    def welcome_if_new(self, node: Any) -> None:
        """Add a new contact and hand it the values it is now among the closest to.

        Same rule as kademlia's (paper §2.5), with the stored keys used as the
        digests they already are and the STORE calls tracked.
        """
        if not self.router.is_new_node(node):
            return
        for key, value in self.storage:
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                new_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                we_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(
                    keynode
                )
            if not neighbors or (new_close and we_closest):
                self.spawn(self.call_store(node, key, value))
        self.router.add_contact(node)

    async def abort(self) -> None:
        """Answer every outstanding RPC with "no response" and finish every task."""
        for future, timer in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Server(Server):  # type: ignore[misc]  # kademlia is untyped
    """kademlia's Server with our protocol and a tracked refresh task."""

    def __init__(
        self,
        storage: ValidatingStorage,
        node_id: bytes,
        *,
        ksize: int,
        alpha: int,
        rpc_timeout: float,
        refresh_interval: float,
    ) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=storage)
        self._rpc_timeout = rpc_timeout
        self._refresh_interval = refresh_interval

    def _create_protocol(self) -> _Protocol:
        return _Protocol(self.node, self.storage, self.ksize, self._rpc_timeout)

    def refresh_table(self, interval: float | None = None) -> None:
        self.protocol.spawn(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(self._refresh_interval, self.refresh_table)


class _ValueCrawl(ValueSpiderCrawl):  # type: ignore[misc]  # kademlia is untyped
    """A value lookup that verifies what it finds and keeps asking for a newer one.

    kademlia's crawl stops at the first node that answers with any value and
    takes the most common one. This one treats an invalid value like no
    answer, collects every valid one into :attr:`found` (so a deadline can
    still use them), and ends only when the k closest nodes were all asked.
    """

    def __init__(
        self,
        protocol: Any,
        node: Any,
        peers: list[Any],
        ksize: int,
        alpha: int,
        check: Callable[[object], DhtEntry | None],
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self._check = check
        self.found: list[tuple[Any, DhtEntry]] = []
        self.without_value: list[Any] = []

    async def _nodes_found(self, responses: dict[bytes, Any]) -> None:
        toremove = []
        for peerid, raw in responses.items():
            response = RPCFindResponse(raw)
            peer = self.nearest.get_node(peerid)
            if not response.happened():
                toremove.append(peerid)
            elif response.has_value():
                entry = self._check(response.get_value())
                if entry is None:
                    toremove.append(peerid)
                else:
                    self.found.append((peer, entry))
            else:
                self.without_value.append(peer)
                self.nearest.push(response.get_node_list())
        self.nearest.remove(toremove)
        if not self.nearest.have_contacted_all():
            await self.find()


# -- the node ---------------------------------------------------------------------


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
        self._server = _Server(
            self.storage,
            rng.bytes(_ID_SIZE),
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
        await cast(_Protocol, self._server.protocol).abort()
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
                log.info("ignoring an invalid DHT value for %s: %s", agent_id, exc)
                return None
            return entry if entry.record.agent_id == agent_id else None

        target = Node(key)
        nearest = protocol.router.find_neighbors(target)
        crawl = _ValueCrawl(protocol, target, nearest, *self._params(), check)
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
        return Node(node_id, ip, resolved_port) if ok and _is_id(node_id) else None

    def _repair(self, crawl: _ValueCrawl, key: bytes, best: DhtEntry) -> None:
        """Hand the newest record to asked nodes that had none or an older one."""
        protocol = cast(_Protocol, self._server.protocol)
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
