"""TalosClient: one agent — identity, sessions, durable delivery, audit.

This is the composition root and the public API. It opens the concrete
parts (the agent home, the LMDB-backed audit log and agent state, the
WebSocket transport, the registry client and DHT node) and hands each
driver what it needs through its constructor:

* :class:`~talos.client.sending.Sender`: ``send()`` and the outbox commit;
* :class:`~talos.client.delivery.Deliverer`: per-peer delivery, ACKs, ERRORs;
* :class:`~talos.client.receiving.Receiver` and ``ReceiveBatch``: every
  incoming frame, and the group commit of received messages;
* :class:`~talos.client.inbox.InboxReader`: ``receive()`` and ``acknowledge()``;
* :class:`~talos.client.sessions.Sessions`: X3DH, session records, prekeys;
* :class:`~talos.client.revocations.Capabilities`: tokens and revocation lists;
* :class:`~talos.client.discovery.Discovery`: announcements and bundles.

The decisions those drivers act on are pure and live in :mod:`talos.core`
(:mod:`~talos.core.delivery`, :mod:`~talos.core.sessions`,
:mod:`~talos.core.incoming`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from talos.audit import AuditLog
from talos.audit.anchoring.settings import DATABASES as ANCHOR_DATABASES
from talos.audit.anchoring.settings import start_anchoring
from talos.audit.head_check import refuse_damaged_head
from talos.audit.mirror_store import MIRROR_DIR, MirrorStore
from talos.client.arguments import check_message_id, check_timeout, check_wait
from talos.client.clocks import ClockWatch
from talos.client.config import ClientConfig
from talos.client.discovery import RECORD_LIFETIME, Discovery
from talos.client.outbox import OutboxControl, QueuedEntry
from talos.client.outcomes import MessageOutcome
from talos.client.own_keys import OwnIdentity, Rotation, audit_signer
from talos.client.rotation import Rotator
from talos.client.scraped import read_stores_when_scraped
from talos.client.sending import SendResult
from talos.client.status import known_peer_rows, status_report
from talos.client.wiring import Parts, assemble
from talos.core import wire
from talos.core.capability import Capability
from talos.core.clock import Clock, time_ms
from talos.core.crypto import VerifyKey
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.message import Message
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import DEFAULT_GRACE
from talos.core.rng import Rng
from talos.core.x3dh import PrekeyBundle
from talos.discovery.dht import DhtNode
from talos.discovery.failover import public_url
from talos.discovery.registry_client import RegistryClient
from talos.errors import (
    ConfigurationError,
    DiscoveryError,
    IdentityNotFound,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    PeerUnreachable,
    StoreCorrupted,
)
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.storage.agent_state import AgentState, derive_storage_key
from talos.storage.home import AgentHome
from talos.storage.lock import HomeLock
from talos.storage.lost_state import guard, log_refusal
from talos.storage.tokens import TokenStore
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG
from talos.transport import Link, Transport

__all__ = ["MessageOutcome", "QueuedEntry", "SendResult", "TalosClient"]


class _Creating:
    """``TalosClient.create(...)``: awaitable, or an async context manager that closes."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        self._client: TalosClient | None = None

    def __await__(self) -> Generator[Any, None, TalosClient]:
        return TalosClient._start(self._options).__await__()

    async def __aenter__(self) -> TalosClient:
        self._client = await TalosClient._start(self._options)
        return self._client

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


class TalosClient:
    """One agent. Create with ``await TalosClient.create(name, home=...)``."""

    @staticmethod
    def create(
        name: str,
        *,
        home: str | Path | None = None,
        registry_url: str | Sequence[str] | None = None,
        listen: str = "127.0.0.1:0",
        announce: str | None = None,
        discovery: tuple[str, ...] | list[str] = ("registry",),
        dht_bootstrap: list[tuple[str, int]] | None = None,
        dht_port: int = 0,
        offline_mode: bool = False,
        queue_limit: int = 1000,
        reconnect_interval: float = 30.0,
        replay_window: float = 3600.0,
        revocation_mode: str = "strict",
        revocation_max_age: float = 300.0,
        audit_config: dict[str, Any] | None = None,
        metrics_port: int | None = None,
        accept_policy: str = "capability",
        passphrase: bytes | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: Rng = SYSTEM_RNG,
        anchor: dict[str, Any] | None = None,
        revocation_grace: float = DEFAULT_GRACE,
    ) -> _Creating:
        """Open (or create) the agent in ``home`` and start it.

        ``registry_url`` is one URL, or a list of replicas of one registry
        (sharing one database), in order of preference: requests fail over
        to the next when one does not answer (``talos.discovery.failover``).
        ``discovery`` orders the sources asked for unknown peers
        (``"registry"``, ``"dht"``); the local cache of verified records is
        always asked first. With ``"dht"`` the agent runs a DHT node on UDP
        ``dht_port`` (0: any) joined through ``dht_bootstrap``.
        ``announce`` (``HOST`` or ``HOST:PORT``) is the address peers are
        told to connect to, when it differs from ``listen`` (NAT, a proxy,
        or ``listen`` on every interface, which needs it); its port
        defaults to the one listened on.
        With ``metrics_port`` (0: any) Prometheus metrics are served at
        ``/metrics``; :attr:`metrics` is always there. Every timer and
        deadline runs on ``clock``; every id and key comes from ``rng``.
        With ``anchor`` (``rpc``, ``contract``, ``key_file``, optional
        ``interval``, ``confirmations``, ``poll``, ``passphrase``) the audit
        log's checkpoints are anchored on that chain
        (:mod:`talos.audit.anchoring.settings`, docs/design/anchoring.md).
        ``revocation_mode`` says what a revocation list older than
        ``revocation_max_age`` seconds does to the capabilities it covers:
        ``strict`` refuses them, ``offline`` accepts them, ``permissive``
        accepts them for ``revocation_grace`` more seconds (default 3600);
        each acceptance on a stale list is logged
        (``revocation_list_stale_accepted``) and counted
        (``talos_revocation_stale_accepted_total``).

        The agent holds the home's lock (``<home>/control.lock``) until
        :meth:`close` or the process ends: one agent per home.

        Raises:
            ConfigurationError: an invalid option.
            AgentAlreadyRunning: another agent (``talos run``, or a client in
                this or another process) holds this home.
            StorageError: the home, audit log or state cannot be opened;
                ``StoreCorrupted`` (naming the file) if the key log or the
                audit log's head fails the start-up check, ``StateLost`` if a
                store holds less than the agent's watermark (docs/operations.md).
        """
        return _Creating(dict(locals()))

    # -- start and stop -----------------------------------------------------------------

    @classmethod
    async def _start(cls, options: dict[str, Any]) -> TalosClient:
        options = dict(options)
        client = cls(ClientConfig.from_options(options.pop("name"), **options))
        try:
            await client._open()
        except BaseException as error:
            if isinstance(error, StoreCorrupted):
                log_refusal(client._home, error)
            await client.close()
            raise
        return client

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._home = AgentHome(config.home)
        self._clock, self._rng = config.clock, config.rng
        self._instance = wire.new_instance_id(config.rng)
        self._closed = False
        self._log: AuditLog | None = None
        self._tokens: TokenStore | None = None
        self._mirrors: MirrorStore | None = None
        self._transport: Transport | None = None
        self._discovery: Discovery | None = None
        self._endpoint = ""
        self._background: set[asyncio.Task[Any]] = set()
        #: Prometheus collectors of this agent (served on ``metrics_port`` if given).
        self.metrics = AgentMetrics(
            uses_registry=config.registry_url is not None,
            registry_urls=[public_url(url) for url in config.registry_urls],
            mirrors=config.audit.mirror_to,
        )
        self._clocks = ClockWatch(config.clock, self.metrics)
        # Filled in by _open().
        self._own: OwnIdentity
        self._state: AgentState
        self._peers: PeerDirectory
        self._parts: Parts | None = None
        self._rotator: Rotator
        self._anchoring: Any = None
        self._lock: HomeLock | None = None
        self._outbox: OutboxControl | None = None

    async def _open(self) -> None:
        config, clock, rng = self._config, self._clock, self._rng
        # One agent per home, in this process or any other (docs/design/client.md).
        self._home.ensure()
        self._lock = HomeLock.acquire(self._home.path)
        identity = self._load_identity()
        self._own = OwnIdentity(identity)
        self._home.check_public_keylog(identity.keylog)
        self._log = AuditLog.open(
            self._home.audit_path,
            clock=clock,
            signer=audit_signer(identity),
            extra_databases=AgentState.DATABASES + (ANCHOR_DATABASES if config.anchor else ()),
            **config.audit.open_arguments(),
        )
        # Cheap (O(log n)) start-up check; the full scan is `talos audit verify-chain`.
        trusted = [VerifyKey(event.signing_key) for event in identity.keylog.events]
        refuse_damaged_head(self._log.environment, trusted)
        self._state = AgentState(
            self._log,
            storage_key=derive_storage_key(identity.storage_secret),
            clock=clock,
            rng=rng,
            replay_window_ms=int(config.replay_window * 1000),
        )
        self._tokens = TokenStore.open(self._home.path / "capabilities")
        self._mirrors = MirrorStore.open(
            self._home.path / MIRROR_DIR, quota_bytes=config.audit.mirror_quota_bytes
        )
        # A store shorter than the signed watermark records is refused (docs/design/lost-state.md).
        watermark = guard(
            self._home, identity, self._log, self._tokens, current=lambda: self._own.current
        )
        # offline_mode: no network at all, so no registry client and no DHT node; the
        # listener still accepts peers that connect (docs/design/client.md).
        registry = None
        if config.registry_urls and not config.offline:
            registry = RegistryClient(
                config.registry_urls, clock=clock, observe=self._registry_contact
            )
        use_dht = "dht" in config.discovery and not config.offline
        dht = DhtNode(clock=clock, rng=rng) if use_dht else None
        discovery = self._discovery = Discovery(
            registry=registry, dht=dht, clock=clock, metrics=self.metrics, clocks=self._clocks
        )
        if dht is not None:
            try:
                await dht.start(config.dht_port, config.listen[0], list(config.dht_bootstrap))
            except DiscoveryError as exc:  # binding its UDP port is all that raises
                raise ConfigurationError(f"dht_port {config.dht_port}: {exc}") from None
        log, state, tokens = self._log, self._state, self._tokens
        read_stores_when_scraped(
            self.metrics, me=identity.agent_id, log=log, state=state, tokens=tokens
        )
        if config.metrics_port is not None:
            self.metrics.serve(config.metrics_port, config.listen[0])
        self._transport = Transport(self._on_frame, clock=clock)
        self._parts = assemble(
            config=config,
            own=self._own,
            instance=self._instance,
            log=self._log,
            state=self._state,
            tokens=self._tokens,
            discovery=discovery,
            transport=self._transport,
            metrics=self.metrics,
            clocks=self._clocks,
            closed=self._is_closed,
            mirrors=self._mirrors,
        )
        self._peers = self._parts.peers
        self._parts.capabilities.complete_revocation()
        self._rotator = Rotator(
            home=self._home,
            own=self._own,
            log=self._log,
            parts=self._parts,
            metrics=self.metrics,
            passphrase=config.passphrase,
            clock=clock,
            rng=rng,
            announce=self._announce_if_published,
            watermark=watermark,
        )
        if config.anchor is not None:
            self._anchoring = start_anchoring(
                config.anchor, self._log, clock=clock, rng=rng, metrics=self.metrics
            )
        try:
            host, port = await self._transport.listen(*config.listen)
        except PeerUnreachable as exc:  # the address cannot be bound: our option, not a peer
            raise ConfigurationError(
                f"listen={config.listen[0]}:{config.listen[1]} cannot be used: {exc} "
                "(another agent or program on that port? listen on port 0 for any free one)"
            ) from exc
        self._outbox = OutboxControl(
            state=self._state,
            log=self._log,
            deliverer=self._drivers.deliverer,
            metrics=self.metrics,
            clock=clock,
            closed=self._is_closed,
        )
        self._drivers.sender.on_expiring = self._outbox.expiring
        self._spawn(self._outbox.run_expiry())
        announced_host, announced_port = config.announce
        host = announced_host or host
        self._endpoint = f"ws://{f'[{host}]' if ':' in host else host}:{announced_port or port}"
        if not config.offline and (registry is not None or dht is not None):
            await self._announce()
            self._spawn(discovery.reannounce(self._is_closed, self._announce))
        for peer in self._state.peers_with_pending():
            self._drivers.deliverer.kick(peer)
        if self._parts.witnessing.witnesses and not config.offline:
            self._spawn(self._parts.witnessing.run(self._is_closed))
        if self._parts.mirroring is not None:
            self._parts.mirroring.start()
        if self._parts.auditor is not None:
            self._spawn(self._parts.auditor.run(self._is_closed))

    @property
    def _drivers(self) -> Parts:
        if self._parts is None:
            raise LocalProtocolError("the client is not open")
        return self._parts

    def _on_frame(self, link: Link, frame: bytes) -> Awaitable[None]:
        # The receiver's coroutine itself: no extra await layer per frame.
        return self._drivers.receiver.on_frame(link, frame)

    def _is_closed(self) -> bool:
        return self._closed

    def _load_identity(self) -> Identity:
        config = self._config
        try:
            return self._home.load_identity(passphrase=config.passphrase)
        except IdentityNotFound:
            identity = Identity.create(config.name, rng=self._rng, clock=self._clock)
            self._home.save_identity(identity, rng=self._rng, passphrase=config.passphrase)
            return identity

    async def _announce(self) -> None:
        """Publish to the registry and the DHT; a source that is down is not fatal."""
        discovery = self._discovery
        assert discovery is not None  # noqa: S101 -- open while the client is
        if discovery.registry is not None:
            await discovery.announce(
                self._own.current,
                lambda: PrekeyUpload.from_store(
                    self._drivers.sessions.prekeys,
                    self._own.current.signing_key,
                    key_sequence=self._own.current.sequence,
                    sequence=time_ms(self._clock),
                ),
                self.peer_record,
                self._drivers.capabilities.publish,
            )
        if discovery.dht is not None:
            await discovery.announce_dht(
                self.peer_record().to_bytes(),
                self._own.current.keylog.to_bytes(),
                self.get_prekey_bundle().to_bytes(),
            )

    async def _announce_if_published(self) -> None:
        discovery = self._discovery
        if self._config.offline or discovery is None:
            return
        if discovery.registry is not None or discovery.dht is not None:
            await self._announce()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def dht_address(self) -> tuple[str, int] | None:
        """UDP address of this agent's DHT node, if it runs one."""
        dht = None if self._discovery is None else self._discovery.dht
        return None if dht is None else dht.address

    def _registry_contact(self, url: str, answered: bool) -> None:
        """The registry client contacted ``url`` (credentials stripped): the per-URL gauge."""
        self.metrics.set_registry_reachable(answered, url)

    @property
    def registry_reachable(self) -> bool | None:
        """Whether the registry answered last time it was asked (``None``: not yet)."""
        return None if self._discovery is None else self._discovery.reachable

    @property
    def registry_offset(self) -> float | None:
        """Offset of our clock from the registry's (seconds, positive: we are ahead)."""
        return self._clocks.registry_offset

    async def close(self) -> None:
        """Stop delivering, close links and stores. Queued messages stay queued."""
        if self._closed:
            return
        self._closed = True
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
        tasks = [*self._background, *(parts.batch.acknowledging if parts else ())]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
        if self._transport is not None:
            await self._transport.close()
        if parts is not None and parts.auditor is not None:
            parts.auditor.flush_suppressed()  # nothing arrives any more: the last counts
        if self._discovery is not None:
            await self._discovery.close()
        if self._anchoring is not None:
            # First: its step in progress uses the log, and its pruning asks the
            # mirror store how far the mirrors are.
            await self._anchoring.stop()
        self.metrics.close()  # no scrape reads the stores (client.scraped) as they close
        if self._tokens is not None:
            self._tokens.close()
        if self._mirrors is not None:
            self._mirrors.close()
        if self._log is not None:
            self._log.close()
        self.metrics.close()

    async def __aenter__(self) -> TalosClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- messages ---------------------------------------------------------------------------

    async def send(
        self,
        peer_id: str,
        data: Any,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 -- the seed's documented send() signature
        retry_count: int = 3,
        on_failure: Literal["queue", "raise"] = "queue",
        capability: str | Capability | None = None,
        wait: bool = True,
        expires_in: float | None = None,
    ) -> SendResult:
        """Send ``data`` (bytes, str or JSON-able) to ``peer_id``; durable before it returns.

        Every argument is checked before anything is queued: a bad one raises
        :class:`~talos.errors.InvalidArgument` (a ``ValueError``) and nothing
        is queued. A peer that every discovery source says does not exist
        raises :class:`~talos.errors.PeerUnknown` (nothing queued); one that
        cannot be looked up now (registry down) is queued and found later.

        With ``wait=True`` (the default) ``timeout`` bounds the whole call;
        within it up to ``retry_count`` retries follow the backoff schedule.
        Then ``on_failure="queue"`` leaves the message queued for background
        delivery (status ``"queued"``), ``"raise"`` removes it and raises a
        :class:`~talos.errors.DeliveryTimeout` saying what it waited for, how
        long it really waited and the last failure.

        With ``wait=False`` it returns as soon as the message is durable in
        the outbox (status ``"queued"``, ``timeout``, ``retry_count`` and
        ``on_failure`` do not apply): background delivery takes it from
        there, and :meth:`outcome` tells what became of it.

        With ``expires_in`` (seconds) a message not acknowledged by then is
        dropped from the outbox (audited ``MESSAGE_EXPIRED``, logged
        ``message_expired``; outcome ``"expired"``; a waiting call raises
        :class:`~talos.errors.MessageExpired`).

        Raises:
            InvalidArgument: a malformed ``peer_id`` or a bad ``timeout``,
                ``retry_count``, ``on_failure``, ``wait`` or ``expires_in``.
            PeerUnknown: discovery answered that no such agent exists.
            CapabilityDenied: the capability to attach is invalid (nothing sent or queued).
            QueueFull: ``queue_limit`` messages are queued already (nothing queued).
            PeerRejected: the peer refused the message, with its signed reason.
            DeliveryTimeout: not delivered in time with ``on_failure="raise"``.
            MessageExpired, MessageCancelled: it expired, or :meth:`cancel` took it
                out, while the call waited.
            LocalProtocolError: ``data`` cannot be encoded or is too large.
        """
        return await self._drivers.sender.send(
            peer_id,
            data,
            timeout=timeout,
            retry_count=retry_count,
            on_failure=on_failure,
            capability=capability,
            wait=wait,
            expires_in=expires_in,
        )

    async def outcome(
        self,
        message_id: str | bytes,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- like receive(timeout=...)
    ) -> MessageOutcome:
        """What became of a message this agent sent: waits until it has a final state
        (``"delivered"``, ``"failed"``, ``"expired"``, ``"cancelled"``), or until
        ``timeout`` seconds pass (then its state is ``"queued"``).

        ``message_id`` is :attr:`SendResult.message_id` (hex text) or its bytes.
        The last 10,000 outcomes are kept in memory; after a restart a message
        still in the persisted outbox is waited on as usual, and one that left
        it is looked up among the newest 1,000 audit entries of each final kind
        (``MESSAGE_DELIVERED``, ``PEER_REJECTED``, ``DELIVERY_FAILED``,
        ``MESSAGE_EXPIRED``, ``MESSAGE_CANCELLED``).

        Raises:
            InvalidArgument: not a message id, or a bad ``timeout``.
            MessageNotFound: neither queued nor recorded (not sent by this agent,
                or its outcome is older than the lookback).
        """
        seconds = None if timeout is None else check_timeout(timeout)
        return await self._outboxes.outcome(check_message_id(message_id), seconds)

    def outbox(self) -> dict[str, list[QueuedEntry]]:
        """The queued messages by peer, oldest first: id, attempts, age, expiry, size.

        Nothing is decrypted; the listing is one read of the outbox.
        """
        return self._outboxes.listing()

    async def cancel(self, message_id: str | bytes) -> MessageOutcome:
        """Take a queued message out of the outbox; returns its outcome ``"cancelled"``.

        The removal and its ``MESSAGE_CANCELLED`` audit entry are one commit
        (made off the event loop); a ``send()`` waiting for it raises
        :class:`~talos.errors.MessageCancelled`; :meth:`outcome` says
        ``"cancelled"``. Cancelling stops the sending, it cannot unsend: a
        message already transmitted (``attempts`` > 0) may have reached the
        peer, and the outcome's ``reason`` says so. Cancelling a cancelled
        message again returns the same outcome.

        Raises:
            InvalidArgument: not a message id.
            CannotCancel: it was delivered, failed or expired already (its
                ``outcome`` attribute says which).
            MessageNotFound: no such message is queued or recorded.
        """
        return await self._outboxes.cancel(check_message_id(message_id))

    @property
    def _outboxes(self) -> OutboxControl:
        if self._outbox is None:
            raise LocalProtocolError("the client is not open")
        return self._outbox

    async def receive(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 -- the documented receive() signature
        *,
        auto_ack: bool = True,
    ) -> Message | None:
        """The next received message, or ``None`` after ``timeout`` seconds (on the
        agent's clock).

        With ``auto_ack`` (the default) the message leaves the durable inbox
        before it is returned: at most once to the application, and a crash
        right after this call loses it for the application. (A call already
        waiting is handed the next message by the commit that receives it; if
        that call is cancelled at that moment, the message is put back at the
        end of the inbox.) With
        ``auto_ack=False`` it stays in the inbox until :meth:`acknowledge`:
        at least once; after a crash it is returned again, and its
        ``message_id`` lets the application drop what it already processed.
        Each such call returns the next message after the previous one, so
        an application can process several and acknowledge them together
        (one commit); a restart starts again at the oldest unacknowledged.

        Raises:
            InvalidArgument: a ``timeout`` that is negative, NaN or infinite.
        """
        if timeout is not None:
            timeout = check_wait(timeout)
        return await self._drivers.inbox.receive(timeout, auto_ack=auto_ack)

    async def acknowledge(self, *messages: Message) -> None:
        """Remove messages received with ``auto_ack=False`` from the durable inbox
        (all in one commit, made in a worker thread: the event loop keeps running
        while it syncs to disk).

        Await it: once it returns the messages are gone for good (a crash
        after it will not return them again). It used to be a plain method
        that committed on the event loop; called without ``await`` it now
        does nothing but warn (``coroutine ... was never awaited``).

        Raises:
            LocalProtocolError: a message was not received with ``auto_ack=False``
                (nothing acknowledged).
        """
        await self._drivers.inbox.acknowledge(*messages)

    async def messages(self, *, auto_ack: bool = True) -> AsyncIterator[Message]:
        """Every received message, as it arrives (until the client closes).

        ``auto_ack=True`` (the default): each message leaves the durable
        inbox as it is handed out, as by ``receive()``: at most once; a crash
        while the application handles it loses it. ``auto_ack=False``: each
        stays in the inbox until the application awaits :meth:`acknowledge`
        for it: at least once; after a crash unacknowledged messages come
        again (drop repeats by ``message_id``)::

            async for message in client.messages(auto_ack=False):
                handle(message)
                await client.acknowledge(message)
        """
        async for message in self._drivers.inbox.messages(auto_ack=auto_ack):
            yield message

    # -- identity and sessions ------------------------------------------------------

    @property
    def agent_id(self) -> str:
        return self._own.current.agent_id

    @property
    def endpoint(self) -> str:
        """``ws://host:port`` this agent listens on."""
        return self._endpoint

    def peer_record(self, *, lifetime: float = RECORD_LIFETIME) -> PeerRecord:
        """A freshly signed record of where this instance listens."""
        return PeerRecord.create(
            self._own.current.signing_key,
            agent_id=self.agent_id,
            key_sequence=self._own.current.sequence,
            instance_id=self._instance,
            endpoint=self._endpoint,
            sequence=time_ms(self._clock),
            now=self._clock.time(),
            lifetime=lifetime,
        )

    def contact_card(self) -> bytes:
        """Key log and peer record in one blob, for introductions without a registry."""
        return canonical_dumps(
            {
                "v": 1,
                "log": self._own.current.keylog.to_bytes(),
                "rec": self.peer_record().to_bytes(),
            }
        )

    def add_contact(self, card: bytes) -> str:
        """Learn a peer from its :meth:`contact_card`; returns its agent id.

        Raises:
            MalformedFrame, UnsupportedVersion: not a contact card.
            KeyLogInvalid: its key log is invalid or forks what we know.
            SignatureInvalid, StaleMessage: its record does not verify now.
        """
        raw = strict_versioned_map(
            card,
            max_size=1 << 20,
            fields=frozenset({"v", "log", "rec"}),
            version=1,
            what="contact card",
        )
        if type(raw["log"]) is not bytes or type(raw["rec"]) is not bytes:
            raise MalformedFrame("contact card fields must be bytes")
        log = self._peers.learn_log(KeyLog.from_bytes(raw["log"]))
        record = PeerRecord.from_bytes(raw["rec"])
        if record.agent_id != log.agent_id:
            raise MalformedFrame("contact card record names another agent")
        self._peers.learn_record(record)
        return log.agent_id

    def get_prekey_bundle(self) -> PrekeyBundle:
        """A bundle for :meth:`establish_session` out of band (signed prekey, no one-time key)."""
        return self._drivers.sessions.prekeys.bundle(None)

    async def establish_session(self, peer_id: str, bundle: PrekeyBundle | None = None) -> None:
        """Run X3DH with ``peer_id``; without a ``bundle``, one comes from the registry, or
        from the peer's DHT value when the registry cannot be reached.

        With ``offline_mode`` nothing is fetched: a ``bundle`` is required.

        Raises:
            PeerNotFound: the peer's key log (or a bundle) cannot be found, or no
                ``bundle`` was given in offline mode.
            SignatureInvalid: the bundle is not vouched for by the peer's key log.
            KeyAgreementFailed: a bundle key is unusable.
        """
        if bundle is None and self._config.offline:
            raise PeerNotFound(
                f"offline_mode: no prekey bundle for {peer_id} is fetched from the network; "
                "pass the peer's get_prekey_bundle() (and add_contact its contact_card())"
            )
        await self._drivers.sessions.establish(peer_id, bundle)
        self._drivers.deliverer.kick(peer_id)

    async def reset_session(self, peer_id: str) -> None:
        """Forget the session with ``peer_id``; the next message establishes a new one."""
        self._drivers.sessions.reset(peer_id, "requested")

    async def rotate_keys(
        self, *, reason: str | None = None, emergency: bool = False, revoke_old: bool = False
    ) -> dict[str, Any]:
        """Rotate this agent's signing key to the pre-rotated one, without a restart.

        The key file is written first (nothing is signed with the new key
        before it is on disk); then ``KEY_ROTATED`` is audited, every session
        is discarded (queued and in-flight messages are delivered under new
        X3DH sessions, none lost, none twice), new prekeys are made, and the
        new key log, prekeys, record and revocation list go to the registry,
        the DHT and every live link. ``emergency`` marks a rotation after a
        key compromise; with ``revoke_old`` (emergency only) every earlier key
        is revoked: peers refuse anything signed by it, and every capability
        issued under it (docs/operations.md, "Key compromise").

        Returns ``{"agent_id", "sequence", "fingerprint"}`` of the new key.

        Raises:
            ConfigurationError: a reason that is not 1-256 printable characters,
                ``revoke_old`` without ``emergency``, or ``emergency`` without a reason.
            StorageError: the key file could not be written (nothing changed).
        """
        rotated = await self._rotator.rotate(
            Rotation(reason=reason, emergency=emergency, revoke_old=revoke_old)
        )
        return {
            "agent_id": rotated.agent_id,
            "sequence": rotated.sequence,
            "fingerprint": rotated.fingerprint,
        }

    # -- status ---------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Messages waiting in the outbox."""
        return self._state.outbox_count()

    def status(self) -> dict[str, Any]:
        """What ``talos status`` shows: identity, endpoint, queue, sessions, registry, clocks.

        ``clock_offset_s`` is our offset from the registry's clock (positive:
        we are ahead); ``peer_clock`` holds each peer's offset from ours
        (positive: the peer is ahead), estimated from signed ACKs.
        """
        dht = self.dht_address
        discovery_registry = None if self._discovery is None else self._discovery.registry
        return status_report(
            self._state,
            agent_id=self.agent_id,
            instance=self._instance,
            endpoint=self._endpoint,
            offline=self._config.offline,
            links=self._drivers.deliverer.links,
            registry=None if discovery_registry is None else discovery_registry.current_url,
            registry_reachable=self.registry_reachable,
            dht=None if dht is None else "{}:{}".format(*dht),
            clocks=self._clocks,
            now=self._clock.time(),
            duplicates=self._drivers.receiver.instances.duplicates,
        )

    def known_peers(self) -> list[dict[str, Any]]:
        """Peers with a cached, verified record: what ``talos peers`` lists."""
        return known_peer_rows(self._state, self._drivers.deliverer.links)
