"""The resources of one running agent: opened in order, announced, shut down.

:class:`Resources` owns the open/close sequence of
:class:`~talos.client.TalosClient`: the home's lock, the identity, the audit
log and agent state, the token and mirror stores, discovery (registry client,
DHT node), the transport, the drivers (:func:`~talos.client.wiring.assemble`)
and the background tasks. It gets what it needs through its constructor and
hands the client an :class:`Opened` once everything is up; ``close``
closes whatever was opened, also after a failed open. It also owns what the
client holds from its construction on: the home, the instance id, the
metrics, the clock watch and whether the agent is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from talos.audit import AuditLog
from talos.audit.anchoring.settings import DATABASES as ANCHOR_DATABASES
from talos.audit.anchoring.settings import start_anchoring
from talos.audit.head_check import refuse_damaged_head
from talos.audit.mirror_store import MIRROR_DIR, MirrorStore
from talos.client.clocks import ClockWatch
from talos.client.config import ClientConfig
from talos.client.discovery import RECORD_LIFETIME, Discovery
from talos.client.grants import Grants, agent_grants
from talos.client.outbox import OutboxControl
from talos.client.own_keys import OwnIdentity, audit_signer
from talos.client.replies import Replies
from talos.client.requests import OpenRequests, Requester
from talos.client.rotation import Rotator
from talos.client.scraped import read_stores_when_scraped
from talos.client.wiring import Foundation, Parts, assemble
from talos.core import wire
from talos.core.clock import time_ms
from talos.core.crypto import VerifyKey
from talos.core.identity import Identity
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.discovery.dht import DhtNode
from talos.discovery.failover import public_url
from talos.discovery.registry_client import RegistryClient
from talos.errors import (
    ConfigurationError,
    DiscoveryError,
    IdentityNotFound,
    LocalProtocolError,
    PeerUnreachable,
    StoreCorrupted,
    TalosError,
)
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.storage.agent_state import AgentState, derive_storage_key
from talos.storage.home import AgentHome
from talos.storage.lock import HomeLock
from talos.storage.lost_state import guard, log_refusal
from talos.storage.tokens import TokenStore
from talos.transport import Link, Transport


class _Closable(Protocol):
    async def close(self) -> None: ...


Client = TypeVar("Client", bound=_Closable)


class Creating(Generic[Client]):
    """What ``TalosClient.create(...)`` returns: awaitable, or an async context
    manager that closes the client."""

    def __init__(self, start: Callable[[], Awaitable[Client]]) -> None:
        self._start = start
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._start().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._start()
        return self._client

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


@dataclass(frozen=True, slots=True)
class Opened:
    """What an open agent holds, for the client's public methods."""

    own: OwnIdentity
    log: AuditLog
    state: AgentState
    tokens: TokenStore
    mirrors: MirrorStore
    transport: Transport
    discovery: Discovery
    parts: Parts
    peers: PeerDirectory
    rotator: Rotator
    outbox: OutboxControl
    endpoint: str
    requester: Requester
    replies: Replies
    grants: Grants


class Resources:
    """Opens an agent's resources in order and closes them in reverse."""

    def __init__(self, config: ClientConfig) -> None:
        self.config, self._clock, self._rng = config, config.clock, config.rng
        self.home = AgentHome(config.home)
        self.instance = wire.new_instance_id(config.rng)
        #: Prometheus collectors of this agent (``TalosClient.metrics``).
        self.metrics = AgentMetrics(
            uses_registry=config.registry_url is not None,
            registry_urls=[public_url(url) for url in config.registry_urls],
            mirrors=config.audit.mirror_to,
        )
        self.clocks = ClockWatch(config.clock, self.metrics)
        self._closing = False
        self._lock: HomeLock | None = None
        self._own: OwnIdentity | None = None
        self._log: AuditLog | None = None
        self._state: AgentState | None = None
        self._tokens: TokenStore | None = None
        self._mirrors: MirrorStore | None = None
        self._transport: Transport | None = None
        self.discovery: Discovery | None = None
        self._parts: Parts | None = None
        self._outbox: OutboxControl | None = None
        self._anchoring: Any = None
        self._endpoint = ""
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise LocalProtocolError("the client is not open")
        return self._parts

    def closed(self) -> bool:
        """Whether :meth:`close` was called (the drivers stop when it was)."""
        return self._closing

    @property
    def dht_address(self) -> tuple[str, int] | None:
        """See :attr:`TalosClient.dht_address`."""
        dht = None if self.discovery is None else self.discovery.dht
        return None if dht is None else dht.address

    @property
    def registry_reachable(self) -> bool | None:
        """See :attr:`TalosClient.registry_reachable`."""
        return None if self.discovery is None else self.discovery.reachable

    async def open(self) -> Opened:
        """Open everything, start listening and announce.

        Raises:
            ConfigurationError, AgentAlreadyRunning, StorageError: as
                :meth:`talos.client.TalosClient.create` says (a
                ``StoreCorrupted`` refusal is logged first).
        """
        try:
            return await self._open()
        except StoreCorrupted as error:
            log_refusal(self.home, error)
            raise

    async def _open(self) -> Opened:
        config, clock, rng = self.config, self._clock, self._rng
        # One agent per home, in this process or any other (docs/design/client.md).
        self.home.ensure()
        self._lock = HomeLock.acquire(self.home.path)
        identity = self._load_identity()
        own = self._own = OwnIdentity(identity)
        self.home.check_public_keylog(identity.keylog)
        log = self._log = AuditLog.open(
            self.home.audit_path,
            clock=clock,
            signer=audit_signer(identity),
            extra_databases=AgentState.DATABASES + (ANCHOR_DATABASES if config.anchor else ()),
            **config.audit.open_arguments(),
        )
        # Cheap (O(log n)) start-up check; the full scan is `talos audit verify-chain`.
        trusted = [VerifyKey(event.signing_key) for event in identity.keylog.events]
        refuse_damaged_head(log.environment, trusted)
        state = self._state = AgentState(
            log,
            storage_key=derive_storage_key(identity.storage_secret),
            clock=clock,
            rng=rng,
            replay_window_ms=int(config.replay_window * 1000),
        )
        tokens = self._tokens = TokenStore.open(self.home.path / "capabilities")
        mirrors = self._mirrors = MirrorStore.open(
            self.home.path / MIRROR_DIR, quota_bytes=config.audit.mirror_quota_bytes
        )
        # A store shorter than the signed watermark records is refused (docs/design/lost-state.md).
        watermark = guard(self.home, identity, log, tokens, current=lambda: own.current)
        discovery = self.discovery = await self._open_discovery()
        read_stores_when_scraped(
            self.metrics, me=identity.agent_id, log=log, state=state, tokens=tokens
        )
        if config.metrics_port is not None:
            self.metrics.serve(config.metrics_port, config.listen[0])
        transport = self._transport = Transport(self._on_frame, clock=clock)
        self.metrics.read_transport_throttled(lambda: transport.throttled)
        parts = self._parts = assemble(
            Foundation(
                config=config,
                own=own,
                instance=self.instance,
                log=log,
                state=state,
                tokens=tokens,
                discovery=discovery,
                transport=transport,
                metrics=self.metrics,
                clocks=self.clocks,
                closed=self.closed,
                mirrors=mirrors,
            )
        )
        parts.capabilities.complete_revocation()
        requester, replies = self._request_reply(own, log, parts)
        rotator = Rotator(
            home=self.home,
            own=own,
            log=log,
            parts=parts,
            metrics=self.metrics,
            passphrase=config.passphrase,
            clock=clock,
            rng=rng,
            announce=self.announce_if_published,
            watermark=watermark,
        )
        if config.anchor is not None:
            self._anchoring = start_anchoring(
                config.anchor, log, clock=clock, rng=rng, metrics=self.metrics
            )
        host, port = await self._listen(transport)
        outbox = self._outbox = OutboxControl(
            state=state,
            log=log,
            deliverer=parts.deliverer,
            metrics=self.metrics,
            clock=clock,
            closed=self.closed,
        )
        parts.sender.on_expiring = outbox.expiring
        self.spawn(outbox.run_expiry())
        announced_host, announced_port = config.announce
        self._endpoint = _endpoint(announced_host or host, announced_port or port)
        if parts.presence is not None:  # a presence challenge must name one of these
            parts.presence.listening_at({self._endpoint, _endpoint(host, port)})
        await self._start_background(state, parts)
        return Opened(
            own=own,
            log=log,
            state=state,
            tokens=tokens,
            mirrors=mirrors,
            transport=transport,
            discovery=discovery,
            parts=parts,
            peers=parts.peers,
            rotator=rotator,
            outbox=outbox,
            endpoint=self._endpoint,
            requester=requester,
            replies=replies,
            grants=agent_grants(parts, tokens=tokens, log=log, clock=clock, rng=rng),
        )

    def _request_reply(
        self, own: OwnIdentity, log: AuditLog, parts: Parts
    ) -> tuple[Requester, Replies]:
        """Request/reply (docs/design/request-reply.md) on the receive path."""
        requests = OpenRequests(own.current.agent_id)
        replies = Replies(
            log=log, sender=parts.sender, clock=self._clock, kick=parts.deliverer.kick
        )
        parts.receiver.requests = parts.batch.requests = requests
        parts.receiver.replies = replies
        parts.inbox.attach = replies.attach
        requester = Requester(
            sender=parts.sender, requests=requests, clock=self._clock, rng=self._rng
        )
        return requester, replies

    async def _open_discovery(self) -> Discovery:
        config, clock = self.config, self._clock
        # offline_mode: no network at all, so no registry client and no DHT node; the
        # listener still accepts peers that connect (docs/design/client.md).
        registry = None
        if config.registry_urls and not config.offline:
            registry = RegistryClient(config.registry_urls, clock=clock, observe=self._contact)
        use_dht = "dht" in config.discovery and not config.offline
        dht = DhtNode(clock=clock, rng=self._rng) if use_dht else None
        discovery = Discovery(
            registry=registry, dht=dht, clock=clock, metrics=self.metrics, clocks=self.clocks
        )
        if dht is not None:
            try:
                await dht.start(config.dht_port, config.listen[0], list(config.dht_bootstrap))
            except DiscoveryError as exc:  # binding its UDP port is all that raises
                raise ConfigurationError(f"dht_port {config.dht_port}: {exc}") from None
        return discovery

    async def _listen(self, transport: Transport) -> tuple[str, int]:
        config = self.config
        try:
            return await transport.listen(*config.listen)
        except PeerUnreachable as exc:  # the address cannot be bound: our option, not a peer
            raise ConfigurationError(
                f"listen={config.listen[0]}:{config.listen[1]} cannot be used: {exc} "
                "(another agent or program on that port? listen on port 0 for any free one)"
            ) from exc

    async def _start_background(self, state: AgentState, parts: Parts) -> None:
        discovery = self.discovery
        assert discovery is not None  # noqa: S101 -- opened before
        if self._publishes():
            await self.announce()
            self.spawn(discovery.reannounce(self.closed, self.announce))
        for peer in state.peers_with_pending():
            parts.deliverer.kick(peer)
        if parts.witnessing.witnesses and not self.config.offline:
            self.spawn(parts.witnessing.run(self.closed))
        if parts.mirroring is not None:
            parts.mirroring.start()
        if parts.auditor is not None:
            self.spawn(parts.auditor.run(self.closed))

    def _on_frame(self, link: Link, frame: bytes) -> Awaitable[None]:
        # The receiver's coroutine itself: no extra await layer per frame.
        return self.parts.receiver.on_frame(link, frame)

    def _contact(self, url: str, answered: bool) -> None:
        """The registry client contacted ``url`` (credentials stripped): the per-URL gauge."""
        self.metrics.set_registry_reachable(answered, url)

    def _load_identity(self) -> Identity:
        config = self.config
        try:
            return self.home.load_identity(passphrase=config.passphrase)
        except IdentityNotFound:
            identity = Identity.create(config.name, rng=self._rng, clock=self._clock)
            self.home.save_identity(identity, rng=self._rng, passphrase=config.passphrase)
            return identity

    # -- announcing -----------------------------------------------------------------

    def peer_record(self, *, lifetime: float = RECORD_LIFETIME) -> PeerRecord:
        """A freshly signed record of where this instance listens."""
        assert self._own is not None  # noqa: S101 -- only asked of an open agent
        current = self._own.current
        return PeerRecord.create(
            current.signing_key,
            agent_id=current.agent_id,
            key_sequence=current.sequence,
            instance_id=self.instance,
            endpoint=self._endpoint,
            sequence=time_ms(self._clock),
            now=self._clock.time(),
            lifetime=lifetime,
        )

    def _publishes(self) -> bool:
        discovery = self.discovery
        if self.config.offline or discovery is None:
            return False
        return discovery.registry is not None or discovery.dht is not None

    async def announce(self) -> None:
        """Publish to the registry and the DHT; a source that is down is not fatal."""
        discovery, own, parts = self.discovery, self._own, self.parts
        assert discovery is not None  # noqa: S101 -- open
        assert own is not None  # noqa: S101 -- open
        if discovery.registry is not None:
            await discovery.announce(
                own.current,
                lambda: PrekeyUpload.from_store(
                    parts.sessions.prekeys,
                    own.current.signing_key,
                    key_sequence=own.current.sequence,
                    sequence=time_ms(self._clock),
                ),
                self.peer_record,
                parts.capabilities.publish,
            )
        if discovery.dht is not None:
            await discovery.announce_dht(
                self.peer_record().to_bytes(),
                own.current.keylog.to_bytes(),
                parts.sessions.prekeys.bundle(None).to_bytes(),
            )

    async def announce_if_published(self) -> None:
        if self._publishes():
            await self.announce()

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- closing --------------------------------------------------------------------

    async def close(self) -> None:
        """Shut everything down, then release the home's lock; closing twice does nothing."""
        if self._closing:
            return
        self._closing = True
        try:
            await self._shut_down()
        finally:
            if self._lock is not None:
                self._lock.release()  # last: nothing of this agent is open any more

    async def _shut_down(self) -> None:
        parts = self._parts
        if parts is not None and parts.batch.acknowledging:
            # Committed receives are ACKed before the links close (else the
            # senders retry, and are answered DUPLICATE next time). A grace in
            # real seconds, not on the agent's clock: closing must not hang on a
            # fake clock nobody advances.
            await asyncio.wait(set(parts.batch.acknowledging), timeout=1.0)
        if parts is not None:
            if parts.mirroring is not None:
                await parts.mirroring.stop()
            await parts.acks.stop()
            await parts.deliverer.stop()
            await parts.keylogs.stop()
            await parts.sessions.stop()
            await parts.peers.stop()
        await self._cancel_tasks(parts)
        # Commits in worker threads (acknowledge, cancel, expiry) finish before the store closes.
        if parts is not None:
            await parts.inbox.stop()
        if self._outbox is not None:
            await self._outbox.stop()
        if parts is not None:
            # Received but not committed: not acknowledged either, so their senders retry.
            parts.batch.discard()
            parts.sender.flush()
            parts.acks.flush()  # ACKs already in: removed, and their senders released
            parts.deliverer.release_waiters()
            parts.inbox.ready.set()
        await self._close_stores()

    async def _cancel_tasks(self, parts: Parts | None) -> None:
        tasks = [*self._background, *(parts.batch.acknowledging if parts else ())]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _close_stores(self) -> None:
        if self._transport is not None:
            await self._transport.close()
        parts = self._parts
        if parts is not None and parts.auditor is not None:
            parts.auditor.flush_suppressed()  # nothing arrives any more: the last counts
        if self.discovery is not None:
            await self.discovery.close()
        if self._anchoring is not None:
            # First: its step in progress uses the log, and its pruning asks the
            # mirror store how far the mirrors are.
            await self._anchoring.stop()
        self.metrics.close()  # no scrape reads the stores (client.scraped) as they close
        if self._tokens is not None:
            self._tokens.close()
        if self._mirrors is not None:
            self._mirrors.close()
        if self._state is not None:
            with contextlib.suppress(TalosError):  # a cache: fetched again if lost
                self._state.flush()  # first contacts waiting for a commit
        if self._log is not None:
            self._log.close()


def _endpoint(host: str, port: int) -> str:
    """``ws://host:port`` (an IPv6 host in brackets)."""
    return f"ws://{f'[{host}]' if ':' in host else host}:{port}"
