"""kademlia, hardened: bounded RPC waits, checked datagrams, tracked tasks, verified crawls.

The ``kademlia`` package stores whatever any node sends it, waits 5 s per
unanswered RPC, and lets hostile or late datagrams raise in background
tasks. This module owns the subclasses that fix that (see
``docs/design/dht.md``): :class:`DhtProtocol` (the RPC layer),
:class:`DhtServer` (kademlia's server with that protocol and a tracked
refresh) and :class:`ValueCrawl` (a lookup that verifies what it finds).

kademlia and rpcudp ship no type information: every object that comes from
them is ``Any`` here. Only :mod:`talos.discovery.dht` uses these classes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, cast

# u-msgpack-python ships a .pyi but no py.typed marker, so mypy skips it.
import umsgpack  # type: ignore[import-untyped, unused-ignore]
from kademlia.crawling import (  # type: ignore[import-untyped, unused-ignore]
    RPCFindResponse,
    ValueSpiderCrawl,
)
from kademlia.network import Server  # type: ignore[import-untyped, unused-ignore]
from kademlia.node import Node  # type: ignore[import-untyped, unused-ignore]
from kademlia.protocol import KademliaProtocol  # type: ignore[import-untyped, unused-ignore]

from talos.discovery.dht_storage import ValidatingStorage
from talos.discovery.dht_value import DhtEntry, is_node_id

__all__ = ["Address", "DhtProtocol", "DhtServer", "ValueCrawl"]

#: The DHT's logs all go to one logger, whatever module writes them.
log = logging.getLogger("talos.discovery.dht")

Address = tuple[str, int]


def _is_contact(value: object) -> bool:
    if not isinstance(value, list | tuple) or len(value) != 3:
        return False
    node_id, host, port = value
    return is_node_id(node_id) and type(host) is str and type(port) is int and 0 < port < 65536


def _well_formed_answer(data: object) -> bool:
    """What an honest node answers to ping, store, find_node or find_value."""
    if type(data) is bool or is_node_id(data):
        return True
    if type(data) is dict:
        return data.keys() == {"value"} and type(data["value"]) is bytes
    return type(data) is list and all(_is_contact(item) for item in data)


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]  # kademlia is untyped
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
            cast(ValidatingStorage, self.storage).logs.log(
                logging.DEBUG, "dht_datagram_refused", "DHT background task failed: %r", exc
            )

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
        if not data[1] or not is_node_id(data[1][0]):
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
        if not is_node_id(key):
            return []
        return super().rpc_find_node(sender, nodeid, key)

    def rpc_find_value(self, sender: Address, nodeid: bytes, key: object) -> Any:
        if not is_node_id(key):
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


class DhtServer(Server):  # type: ignore[misc]  # kademlia is untyped
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

    def _create_protocol(self) -> DhtProtocol:
        return DhtProtocol(self.node, self.storage, self.ksize, self._rpc_timeout)

    def refresh_table(self, interval: float | None = None) -> None:
        self.protocol.spawn(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(self._refresh_interval, self.refresh_table)


class ValueCrawl(ValueSpiderCrawl):  # type: ignore[misc]  # kademlia is untyped
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
