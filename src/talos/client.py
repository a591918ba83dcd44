"""TalosClient: one agent — identity, sessions, durable delivery, audit.

This is the composition root: it picks the concrete parts (the agent home,
the LMDB-backed audit log and agent state, the WebSocket transport, the
registry client) and runs the two flows of ARCHITECTURE §5.
The flows live in mixins :class:`TalosClient` inherits: the send path in
:mod:`talos._sending`, the receive path in :mod:`talos._receiving`, the
revocation list exchange in :mod:`talos._revocation_exchange`, all over the
shared state declared in :mod:`talos._client_base`. This module keeps the
public API, construction, lifecycle, sessions and status.

Send: authorize (local capability check) → persist to the outbox together
with its audit entry → encrypt (the new ratchet state is persisted before
the ciphertext leaves) → sign → transmit → wait for the recipient's signed
ACK → remove from the outbox (with its audit entry). Failures retry with
exponential backoff and jitter capped at ``reconnect_interval``; what is not
delivered stays queued and is delivered, in order, when the peer returns.

Receive: decode → verify the signature with the sender's verified key log →
recipient, replay and clock-skew checks → capability check → decrypt →
one transaction {ratchet state, replay entry, audit entry, inbox message}
→ signed ACK → wake the application. Anything rejected changes no state and
is answered with a signed ERROR naming the reason (except forgeries, which
are only audited).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import weakref
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from talos._client_base import _SESSION_FIELDS as _SESSION_FIELDS
from talos._client_base import InFlight, _load_session
from talos._client_base import _session_record as _session_record
from talos._receiving import _REFUSAL_EVENTS as _REFUSAL_EVENTS
from talos._receiving import _SECURITY_REFUSALS as _SECURITY_REFUSALS
from talos._receiving import ReceivingMixin
from talos._receiving import _message as _message
from talos._revocation_exchange import RevocationExchangeMixin
from talos._sending import ACK_TIMEOUT as ACK_TIMEOUT
from talos._sending import RESET_INTERVAL as RESET_INTERVAL
from talos._sending import SEND_WINDOW as SEND_WINDOW
from talos._sending import SendingMixin
from talos._sending import SendResult as SendResult
from talos._sending import _retrieve as _retrieve
from talos.audit import AuditKind, AuditLog, LogSigner
from talos.audit.config import AuditConfig
from talos.core import wire
from talos.core.backoff import Backoff
from talos.core.clock import Clock, time_ms
from talos.core.clocksync import WARN_OFFSET, InstanceTracker, PeerClocks, offset_from
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.identity import Identity
from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.ratchet import Session
from talos.core.ratelimit import RateLimiter
from talos.core.revocation import RevocationList, RevocationMode, RevocationPolicy, RevocationState
from talos.core.rng import Rng
from talos.core.x3dh import PrekeyBundle, PrekeyStore, initiate
from talos.discovery.dht import DhtNode
from talos.discovery.registry_client import RegistryClient
from talos.errors import (
    ConfigurationError,
    DeliveryError,
    DiscoveryError,
    IdentityNotFound,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    PeerRejected,
    StoreCorrupted,
    TalosError,
    UnsupportedVersion,
)
from talos.metrics import AgentMetrics
from talos.peers import DhtSource, PeerDirectory, RecordSource, RegistrySource
from talos.storage.agent_state import (
    AgentState,
    Enqueue,
    InboxMessage,
    Received,
    derive_storage_key,
)
from talos.storage.home import AgentHome, default_home
from talos.storage.tokens import TokenStore
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG
from talos.transport import Link, Transport

__all__ = ["SendResult", "TalosClient"]

_log = logging.getLogger("talos.client")

#: One-time prekeys kept published at the registry.
ONE_TIME_PREKEYS: Final = 20
#: How long our peer records stay valid (re-announced well before).
RECORD_LIFETIME: Final = 3600.0


class _Creating:
    """``TalosClient.create(...)``: awaitable, or an async context manager that closes."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self._kwargs = kwargs
        self._client: TalosClient | None = None

    def __await__(self) -> Generator[Any, None, TalosClient]:
        return TalosClient._start(**self._kwargs).__await__()

    async def __aenter__(self) -> TalosClient:
        self._client = await TalosClient._start(**self._kwargs)
        return self._client

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


class TalosClient(SendingMixin, ReceivingMixin, RevocationExchangeMixin):
    """One agent. Create with ``await TalosClient.create(name, home=...)``."""

    @staticmethod
    def create(
        name: str,
        *,
        home: str | Path | None = None,
        registry_url: str | None = None,
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
    ) -> _Creating:
        """Open (or create) the agent in ``home`` and start it.

        ``discovery`` orders the sources asked for unknown peers
        (``"registry"``, ``"dht"``); the local cache of verified records is
        always asked first. With ``"dht"`` the agent runs a DHT node on UDP
        ``dht_port`` (0: any) joined through ``dht_bootstrap``.
        ``announce`` (``HOST`` or ``HOST:PORT``) is the address peers are
        told to connect to, when it differs from ``listen`` (NAT, a proxy,
        or ``listen`` on every interface, which needs it); its port
        defaults to the one listened on.
        With ``metrics_port`` (0: any) Prometheus metrics are served at
        ``/metrics``; :attr:`metrics` is always there.

        Raises:
            ConfigurationError: an invalid option.
            StorageError: the home, audit log or state cannot be opened.
        """
        return _Creating(dict(locals()))

    # -- start and stop -----------------------------------------------------------------

    @classmethod
    async def _start(cls, **options: Any) -> TalosClient:
        client = cls(**options)
        try:
            await client._open()
        except BaseException:
            await client.close()
            raise
        return client

    def __init__(
        self,
        name: str,
        *,
        home: str | Path | None,
        registry_url: str | None,
        listen: str,
        announce: str | None,
        discovery: tuple[str, ...] | list[str],
        dht_bootstrap: list[tuple[str, int]] | None,
        dht_port: int,
        offline_mode: bool,
        queue_limit: int,
        reconnect_interval: float,
        replay_window: float,
        revocation_mode: str,
        revocation_max_age: float,
        audit_config: dict[str, Any] | None,
        metrics_port: int | None,
        accept_policy: str,
        passphrase: bytes | None,
        clock: Clock,
        rng: Rng,
    ) -> None:
        if accept_policy not in ("capability", "open"):
            raise ConfigurationError("accept_policy must be 'capability' or 'open'")
        if queue_limit < 1:
            raise ConfigurationError("queue_limit must be positive")
        try:
            mode = RevocationMode(revocation_mode)
        except ValueError:
            raise ConfigurationError(f"unknown revocation_mode {revocation_mode!r}") from None
        self._name = name
        self._home = AgentHome(Path(home) if home is not None else default_home())
        unknown = set(discovery) - {"registry", "dht"}
        if unknown:
            raise ConfigurationError(f"unknown discovery sources {sorted(unknown)}")
        self._discovery = list(discovery)
        self._registry_url = registry_url if "registry" in discovery else None
        self._dht_bootstrap = list(dht_bootstrap or [])
        self._dht_port = dht_port
        self._dht: DhtNode | None = None
        self._listen = _parse_listen(listen)
        self._announce_as = _parse_announce(announce, self._listen[0])
        self._offline = offline_mode
        self._queue_limit = queue_limit
        self._backoff = Backoff(base=min(0.2, reconnect_interval), cap=reconnect_interval)
        self._replay_window = replay_window
        self._revocation_policy = RevocationPolicy(mode=mode, max_age=revocation_max_age)
        self._audit_config = AuditConfig.from_mapping(audit_config)
        self._accept_open = accept_policy == "open"
        self._passphrase = passphrase
        self._clock, self._rng = clock, rng
        self._instance = wire.new_instance_id(rng)
        self._closed = False
        # Filled in by _open().
        self._identity: Identity
        self._log: AuditLog | None = None
        self._state: AgentState
        self._tokens: TokenStore | None = None
        self._registry: RegistryClient | None = None
        self._peers: PeerDirectory
        self._prekeys: PrekeyStore
        self._transport: Transport | None = None
        self._endpoint = ""
        self._links: dict[str, Link] = {}
        self._sessions: dict[str, tuple[Session, bytes | None]] = {}
        self._acks: dict[bytes, asyncio.Future[None]] = {}
        #: Set when the peer answered DECRYPT_FAILED for a message: retry it now.
        self._nacks: dict[bytes, asyncio.Event] = {}
        #: Bounds on what unauthenticated input can make us do (audit writes, lookups).
        self._noisy_audits = RateLimiter(rate=1.0, burst=20)
        self._unknown_lookups = RateLimiter(rate=2.0, burst=20)
        #: Incoming links we already answered with our revocation list.
        self._answered: weakref.WeakSet[Link] = weakref.WeakSet()
        #: Failed delivery attempts per queued message (while a send() waits on it).
        self._failures: dict[bytes, int] = {}
        #: Resolved (and replaced) whenever a delivery attempt fails: send() calls
        #: waiting for their ACK then check their retry count.
        self._failure_tick: asyncio.Future[None] | None = None
        #: send() calls waiting for the next group commit of the outbox.
        self._enqueues: list[tuple[Enqueue, asyncio.Future[None]]] = []
        #: Received messages decrypted but not yet committed (see _settle), the
        #: sessions they advanced, and their replay ids.
        self._staged: list[tuple[Received, Link, wire.Envelope]] = []
        self._staged_sessions: dict[str, Session] = {}
        self._staged_ids: set[bytes] = set()
        self._acknowledging: set[asyncio.Task[None]] = set()
        #: ACKed messages waiting for the next group commit of their removal.
        self._removing: dict[bytes, wire.Envelope] = {}
        #: ... and those whose removal is being committed (in a worker thread).
        self._removal_running: dict[bytes, wire.Envelope] = {}
        self._remover: asyncio.Task[None] | None = None
        self._flushers: dict[str, asyncio.Task[None]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        #: Per peer: messages transmitted and not yet acknowledged, id → (outbox
        #: seq, ACK deadline, payload bytes), and frames encrypted by the send
        #: fast path that the peer's delivery loop transmits next.
        self._inflight: dict[str, InFlight] = {}
        self._outgoing: dict[str, list[tuple[bytes, bytes]]] = {}
        self._inbox_ready = asyncio.Event()
        #: receive(auto_ack=True) calls waiting for a message: the next receive
        #: commit hands messages to them directly (see _settle).
        self._takers: collections.deque[asyncio.Future[InboxMessage]] = collections.deque()
        #: The last inbox sequence number receive(auto_ack=False) returned, and,
        #: once it has read the inbox to its end, the rows written since, in memory.
        self._inbox_cursor = -1
        self._read_ahead: collections.deque[tuple[int, InboxMessage]] | None = None
        self._read_ahead_bytes = 0
        self._last_reset: dict[str, float] = {}
        self._revocations = RevocationState()
        #: When each in-flight message last left (our clock), for ACK clock samples.
        self._sent_at: dict[bytes, float] = {}
        #: X3DH header each in-flight INITIAL message was sent with.
        self._handshake_of: dict[bytes, bytes] = {}
        self._peer_clocks = PeerClocks()
        self._clock_warned: dict[str, float] = {}
        #: Offset of our clock from the registry's (seconds, positive: we are ahead).
        self.registry_offset: float | None = None
        self._instances = InstanceTracker()
        self._background: set[asyncio.Task[Any]] = set()
        self.registry_reachable: bool | None = None
        #: Prometheus collectors of this agent (served on ``metrics_port`` if given).
        self.metrics = AgentMetrics(uses_registry=registry_url is not None)
        self._metrics_port = metrics_port

    async def _open(self) -> None:
        self._identity = self._load_identity()
        identity = self._identity
        signer = LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")
        self._log = AuditLog.open(
            self._home.audit_path,
            clock=self._clock,
            signer=signer,
            extra_databases=AgentState.DATABASES,
            **self._audit_config.open_arguments(),
        )
        self._state = AgentState(
            self._log,
            storage_key=derive_storage_key(identity.signing_key.seed()),
            clock=self._clock,
            rng=self._rng,
            replay_window_ms=int(self._replay_window * 1000),
        )
        self._tokens = TokenStore.open(self._home.path / "capabilities")
        if self._registry_url is not None:
            self._registry = RegistryClient(self._registry_url)
        if "dht" in self._discovery:
            self._dht = DhtNode(clock=self._clock, rng=self._rng)
            await self._dht.start(self._dht_port, self._listen[0], self._dht_bootstrap)
        sources: list[RecordSource] = []
        for name in self._discovery:
            if name == "registry" and self._registry is not None:
                sources.append(RegistrySource(self._registry))
            elif name == "dht" and self._dht is not None:
                sources.append(DhtSource(self._dht, self._clock))
        self._peers = PeerDirectory(
            self._state,
            sources,
            clock=self._clock,
            own=identity.keylog,
            on_source_down=self._source_down,
            on_source_up=self._source_up,
        )
        self._load_revocations()
        self._prekeys = self._load_prekeys()
        if self._metrics_port is not None:
            self.metrics.serve(self._metrics_port, self._listen[0])
        self._transport = Transport(self._on_frame)
        host, port = await self._transport.listen(*self._listen)
        announced_host, announced_port = self._announce_as
        host = announced_host or host
        self._endpoint = f"ws://{f'[{host}]' if ':' in host else host}:{announced_port or port}"
        if self._registry is not None and not self._offline:
            await self._announce()
        if self._dht is not None and not self._offline:
            await self._announce_dht()
        if not self._offline and (self._registry is not None or self._dht is not None):
            self._spawn(self._reannounce())
        for peer in self._state.peers_with_pending():
            self._kick(peer)

    def _load_identity(self) -> Identity:
        try:
            return self._home.load_identity(passphrase=self._passphrase)
        except IdentityNotFound:
            identity = Identity.create(self._name, rng=self._rng, clock=self._clock)
            self._home.save_identity(identity, rng=self._rng, passphrase=self._passphrase)
            return identity

    def _load_prekeys(self) -> PrekeyStore:
        data = self._state.prekeys()
        if data is not None:
            store = PrekeyStore.from_bytes(data)
            if store.identity_signing_key == self._identity.signing_key.public_key.raw:
                return store
        store = PrekeyStore.create(
            agent_id=self.agent_id,
            signing_key=self._identity.signing_key,
            identity_dh=self._identity.dh_key,
            rng=self._rng,
        ).add_one_time_prekeys(ONE_TIME_PREKEYS, self._rng)
        self._state.put_prekeys(store.to_bytes())
        return store

    def _load_revocations(self) -> None:
        """Known key logs (imported with capabilities) and revocation lists, verified."""
        assert self._tokens is not None  # noqa: S101 -- opened just before
        keys = IssuerKeys([self._identity.keylog])
        for data in self._tokens.keylogs():
            with contextlib.suppress(TalosError):
                log = self._peers.learn_log(KeyLog.from_bytes(data))
                keys.add(log)
        for issuer, data, synced in self._tokens.revocation_lists():
            with contextlib.suppress(TalosError):
                self._revocations.apply(RevocationList.from_bytes(data), keys=keys)
                self._revocations.mark_synced(issuer, synced)
        self._revocations.mark_synced(self.agent_id, self._clock.time())

    async def _announce(self) -> None:
        """Publish key log, prekeys and where we listen; a down registry is not fatal."""
        registry, identity = self._registry, self._identity
        assert registry is not None  # noqa: S101 -- only called with a registry
        try:
            # First: a clock far off makes the registry refuse what follows,
            # and the offset is what tells the operator why.
            await self._measure_registry_clock(registry)
            await registry.publish_keylog(identity.keylog)
            upload = PrekeyUpload.from_store(
                self._prekeys,
                identity.signing_key,
                key_sequence=identity.sequence,
                sequence=time_ms(self._clock),
            )
            await registry.publish_prekeys(upload)
            await registry.publish_record(self.peer_record())
            await self._publish_revocations()
            self.registry_reachable = True
            self.metrics.set_registry_reachable(True)
        except DiscoveryError as exc:
            self._source_down("registry", exc)
        except PeerRejected as exc:
            _log.warning(
                "registry refused our announcement: %s",
                exc,
                extra={"event": "registry_rejected", "peer_id": None},
            )

    async def _measure_registry_clock(self, registry: RegistryClient) -> None:
        """Estimate our offset from the registry's clock (best of three round trips)."""
        best = None
        for _ in range(3):
            t1 = self._clock.time()
            try:
                server = await registry.time_ms() / 1000
            except TalosError as exc:
                _log.info("registry time not measured: %s", exc)
                return
            sample = offset_from(t1, server, server, self._clock.time())
            if best is None or sample.delay < best.delay:
                best = sample
        assert best is not None  # noqa: S101 -- three samples were taken
        self.registry_offset = -best.offset
        self.metrics.set_clock_offset(self.registry_offset)
        self._warn_clock("registry", self.registry_offset)

    def _warn_clock(self, reference: str, ours_minus_theirs: float) -> None:
        """Log a clock_skew warning (at most once a minute per reference) above WARN_OFFSET."""
        if abs(ours_minus_theirs) <= WARN_OFFSET:
            return
        now = self._clock.monotonic()
        if now - self._clock_warned.get(reference, -120.0) < 60.0:
            return
        self._clock_warned[reference] = now
        _log.warning(
            "our clock is %+.1f s off %s's; beyond 60 s envelopes and capabilities are refused",
            ours_minus_theirs,
            reference,
            extra={
                "event": "clock_skew",
                "peer_id": None if reference == "registry" else reference,
                "offset_s": round(ours_minus_theirs, 3),
            },
        )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reannounce(self) -> None:
        """Announce again well before our records expire (and retry a down registry)."""
        while not self._closed:
            await asyncio.sleep(RECORD_LIFETIME / 4)
            if self._registry is not None:
                await self._announce()
            if self._dht is not None:
                await self._announce_dht()

    async def _announce_dht(self) -> None:
        """Publish our record (with our key log) on the DHT; failures are not fatal."""
        assert self._dht is not None  # noqa: S101 -- only called with a DHT node
        try:
            accepted = await self._dht.publish(
                self.peer_record().to_bytes(),
                self._identity.keylog.to_bytes(),
                self.get_prekey_bundle().to_bytes(),
            )
        except (DiscoveryError, LocalProtocolError) as exc:
            _log.warning("DHT announcement failed: %s", exc, extra={"event": "dht_unreachable"})
            return
        _log.info("announced on the DHT; %d nodes accepted the record", accepted)

    @property
    def dht_address(self) -> tuple[str, int] | None:
        """UDP address of this agent's DHT node, if it runs one."""
        return None if self._dht is None else self._dht.address

    def _source_up(self, name: str) -> None:
        """A discovery source answered: the registry gauge follows every contact."""
        if name == "registry" and self.registry_reachable is not True:
            if self.registry_reachable is False:
                _log.info("registry reachable again", extra={"event": "registry_reachable"})
            self.registry_reachable = True
            self.metrics.set_registry_reachable(True)

    def _source_down(self, name: str, exc: Exception) -> None:
        if name == "registry":
            self.registry_reachable = False
            self.metrics.set_registry_reachable(False)
        _log.warning(
            "%s unavailable: %s",
            name,
            exc,
            extra={"event": "registry_unreachable" if name == "registry" else "dht_unreachable"},
        )

    async def close(self) -> None:
        """Stop delivering, close links and stores. Queued messages stay queued."""
        if self._closed:
            return
        self._closed = True
        if self._acknowledging:
            # Committed receives are ACKed before the links close (else the
            # senders retry, and are answered DUPLICATE next time).
            await asyncio.wait(set(self._acknowledging), timeout=1.0)
        if self._remover is not None:
            # Its commit runs in a thread and cannot be cancelled: let it finish.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._remover)
        for task in [*self._flushers.values(), *self._background, *self._acknowledging]:
            task.cancel()
        for task in [*self._flushers.values(), *self._background, *self._acknowledging]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Received but not committed: not acknowledged either, so their senders retry.
        self._staged, self._staged_sessions, self._staged_ids = [], {}, set()
        self._flush_enqueues()
        self._flush_acks()  # ACKs already in: removed, and their senders released
        for future in self._acks.values():
            if not future.done():
                future.set_exception(
                    DeliveryError("the client closed; the message stays queued for next time")
                )
                future.exception()  # retrieved here; a waiting send() sees it too
        self._inbox_ready.set()
        if self._transport is not None:
            await self._transport.close()
        if self._registry is not None:
            await self._registry.aclose()
        if self._dht is not None:
            await self._dht.stop()
        if self._tokens is not None:
            self._tokens.close()
        if self._log is not None:
            self._log.close()
        self.metrics.close()

    async def __aenter__(self) -> TalosClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- identity and sessions ------------------------------------------------------

    @property
    def agent_id(self) -> str:
        return self._identity.agent_id

    @property
    def endpoint(self) -> str:
        """``ws://host:port`` this agent listens on."""
        return self._endpoint

    def peer_record(self, *, lifetime: float = RECORD_LIFETIME) -> PeerRecord:
        """A freshly signed record of where this instance listens."""
        return PeerRecord.create(
            self._identity.signing_key,
            agent_id=self.agent_id,
            key_sequence=self._identity.sequence,
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
                "log": self._identity.keylog.to_bytes(),
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
        return self._prekeys.bundle(None)

    async def establish_session(self, peer_id: str, bundle: PrekeyBundle | None = None) -> None:
        """Run X3DH with ``peer_id``; without a ``bundle``, one comes from the registry, or
        from the peer's DHT value when the registry cannot be reached.

        Raises:
            PeerNotFound: the peer's key log (or a bundle) cannot be found.
            SignatureInvalid: the bundle is not vouched for by the peer's key log.
            KeyAgreementFailed: a bundle key is unusable.
        """
        log = await self._peers.keylog(peer_id)
        if bundle is None:
            bundle = await self._fetch_bundle(peer_id, log)
        state = log.state
        me = self._identity
        start = initiate(
            bundle,
            peer_agent_id=peer_id,
            peer_signing_key=state.signing_key.raw,
            peer_identity_dh=state.dh_key,
            agent_id=me.agent_id,
            identity_signing_key=me.signing_key.public_key.raw,
            identity_dh=me.dh_key,
            rng=self._rng,
        )
        session = Session.initiator(
            start.shared_key, start.associated_data, start.their_ratchet_key, self._rng
        )
        header = start.header.to_bytes()
        self._settle()
        self._state.put_session(
            peer_id,
            _session_record(session, header),
            audit=[(AuditKind.SESSION_ESTABLISHED, {"role": "initiator"}, peer_id)],
        )
        self._sessions[peer_id] = (session, header)
        self.metrics.session_established()
        self._kick(peer_id)

    async def _fetch_bundle(self, peer_id: str, log: KeyLog) -> PrekeyBundle:
        """The registry's bundle (with a one-time prekey when it has one); if the registry
        is down or does not know the peer, the signed-prekey-only bundle the peer
        publishes on the DHT (weaker forward secrecy for the first message only).

        Raises:
            PeerNotFound: neither source has a bundle.
            DiscoveryError: the registry is down and there is no DHT.
        """
        failure: TalosError | None = None
        if self._registry is not None:
            try:
                bundle = await self._registry.fetch_bundle(peer_id)
            except PeerNotFound as exc:
                failure = exc
            except DiscoveryError as exc:
                self._source_down("registry", exc)
                failure = exc
            else:
                self._source_up("registry")
                return bundle
        if self._dht is not None:
            try:
                entry = await self._dht.lookup(peer_id, now=self._clock.time(), known_log=log)
            except (PeerNotFound, DiscoveryError) as exc:
                failure = failure or exc
            else:
                if entry.bundle is not None:
                    _log.info("prekey bundle of %s taken from the DHT", peer_id)
                    return entry.bundle
        if failure is not None:
            raise failure
        raise PeerNotFound(f"no bundle for {peer_id}: no registry, and no DHT bundle")

    async def reset_session(self, peer_id: str) -> None:
        """Forget the session with ``peer_id``; the next message establishes a new one."""
        self._settle()
        self._sessions.pop(peer_id, None)
        self._state.drop_session(
            peer_id, audit=[(AuditKind.SESSION_RESET, {"reason": "requested"}, peer_id)]
        )

    def _session(self, peer: str) -> tuple[Session, bytes | None] | None:
        """The session with ``peer`` after committing staged receives (see _settle)."""
        self._settle()
        return self._committed_session(peer)

    def _committed_session(self, peer: str) -> tuple[Session, bytes | None] | None:
        """The committed session with ``peer``; a stored one that is damaged is discarded.

        Seed, "Session State Corruption": a session that cannot be read is
        dropped (audited as SESSION_RESET) and treated as absent, so the
        sender re-establishes and the receiver answers DECRYPT_FAILED, which
        makes the peer do the same.
        """
        cached = self._sessions.get(peer)
        if cached is None:
            try:
                data = self._state.session(peer)
                if data is None:
                    return None
                cached = _load_session(data, self._rng)
            except (StoreCorrupted, MalformedFrame, UnsupportedVersion) as exc:
                _log.warning(
                    "the stored session with %s is damaged (%s); discarding it",
                    peer,
                    exc,
                    extra={"event": "session_reset", "peer_id": peer, "reason": "damaged"},
                )
                self._state.drop_session(
                    peer, audit=[(AuditKind.SESSION_RESET, {"reason": "corrupted"}, peer)]
                )
                self.metrics.session_reset()
                return None
            self._sessions[peer] = cached
        return cached

    # -- audit ------------------------------------------------------------------------

    def _audit_noisy(self, kind: str, data: dict[str, Any], peer: str) -> bool:
        """Audit an event anyone can trigger at will, at most ~1/s per (kind, peer).

        Past the limit the event is still counted in the metrics and logged at
        debug level, but not written: a flood of forged or replayed frames
        must not fill the disk (and so stop the agent) through its own log.
        Returns whether it was audited (callers log a warning only then).
        """
        if self._noisy_audits.allow((kind, peer), self._clock.monotonic()):
            self._audit(kind, data, peer)
            return True
        _log.debug("%s from %s not audited: rate limit", kind, peer)
        return False

    def _audit(self, kind: str, data: dict[str, Any], peer: str | None) -> None:
        assert self._log is not None  # noqa: S101 -- open while the client is
        try:
            self._log.append(kind, data, peer=peer)
        except TalosError as exc:
            _log.warning("audit entry %s not written: %s", kind, exc)

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
        now = self._clock.time()
        return {
            "agent_id": self.agent_id,
            "instance_id": self._instance.hex(),
            "endpoint": self._endpoint,
            "offline_mode": self._offline,
            "queue_depth": self.queue_depth(),
            "queued_by_peer": {
                peer: len(self._state.pending(peer)) for peer in self._state.peers_with_pending()
            },
            "inbox_depth": self._state.inbox_count(),
            "sessions": sorted(self._state.session_peers()),
            "connected": sorted(peer for peer, link in self._links.items() if link.is_open),
            "registry": self._registry_url,
            "registry_reachable": self.registry_reachable,
            "dht": None if self._dht is None else "{}:{}".format(*self._dht.address),
            "clock_offset_s": self.registry_offset,
            "peer_clock": {
                peer: {
                    "offset_s": round(sample.offset, 6),
                    "delay_s": round(sample.delay, 6),
                    "age_s": round(max(0.0, now - sample.at), 3),
                }
                for peer, sample in self._peer_clocks.estimates().items()
            },
            "duplicate_instances": dict(self._instances.duplicates),
        }

    def known_peers(self) -> list[dict[str, Any]]:
        """Peers with a cached, verified record: what ``talos peers`` lists."""
        rows = []
        for data in self._state.peer_records():
            with contextlib.suppress(MalformedFrame, UnsupportedVersion):
                record = PeerRecord.from_bytes(data)
                rows.append(
                    {
                        "agent_id": record.agent_id,
                        "endpoint": record.endpoint,
                        "instance_id": record.instance_id.hex(),
                        "expires_ms": record.expires_ms,
                        "session": self._state.session(record.agent_id) is not None,
                        "connected": (
                            record.agent_id in self._links and self._links[record.agent_id].is_open
                        ),
                    }
                )
        return rows


#: Hosts that mean "every interface": never an address a peer can connect to.
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 -- recognized, not bound


def _parse_announce(announce: str | None, listen_host: str) -> tuple[str | None, int | None]:
    """The announced (host, port); ``None`` parts come from the listening socket.

    Raises:
        ConfigurationError: malformed, a wildcard, or missing while ``listen``
            is on every interface.
    """
    if announce is None:
        if listen_host in _WILDCARD_HOSTS:
            raise ConfigurationError(
                f"listening on every interface ({listen_host or '*'}): give the address "
                "peers reach this agent at with announce='HOST[:PORT]' (talos run --announce)"
            )
        return None, None
    host, colon, port = announce.rpartition(":")
    if not colon or "]" in port:  # HOST alone (also a bracketed IPv6 address)
        host, port = announce, ""
    host = host.strip("[]")
    if host in _WILDCARD_HOSTS or any(c.isspace() or c in "/?#@" for c in host):
        raise ConfigurationError(f"announce must be HOST or HOST:PORT, not {announce!r}")
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ConfigurationError(f"announce must be HOST or HOST:PORT, not {announce!r}")
    return host, int(port) if port else None


def _parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)
