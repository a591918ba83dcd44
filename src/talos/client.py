"""TalosClient: one agent — identity, sessions, durable delivery, audit.

This is the composition root: it picks the concrete parts (the agent home,
the LMDB-backed audit log and agent state, the WebSocket transport, the
registry client) and runs the two flows of ARCHITECTURE §5.

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
import contextlib
import hashlib
import logging
import secrets
import weakref
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

from talos.audit import AuditKind, AuditLog, LogSigner
from talos.audit.config import AuditConfig
from talos.core import wire
from talos.core.backoff import Backoff
from talos.core.capability import Capability, CapabilityPolicy, verify
from talos.core.clock import Clock, time_ms
from talos.core.clocksync import WARN_OFFSET, InstanceTracker, PeerClocks, offset_from
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.identity import Identity
from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.message import Message, decode_payload, encode_payload
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.ratchet import Session
from talos.core.ratelimit import RateLimiter
from talos.core.revocation import (
    RevocationList,
    RevocationMode,
    RevocationPolicy,
    RevocationState,
)
from talos.core.rng import Rng
from talos.core.x3dh import InitialHeader, PrekeyBundle, PrekeyStore, initiate, respond
from talos.discovery.dht import DhtNode
from talos.discovery.registry_client import RegistryClient
from talos.errors import (
    CapabilityDenied,
    ConfigurationError,
    CryptoError,
    DeliveryError,
    DeliveryTimeout,
    DiscoveryError,
    DuplicateMessage,
    IdentityNotFound,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    PeerRejected,
    PeerUnreachable,
    RemoteProtocolError,
    RevocationListStale,
    ScopeMismatch,
    SessionError,
    SignatureInvalid,
    StaleMessage,
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
    OutboxItem,
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
#: Refusals logged as security events (WARNING), and their log event names.
_SECURITY_REFUSALS: Final = frozenset({wire.ErrorCode.CAPABILITY_DENIED, wire.ErrorCode.STALE})
_REFUSAL_EVENTS: Final = {
    wire.ErrorCode.CAPABILITY_DENIED: "capability_denied",
    wire.ErrorCode.STALE: "stale_message",
    wire.ErrorCode.DECRYPT_FAILED: "decrypt_failed",
}
#: How long one transmission waits for its ACK before it is retried.
ACK_TIMEOUT: Final = 10.0
#: Messages in flight to one peer at a time (sent back to back, one commit).
SEND_WINDOW: Final = 64
#: Least time between two automatic session resets for one peer.
RESET_INTERVAL: Final = 5.0
_SESSION_FIELDS: Final = frozenset({"v", "s", "x"})


@dataclass(frozen=True)
class SendResult:
    """What :meth:`TalosClient.send` achieved."""

    status: Literal["delivered", "queued"]
    message_id: str
    trace_id: str


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


class TalosClient:
    """One agent. Create with ``await TalosClient.create(name, home=...)``."""

    @staticmethod
    def create(
        name: str,
        *,
        home: str | Path | None = None,
        registry_url: str | None = None,
        listen: str = "127.0.0.1:0",
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
        self._flushers: dict[str, asyncio.Task[None]] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._inbox_ready = asyncio.Event()
        #: The last inbox sequence number receive(auto_ack=False) returned.
        self._inbox_cursor = -1
        self._last_reset: dict[str, float] = {}
        self._revocations = RevocationState()
        #: When each in-flight message last left (our clock), for ACK clock samples.
        self._sent_at: dict[bytes, float] = {}
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
            try:
                self.metrics.serve(self._metrics_port, self._listen[0])
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot serve metrics on {self._listen[0]}:{self._metrics_port}: "
                    f"{exc.strerror or exc}"
                ) from None
        self._transport = Transport(self._on_frame)
        host, port = await self._transport.listen(*self._listen)
        self._endpoint = f"ws://{host}:{port}"
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
        for task in [*self._flushers.values(), *self._background, *self._acknowledging]:
            task.cancel()
        for task in [*self._flushers.values(), *self._background, *self._acknowledging]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for future in self._acks.values():
            if not future.done():
                future.set_exception(
                    DeliveryError("the client closed; the message stays queued for next time")
                )
                future.exception()  # retrieved here; a waiting send() sees it too
        self._flush_enqueues()
        self._flush_acks()
        # Received but not committed: not acknowledged either, so their senders retry.
        self._staged, self._staged_sessions, self._staged_ids = [], {}, set()
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

    # -- sending ----------------------------------------------------------------------

    async def send(
        self,
        peer_id: str,
        data: Any,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 -- the seed's documented send() signature
        retry_count: int = 3,
        on_failure: Literal["queue", "raise"] = "queue",
        capability: str | Capability | None = None,
    ) -> SendResult:
        """Send ``data`` (bytes, str or JSON-able) to ``peer_id``; durable before it returns.

        ``timeout`` bounds the whole call; within it up to ``retry_count``
        retries follow the backoff schedule. Then ``on_failure="queue"``
        leaves the message queued for background delivery (status
        ``"queued"``), ``"raise"`` removes it and raises.

        Raises:
            CapabilityDenied: the capability to attach is invalid (nothing sent or queued).
            QueueFull: ``queue_limit`` messages are queued already (nothing queued).
            PeerRejected: the peer refused the message, with its signed reason.
            DeliveryTimeout: not delivered in time with ``on_failure="raise"``.
            LocalProtocolError: ``data`` cannot be encoded.
        """
        if on_failure not in ("queue", "raise"):
            raise ConfigurationError("on_failure must be 'queue' or 'raise'")
        payload = encode_payload(data)
        with contextlib.suppress(PeerNotFound, DiscoveryError):
            await self._peers.keylog(peer_id)  # to check the capability's issuer locally
        token = self._capability_for(peer_id, capability)
        message_id = wire.new_message_id(self._rng)
        trace_id = secrets.token_hex(8)
        await self._enqueue(
            Enqueue(
                peer_id,
                message_id,
                payload,
                None if token is None else token.to_bytes(),
                audit=[
                    (
                        AuditKind.MESSAGE_SENT,
                        {
                            "id": message_id,
                            "sha256": hashlib.sha256(payload).digest(),
                            "size": len(payload),
                            "trace": trace_id,
                        },
                        peer_id,
                    )
                ],
            )
        )
        result = SendResult("queued", message_id.hex(), trace_id)
        self.metrics.message_sent(len(payload))
        self.metrics.set_queue_depth(self.queue_depth())
        if self._offline:
            return result
        acked = self._acks.setdefault(message_id, asyncio.get_running_loop().create_future())
        self._kick(peer_id)
        acked.add_done_callback(_retrieve)
        if await self._await_delivery(message_id, acked, timeout, retry_count):
            return SendResult("delivered", result.message_id, trace_id)
        self._failures.pop(message_id, None)
        if on_failure == "raise":
            await self._give_up(message_id, peer_id, "timeout")
            raise DeliveryTimeout(
                f"not delivered to {peer_id} within {timeout:g} s and {retry_count} retries"
            )
        return result

    async def _enqueue(self, request: Enqueue) -> None:
        """Queue durably; sends made in the same event-loop tick share one commit.

        A caller cancelled before the commit withdraws its message; after
        it, the message stays queued (like any queued message).

        Raises:
            QueueFull, LocalProtocolError, AuditFull, StorageError: as
            :meth:`AgentState.enqueue`; nothing of this message was written.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueues.append((request, future))
        if len(self._enqueues) == 1:
            asyncio.get_running_loop().call_soon(self._flush_enqueues)
        await future

    def _flush_enqueues(self) -> None:
        batch = [(r, f) for r, f in self._enqueues if not f.done()]
        self._enqueues = []
        if not batch:
            return
        try:
            results = self._state.enqueue_many(
                [request for request, _ in batch], queue_limit=self._queue_limit
            )
        except Exception as exc:  # handed to every sender in the batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, OutboxItem):
                future.set_result(None)
            else:
                future.set_exception(result)

    async def _await_delivery(
        self, message_id: bytes, acked: asyncio.Future[None], seconds: float, retry_count: int
    ) -> bool:
        """Wait for the ACK until ``seconds`` pass or more than ``retry_count`` attempts failed.

        Raises:
            PeerRejected: the peer refused the message.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(asyncio.shield(acked), min(remaining, 0.2))
            except TimeoutError:
                if self._failures.get(message_id, 0) > retry_count:
                    return False
                continue
            return True
        return False

    def _capability_for(self, peer: str, given: str | Capability | None) -> Capability | None:
        """The token to attach: the one given, else a held one for message.send to ``peer``.

        Raises:
            CapabilityDenied: the token does not authorize sending to ``peer`` now.
            MalformedFrame: ``given`` is not a token.
        """
        if isinstance(given, str):
            given = Capability.from_text(given)
        candidates = [given] if given is not None else self._held_tokens(peer)
        denial: CapabilityDenied | None = None
        for token in candidates:
            try:
                self._check_token(token, audience=peer, holder=self.agent_id)
            except CapabilityDenied as exc:
                denial = exc
                continue
            return token
        if given is not None and denial is not None:
            raise denial
        return None

    def _held_tokens(self, peer: str) -> list[Capability]:
        assert self._tokens is not None  # noqa: S101 -- open while the client is
        tokens = []
        for data in self._tokens.held():
            with contextlib.suppress(MalformedFrame, UnsupportedVersion):
                token = Capability.from_bytes(data)
                if token.audience == peer:
                    tokens.append(token)
        return tokens

    def _check_token(self, token: Capability, *, audience: str, holder: str) -> None:
        """Verify ``token`` for sending to ``audience`` as ``holder``.

        The resource is the recipient's inbox, ``inbox/<audience>``. A token
        is only good for its audience if the audience issued its root: nobody
        can authorize themselves to write to someone else's inbox.

        Raises:
            CapabilityDenied: it does not authorize the message now.
        """
        root = token.chain()[0]
        if root.issuer != audience:
            raise ScopeMismatch(f"capability chain starts at {root.issuer}, not at {audience}")
        now = self._clock.time()
        # This agent's own revocation list is the authority: always current.
        self._revocations.mark_synced(self.agent_id, now)
        keys = IssuerKeys(
            [
                log
                for a in {token.issuer for token in token.chain()}
                if (log := self._peers.known_log(a)) is not None
            ]
        )
        policy = CapabilityPolicy(
            audience=audience,
            revocation=(
                self._revocation_policy
                if audience == self.agent_id
                else RevocationPolicy(mode=RevocationMode.OFFLINE)
            ),
        )
        verify(
            token,
            action="message.send",
            resource=f"inbox/{audience}",
            now=now,
            revocations=self._revocations,
            policy=policy,
            keys=keys,
            holder=holder,
        )

    def _kick(self, peer: str) -> None:
        """Make sure a delivery loop runs for ``peer`` and wake it."""
        if self._offline or self._closed:
            return
        self._wakeups.setdefault(peer, asyncio.Event()).set()
        task = self._flushers.get(peer)
        if task is None or task.done():
            self._flushers[peer] = asyncio.create_task(self._deliver_loop(peer))

    async def _deliver_loop(self, peer: str) -> None:
        """Deliver ``peer``'s queue in order, retrying with backoff until it is empty."""
        attempt = 0
        wake = self._wakeups.setdefault(peer, asyncio.Event())
        while not self._closed:
            wake.clear()
            pending = self._state.pending(peer)
            if not pending:
                await wake.wait()
                continue
            head = pending[0].message_id
            try:
                while pending:
                    window = pending[: self._window_size(peer)]
                    head = window[0].message_id
                    await self._deliver_window(peer, window)
                    pending = pending[len(window) :]
                attempt = 0
            except TalosError as exc:
                # Counted per message for send(retry_count=...): in order, the
                # message that failed is the one this attempt was about.
                self._failures[head] = self._failures.get(head, 0) + 1
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                level = logging.INFO if attempt < 5 else logging.WARNING
                _log.log(
                    level,
                    "delivery to %s failed (%s); retry in %.2f s",
                    peer,
                    exc,
                    delay,
                    extra={"event": "delivery_retry", "peer_id": peer, "attempt": attempt},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)

    def _window_size(self, peer: str) -> int:
        """How many messages may be in flight to ``peer``: one until the peer holds
        the session (each X3DH initial message would start a new one), then SEND_WINDOW."""
        current = self._sessions.get(peer)
        return SEND_WINDOW if current is not None and current[1] is None else 1

    async def _deliver_window(self, peer: str, items: list[OutboxItem]) -> None:
        """Transmit queued messages back to back, then wait for every ACK (or a refusal).

        Raises:
            SessionError: the peer could not decrypt or accept one yet (retried).
            PeerUnreachable: the connection dropped before the ACKs.
            DeliveryTimeout: no ACK within ACK_TIMEOUT.
        """
        loop = asyncio.get_running_loop()
        items = [
            item
            for item in items
            if not self._acks.setdefault(item.message_id, loop.create_future()).done()
            and item.message_id not in self._removing
        ]
        if not items:
            return
        link = await self._link(peer)
        frames = await self._encrypt(peer, items)
        for item, frame in zip(items, frames, strict=True):
            self._nacks.setdefault(item.message_id, asyncio.Event()).clear()
            self._sent_at[item.message_id] = self._clock.time()
            await link.send(frame)
        deadline = loop.time() + ACK_TIMEOUT
        dropped: asyncio.Future[Any] = asyncio.ensure_future(link.closed.wait())
        try:
            for item in items:
                await self._await_ack(peer, item.message_id, dropped, deadline)
        finally:
            dropped.cancel()

    async def _await_ack(
        self, peer: str, message_id: bytes, dropped: asyncio.Future[Any], deadline: float
    ) -> None:
        acked = self._acks.get(message_id)
        if acked is None or acked.done():
            return  # acknowledged (and released) already
        nack = self._nacks.setdefault(message_id, asyncio.Event())
        refused: asyncio.Future[Any] = asyncio.ensure_future(nack.wait())
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            done, _ = await asyncio.wait(
                {acked, refused, dropped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            refused.cancel()
        if acked in done:
            with contextlib.suppress(PeerRejected, asyncio.CancelledError, DeliveryError):
                acked.result()
            return
        if refused in done:
            raise SessionError(f"{peer} could not decrypt or accept it yet; retrying")
        if dropped in done:
            raise PeerUnreachable(f"the connection to {peer} closed before the ACK")
        raise DeliveryTimeout(f"no ACK from {peer} within {ACK_TIMEOUT:g} s")

    async def _encrypt(self, peer: str, items: list[OutboxItem]) -> list[bytes]:
        """Encrypt and sign ``items`` for ``peer``; the advanced ratchet and the attempts
        are durable (one commit) before any of the frames is returned."""
        current = self._session(peer)
        if current is None:
            await self.establish_session(peer)
            current = self._session(peer)
            if current is None:
                raise SessionError(f"no session with {peer}")
        session, x3dh = current
        now = self._clock.time()
        sealed = [session.encrypt(item.payload, now=now) for item in items]
        # Persist the advanced ratchet (with the attempts) before a ciphertext leaves.
        self._state.record_attempts(
            peer, [item.message_id for item in items], now, session=_session_record(session, x3dh)
        )
        return [
            wire.seal(
                wire.Envelope(
                    type=wire.EnvelopeType.INITIAL if x3dh else wire.EnvelopeType.MESSAGE,
                    message_id=item.message_id,
                    sender=self.agent_id,
                    sender_instance=self._instance,
                    recipient=peer,
                    # The time it was queued, on every retry: the receiver's replay
                    # window then refuses (STALE) rather than re-accepts a message
                    # retried after the window forgot its id.
                    timestamp_ms=item.enqueued_ms,
                    ratchet_header=header,
                    ciphertext=ciphertext,
                    capability_ref=item.capability,
                    x3dh_header=x3dh,
                ),
                self._identity.signing_key,
            )
            for item, (header, ciphertext) in zip(items, sealed, strict=True)
        ]

    async def _link(self, peer: str) -> Link:
        link = self._links.get(peer)
        if link is not None and link.is_open:
            return link
        record = await self._peers.endpoint(peer)
        assert self._transport is not None  # noqa: S101 -- open while the client is
        try:
            link = await self._transport.connect(record.endpoint)
        except PeerUnreachable:
            record = await self._peers.endpoint(peer, refresh=True)
            link = await self._transport.connect(record.endpoint)
        link.peer = peer
        self._links[peer] = link
        await self._offer_revocations(link, peer)
        return link

    async def _publish_revocations(self) -> None:
        """Put our own list in the registry, where verifiers of our delegations find it."""
        data = self._own_revocation_list()
        if data is None or self._registry is None:
            return
        with contextlib.suppress(PeerRejected):  # the registry holds this version already
            await self._registry.publish_revocations(RevocationList.from_bytes(data))

    def _refresh_own_revocations(self) -> None:
        """Adopt a newer own list written by ``talos capabilities revoke`` while we run."""
        data = self._own_revocation_list()
        current = self._revocations.list_for(self.agent_id)
        if data is None or (current is not None and current.to_bytes() == data):
            return
        with contextlib.suppress(TalosError):
            self._revocations.apply(
                RevocationList.from_bytes(data), keys=IssuerKeys([self._identity.keylog])
            )

    def _own_revocation_list(self) -> bytes | None:
        assert self._tokens is not None  # noqa: S101 -- open while the client is
        stored = self._tokens.revocation_list(self.agent_id)
        return None if stored is None else stored[0]

    async def _offer_revocations(self, link: Link, peer: str) -> None:
        """Send our own signed revocation list: both sides converge on every connection."""
        data = self._own_revocation_list()
        if data is None:
            return
        envelope = wire.Envelope(
            type=wire.EnvelopeType.REVOCATIONS,
            message_id=wire.new_message_id(self._rng),
            sender=self.agent_id,
            sender_instance=self._instance,
            recipient=peer,
            timestamp_ms=time_ms(self._clock),
            revocation_list=data,
        )
        with contextlib.suppress(PeerUnreachable):
            await link.send(wire.seal(envelope, self._identity.signing_key))

    async def _on_revocations(self, link: Link, envelope: wire.Envelope, log: KeyLog) -> None:
        """Adopt a peer's own revocation list (verified, merged, persisted); answer with ours."""
        sender, now = envelope.sender, self._clock.time()
        try:
            offered = RevocationList.from_bytes(envelope.revocation_list or b"")
            if offered.issuer != sender:
                raise MalformedFrame("a peer may only offer its own revocation list")
            result = self._revocations.apply(offered, keys=IssuerKeys([log]))
        except (RemoteProtocolError, SignatureInvalid) as exc:
            self._audit(AuditKind.SIGNATURE_FAILURE, {"what": "revocation list"}, sender)
            _log.warning(
                "refusing a revocation list from %s: %s",
                sender,
                exc,
                extra={"event": "revocation_conflict", "peer_id": sender},
            )
            return
        if result.security_event:
            self._audit("REVOCATION_CONFLICT", {"outcome": result.outcome.name}, sender)
            _log.warning(
                "revocation list conflict from %s: %s",
                sender,
                result.outcome.name,
                extra={"event": "revocation_conflict", "peer_id": sender},
            )
        assert self._tokens is not None  # noqa: S101 -- open while the client is
        kept = self._revocations.list_for(sender)
        if kept is not None:
            self._tokens.put_revocation_list(sender, kept.to_bytes(), synced_at=now)
        self._revocations.mark_synced(sender, now)
        if not link.outgoing and link not in self._answered:
            self._answered.add(link)
            await self._offer_revocations(link, sender)

    async def _give_up(self, message_id: bytes, peer: str, reason: str) -> None:
        self._state.remove(
            message_id,
            audit=[(AuditKind.DELIVERY_FAILED, {"id": message_id, "reason": reason}, peer)],
        )
        self._nacks.pop(message_id, None)
        self._failures.pop(message_id, None)
        self._sent_at.pop(message_id, None)
        future = self._acks.pop(message_id, None)
        if future is not None and not future.done():
            future.cancel()

    # -- receiving --------------------------------------------------------------------

    async def receive(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 -- the documented receive() signature
        *,
        auto_ack: bool = True,
    ) -> Message | None:
        """The next received message, or ``None`` after ``timeout`` seconds.

        With ``auto_ack`` (the default) the message leaves the durable inbox
        before it is returned: at most once to the application, and a crash
        right after this call loses it for the application. With
        ``auto_ack=False`` it stays in the inbox until :meth:`acknowledge`:
        at least once; after a crash it is returned again, and its
        ``message_id`` lets the application drop what it already processed.
        Each such call returns the next message after the previous one, so
        an application can process several and acknowledge them together
        (one commit); a restart starts again at the oldest unacknowledged.
        """
        deadline = None if timeout is None else self._clock.monotonic() + timeout
        while not self._closed:
            if auto_ack:
                taken = self._state.take(1)
                if taken:
                    return _message(taken[0])
            else:
                for seq, item in self._state.inbox(after=self._inbox_cursor, limit=1):
                    self._inbox_cursor = seq
                    return _message(item, seq)
            self._inbox_ready.clear()
            remaining = None if deadline is None else deadline - self._clock.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._inbox_ready.wait(), remaining)
        return None

    def acknowledge(self, *messages: Message) -> None:
        """Remove messages received with ``auto_ack=False`` from the durable inbox
        (all in one commit).

        Raises:
            LocalProtocolError: a message was not received with ``auto_ack=False``.
        """
        seqs = []
        for message in messages:
            if message.inbox_seq is None:
                raise LocalProtocolError(
                    "only messages received with auto_ack=False are acknowledged"
                )
            seqs.append(message.inbox_seq)
        if seqs:
            self._state.acknowledge(*seqs)

    async def messages(self) -> AsyncIterator[Message]:
        """Every received message, as it arrives."""
        while not self._closed:
            message = await self.receive(timeout=None)
            if message is not None:
                yield message

    async def _on_frame(self, link: Link, frame: bytes) -> None:
        try:
            unverified = wire.decode(frame)
        except RemoteProtocolError as exc:
            _log.warning(
                "dropping a malformed frame from %s: %s",
                link.remote,
                exc,
                extra={"event": "malformed_frame", "remote": link.remote},
            )
            return
        if unverified.recipient != self.agent_id:
            _log.warning(
                "dropping a frame for %s received by %s", unverified.recipient, self.agent_id
            )
            return
        sender = unverified.sender
        if self._peers.known_log(sender) is None and not self._unknown_lookups.allow(
            "lookup", self._clock.monotonic()
        ):
            _log.debug("dropping a frame from unknown %s: lookup rate limit", sender)
            return
        try:
            log = await self._peers.keylog(sender)
        except (PeerNotFound, TalosError) as exc:
            _log.warning(
                "dropping a frame from unknown agent %s: %s",
                sender,
                exc,
                extra={"event": "unknown_sender", "peer_id": sender},
            )
            return
        try:
            envelope = wire.verify(unverified, log.state.signing_key)
        except SignatureInvalid:
            audited = self._audit_noisy(
                AuditKind.SIGNATURE_FAILURE, {"id": unverified.message_id}, sender
            )
            self.metrics.signature_failed()
            _log.log(
                logging.WARNING if audited else logging.DEBUG,
                "signature failure on a frame from %s (not blocked)",
                sender,
                extra={
                    "event": "signature_failure",
                    "peer_id": sender,
                    "message_id": unverified.message_id.hex(),
                    "remote": link.remote,
                },
            )
            return
        if self._instances.observe(sender, envelope.sender_instance):
            self.metrics.duplicate_instance_detected()
            _log.warning(
                "%s is sending from two instances at once (split brain?)",
                sender,
                extra={
                    "event": "duplicate_instance",
                    "peer_id": sender,
                    "instance_id": envelope.sender_instance.hex(),
                },
            )
        # A valid frame proves who signed it, not who holds the socket (it may
        # be a replay): replies go back on this link, but outgoing traffic
        # only ever uses links this agent opened to a verified endpoint.
        kind = envelope.type
        if kind in (wire.EnvelopeType.MESSAGE, wire.EnvelopeType.INITIAL):
            await self._receive_message(link, envelope, log.state)
        elif kind is wire.EnvelopeType.ACK:
            self._on_ack(envelope)
        elif kind is wire.EnvelopeType.ERROR:
            await self._on_error(envelope)
        elif kind is wire.EnvelopeType.REVOCATIONS:
            await self._on_revocations(link, envelope, log)

    async def _receive_message(self, link: Link, envelope: wire.Envelope, sender_keys: Any) -> None:
        sender = envelope.sender
        now = self._clock.time()
        replay_id = hashlib.sha256(sender.encode() + envelope.message_id).digest()
        if replay_id in self._staged_ids:
            return  # a copy is being committed; its ACK follows the commit
        if envelope.type is not wire.EnvelopeType.MESSAGE:
            self._settle()  # X3DH consumes prekeys and replaces the session: not batched
        try:
            self._state.replay_window.check(replay_id, envelope.timestamp_ms, int(now * 1000))
        except DuplicateMessage:
            audited = self._audit_noisy(
                AuditKind.REPLAY_DROPPED, {"id": envelope.message_id}, sender
            )
            self.metrics.replay_dropped()
            _log.log(
                logging.WARNING if audited else logging.DEBUG,
                "dropped a replayed message from %s (acknowledged again)",
                sender,
                extra={
                    "event": "replay_dropped",
                    "peer_id": sender,
                    "message_id": envelope.message_id.hex(),
                },
            )
            await self._answer(link, envelope, ack=wire.AckStatus.DUPLICATE)
            return
        except StaleMessage as exc:
            self._audit(
                AuditKind.PEER_REJECTED, {"id": envelope.message_id, "reason": "stale"}, sender
            )
            skewed = envelope.timestamp_ms > int(now * 1000)
            await self._refuse(
                link,
                envelope,
                wire.ErrorCode.STALE,
                str(exc)[:200],
                event="clock_skew" if skewed else "stale_message",
            )
            return
        capability_id = None
        if not self._accept_open:
            try:
                capability_id = await self._authorize(envelope)
            except CapabilityDenied as exc:
                self._audit(
                    AuditKind.CAPABILITY_DENIED,
                    {"id": envelope.message_id, "reason": type(exc).__name__},
                    sender,
                )
                self.metrics.capability_denied(exc)
                code = (
                    wire.ErrorCode.UNAVAILABLE
                    if isinstance(exc, RevocationListStale)
                    else wire.ErrorCode.CAPABILITY_DENIED
                )
                await self._refuse(link, envelope, code, str(exc)[:200])
                return
        if self._we_keep_our_handshake(envelope):
            await self._refuse(
                link, envelope, wire.ErrorCode.UNAVAILABLE, "both sides opened a session; use mine"
            )
            return
        try:
            plaintext, successor, prekeys, established = self._decrypt(envelope, sender_keys)
            data = decode_payload(plaintext)
        except (CryptoError, SessionError, RemoteProtocolError) as exc:
            self.metrics.session_failed()
            self._audit(
                AuditKind.DECRYPTION_FAILURE,
                {"id": envelope.message_id, "reason": type(exc).__name__},
                sender,
            )
            await self._refuse(
                link, envelope, wire.ErrorCode.DECRYPT_FAILED, "cannot decrypt; re-establish"
            )
            return
        del data  # decoded only to refuse undecodable payloads before committing
        if not established:
            # Committed with whatever else arrives in this event-loop tick (one
            # fsync for all), then acknowledged: see _flush_receives.
            self._stage_receive(link, envelope, replay_id, plaintext, successor, capability_id)
            return
        audit: list[tuple[str, dict[str, Any], str | None]] = [
            (
                AuditKind.MESSAGE_RECEIVED,
                {"id": envelope.message_id, "sha256": hashlib.sha256(plaintext).digest()},
                sender,
            )
        ]
        if established:
            audit.append((AuditKind.SESSION_ESTABLISHED, {"role": "responder"}, sender))
        self._state.commit_receive(
            sender,
            session=_session_record(successor, None),
            replay_id=replay_id,
            timestamp_ms=envelope.timestamp_ms,
            message=InboxMessage(
                sender=sender,
                message_id=envelope.message_id,
                data=plaintext,
                sent_at_ms=envelope.timestamp_ms,
                received_at_ms=time_ms(self._clock),
                capability_id=capability_id,
            ),
            prekeys=None if prekeys is None else prekeys.to_bytes(),
            audit=audit,
        )
        self._sessions[sender] = (successor, None)
        self.metrics.message_received(len(plaintext))
        if established:
            self.metrics.session_established()
        if prekeys is not None:
            self._prekeys = prekeys
        await self._answer(link, envelope, ack=wire.AckStatus.ACCEPTED)
        self._inbox_ready.set()

    def _stage_receive(
        self,
        link: Link,
        envelope: wire.Envelope,
        replay_id: bytes,
        plaintext: bytes,
        successor: Session,
        capability_id: bytes | None,
    ) -> None:
        """Hold a decrypted message for the next group commit (nothing is output yet).

        Until then ``successor`` is the session later frames from this sender
        are decrypted with (so a batch chains), but nothing else may use it:
        every other reader of sessions settles the batch first (:meth:`_settle`).
        """
        sender = envelope.sender
        self._staged_sessions[sender] = successor
        self._staged_ids.add(replay_id)
        received = Received(
            sender,
            _session_record(successor, None),
            replay_id,
            envelope.timestamp_ms,
            InboxMessage(
                sender=sender,
                message_id=envelope.message_id,
                data=plaintext,
                sent_at_ms=envelope.timestamp_ms,
                received_at_ms=time_ms(self._clock),
                capability_id=capability_id,
            ),
            audit=[
                (
                    AuditKind.MESSAGE_RECEIVED,
                    {"id": envelope.message_id, "sha256": hashlib.sha256(plaintext).digest()},
                    sender,
                )
            ],
        )
        self._staged.append((received, link, envelope))
        if len(self._staged) == 1:
            asyncio.get_running_loop().call_soon(self._settle)

    def _settle(self) -> None:
        """Commit the staged receives in one transaction, then acknowledge them.

        If the commit fails nothing is acknowledged and the staged sessions
        are forgotten: the sender retries, and the messages are decrypted
        again from the committed state.
        """
        staged, self._staged = self._staged, []
        sessions, self._staged_sessions = self._staged_sessions, {}
        self._staged_ids = set()
        if not staged:
            return
        try:
            self._state.commit_receive_many([received for received, _, _ in staged])
        except TalosError as exc:
            _log.warning(
                "%d received messages not committed (the senders will retry): %s",
                len(staged),
                exc,
            )
            return
        for peer, session in sessions.items():
            self._sessions[peer] = (session, None)
        for received, _, _ in staged:
            self.metrics.message_received(len(received.message.data))
        task = asyncio.create_task(
            self._acknowledge_staged([(link, envelope) for _, link, envelope in staged])
        )
        self._acknowledging.add(task)
        task.add_done_callback(self._acknowledging.discard)

    async def _acknowledge_staged(self, answers: list[tuple[Link, wire.Envelope]]) -> None:
        """ACK committed messages, then tell receive() they are there (so an
        application that stops once it has them does not cut the ACKs short)."""
        try:
            for link, envelope in answers:
                await self._answer(link, envelope, ack=wire.AckStatus.ACCEPTED)
        finally:
            self._inbox_ready.set()

    async def _authorize(self, envelope: wire.Envelope) -> bytes:
        """Check the attached capability; returns its id.

        Before checking, the key logs of every issuer in the chain are looked
        up, and any issuer whose revocation list is older than the policy's
        ``max_age`` is synchronized from the registry (if it can be reached).

        Raises:
            CapabilityDenied: missing or not valid for this sender and agent.
        """
        self._refresh_own_revocations()
        if envelope.capability_ref is None:
            raise ScopeMismatch("no capability attached; this agent requires one")
        try:
            token = Capability.from_bytes(envelope.capability_ref)
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise ScopeMismatch(f"attached capability is malformed: {exc}") from None
        for issuer in {link.issuer for link in token.chain()} - {self.agent_id}:
            with contextlib.suppress(TalosError):
                await self._peers.keylog(issuer)
            await self._sync_revocations(issuer)
        self._check_token(token, audience=self.agent_id, holder=envelope.sender)
        return token.token_id

    async def _sync_revocations(self, issuer: str) -> None:
        """Fetch ``issuer``'s list from the registry when ours is older than ``max_age``."""
        now = self._clock.time()
        synced = self._revocations.last_synced(issuer)
        fresh = synced is not None and now - synced <= self._revocation_policy.max_age
        if fresh or self._registry is None:
            return
        log = self._peers.known_log(issuer)
        if log is None:
            return
        try:
            offered = await self._registry.fetch_revocations(issuer, IssuerKeys([log]))
        except TalosError as exc:
            _log.info("revocation list of %s not refreshed: %s", issuer, exc)
            return
        if offered is not None:
            result = self._revocations.apply(offered, keys=IssuerKeys([log]))
            if result.security_event:
                self._audit("REVOCATION_CONFLICT", {"outcome": result.outcome.name}, issuer)
            kept = self._revocations.list_for(issuer)
            if kept is not None:
                assert self._tokens is not None  # noqa: S101 -- open while the client is
                self._tokens.put_revocation_list(issuer, kept.to_bytes(), synced_at=now)
        self._revocations.mark_synced(issuer, now)
        self.metrics.set_revocation_list_age(self._revocations.revocation_list_age_seconds(now))

    def _we_keep_our_handshake(self, envelope: wire.Envelope) -> bool:
        """Tie-break when both agents started a session with each other at once.

        Each side holds its own initiator session (not yet acknowledged) and
        receives the other's X3DH initial message. The agent with the lower
        id keeps its own: it answers UNAVAILABLE (retry later, not a reset),
        and the other adopts the winner's session when that initial message
        arrives, then re-sends in it.
        """
        if envelope.type is not wire.EnvelopeType.INITIAL or self.agent_id > envelope.sender:
            return False
        current = self._session(envelope.sender)
        return current is not None and current[1] is not None

    def _decrypt(
        self, envelope: wire.Envelope, sender_keys: Any
    ) -> tuple[bytes, Session, PrekeyStore | None, bool]:
        """Decrypt without committing: plaintext, successor session, new prekeys, new session?"""
        now = self._clock.time()
        if envelope.type is wire.EnvelopeType.INITIAL:
            header = InitialHeader.from_bytes(envelope.x3dh_header or b"")
            response = respond(
                self._prekeys,
                header,
                peer_agent_id=envelope.sender,
                peer_signing_key=sender_keys.signing_key.raw,
                peer_identity_dh=sender_keys.dh_key,
            )
            session = Session.responder(
                response.shared_key, response.associated_data, response.our_ratchet_key, self._rng
            )
            plaintext, successor = session.decrypt_uncommitted(
                envelope.ratchet_header, envelope.ciphertext, now=now
            )
            return plaintext, successor, response.store, True
        staged = self._staged_sessions.get(envelope.sender)
        if staged is not None:
            current: tuple[Session, bytes | None] | None = (staged, None)
        else:
            current = self._committed_session(envelope.sender)
        if current is None:
            raise SessionError(f"no session with {envelope.sender}")
        plaintext, successor = current[0].decrypt_uncommitted(
            envelope.ratchet_header, envelope.ciphertext, now=now
        )
        return plaintext, successor, None, False

    async def _answer(self, link: Link, envelope: wire.Envelope, *, ack: wire.AckStatus) -> None:
        reply = wire.Envelope(
            type=wire.EnvelopeType.ACK,
            message_id=wire.new_message_id(self._rng),
            sender=self.agent_id,
            sender_instance=self._instance,
            recipient=envelope.sender,
            timestamp_ms=time_ms(self._clock),
            ref_id=envelope.message_id,
            status=ack,
        )
        with contextlib.suppress(PeerUnreachable):
            await link.send(wire.seal(reply, self._identity.signing_key))

    async def _refuse(
        self,
        link: Link,
        envelope: wire.Envelope,
        code: wire.ErrorCode,
        reason: str,
        *,
        event: str | None = None,
    ) -> None:
        _log.log(
            logging.WARNING if code in _SECURITY_REFUSALS else logging.INFO,
            "refusing a message from %s: %s (%s)",
            envelope.sender,
            code.name,
            reason,
            extra={
                "event": event or _REFUSAL_EVENTS.get(code, "refused"),
                "peer_id": envelope.sender,
                "message_id": envelope.message_id.hex(),
                "code": code.name,
            },
        )
        reply = wire.Envelope(
            type=wire.EnvelopeType.ERROR,
            message_id=wire.new_message_id(self._rng),
            sender=self.agent_id,
            sender_instance=self._instance,
            recipient=envelope.sender,
            timestamp_ms=time_ms(self._clock),
            ref_id=envelope.message_id,
            error_code=code,
            reason="".join(c for c in reason if c.isprintable())[:200] or code.name,
        )
        with contextlib.suppress(PeerUnreachable):
            await link.send(wire.seal(reply, self._identity.signing_key))

    def _queued_for(self, ref: bytes | None, peer: str) -> bool:
        """Whether ``ref`` is a message we queued for ``peer`` and still wait on."""
        if ref is None:
            return False
        try:
            return self._state.is_queued_for(ref, peer)
        except LocalProtocolError:
            return False  # not an id (or peer id) this agent could have queued

    def _on_ack(self, envelope: wire.Envelope) -> None:
        ref = envelope.ref_id
        if ref is None or ref in self._removing or not self._queued_for(ref, envelope.sender):
            return  # not ours, not from the peer we sent it to, or already acknowledged
        # ACKs that arrive together are removed from the outbox in one commit.
        self._removing[ref] = envelope
        if len(self._removing) == 1:
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        """Remove acknowledged messages in one commit, then release their senders."""
        acks, self._removing = self._removing, {}
        if not acks:
            return
        try:
            self._state.remove_many(
                [
                    (
                        ref,
                        [
                            (
                                AuditKind.MESSAGE_DELIVERED,
                                {"id": ref, "status": int(ack.status or 0)},
                                ack.sender,
                            )
                        ],
                    )
                    for ref, ack in acks.items()
                ]
            )
        except TalosError as exc:
            # Still queued: the retry is answered DUPLICATE and removal is tried again.
            _log.warning("acknowledged messages not removed from the outbox: %s", exc)
            return
        for ref, ack in acks.items():
            self._delivered(ref, ack)
        self.metrics.set_queue_depth(self.queue_depth())

    def _delivered(self, ref: bytes, envelope: wire.Envelope) -> None:
        self._failures.pop(ref, None)
        self._clock_sample(envelope)
        self.metrics.message_delivered()
        self._settle()
        current = self._sessions.get(envelope.sender)
        if current is not None and current[1] is not None:
            # The peer holds the session now: later messages need no X3DH header.
            session = current[0]
            self._state.put_session(envelope.sender, _session_record(session, None))
            self._sessions[envelope.sender] = (session, None)
        self._nacks.pop(ref, None)
        future = self._acks.pop(ref, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _clock_sample(self, envelope: wire.Envelope) -> None:
        """Estimate the peer's clock offset from a signed ACK to a message we timed."""
        assert envelope.ref_id is not None  # noqa: S101 -- checked by the caller
        sent = self._sent_at.pop(envelope.ref_id, None)
        if sent is None:
            return
        theirs = envelope.timestamp_ms / 1000
        best = self._peer_clocks.add(
            envelope.sender, offset_from(sent, theirs, theirs, self._clock.time())
        )
        self._warn_clock(envelope.sender, -best.offset)
        if self.registry_offset is None:
            offsets = sorted(-s.offset for s in self._peer_clocks.estimates().values())
            self.metrics.set_clock_offset(offsets[len(offsets) // 2])

    async def _on_error(self, envelope: wire.Envelope) -> None:
        ref, peer = envelope.ref_id, envelope.sender
        if ref is None or not self._queued_for(ref, peer):
            return
        if envelope.error_code is wire.ErrorCode.UNAVAILABLE:
            nack = self._nacks.get(ref)
            if nack is not None:
                nack.set()  # not a refusal: the delivery task retries with backoff
            return
        if envelope.error_code is wire.ErrorCode.DECRYPT_FAILED:
            now = self._clock.time()
            if now - self._last_reset.get(peer, -RESET_INTERVAL) >= RESET_INTERVAL:
                self._last_reset[peer] = now
                self._settle()
                self._sessions.pop(peer, None)
                self.metrics.session_reset()
                self._state.drop_session(
                    peer,
                    audit=[(AuditKind.SESSION_RESET, {"reason": "peer could not decrypt"}, peer)],
                )
            nack = self._nacks.get(ref)
            if nack is not None:
                nack.set()  # the waiting delivery retries with a fresh session
            return
        reason = envelope.reason or envelope.error_code.name if envelope.error_code else "refused"
        self.metrics.message_rejected(envelope.error_code or "other")
        self._state.remove(
            ref,
            audit=[(AuditKind.PEER_REJECTED, {"id": ref, "reason": str(reason)[:200]}, peer)],
        )
        self._nacks.pop(ref, None)
        self._failures.pop(ref, None)
        self._sent_at.pop(ref, None)
        future = self._acks.pop(ref, None)
        if future is not None and not future.done():
            future.set_exception(PeerRejected(f"{peer} refused the message: {reason}"))

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


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's outcome as seen (queued sends may be refused much later)."""
    if not future.cancelled():
        future.exception()


def _parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def _session_record(session: Session, x3dh: bytes | None) -> bytes:
    return canonical_dumps({"v": 1, "s": session.to_bytes(), "x": x3dh})


def _load_session(data: bytes, rng: Rng) -> tuple[Session, bytes | None]:
    raw = strict_versioned_map(
        data, max_size=16 << 20, fields=_SESSION_FIELDS, version=1, what="session record"
    )
    if type(raw["s"]) is not bytes or not (raw["x"] is None or type(raw["x"]) is bytes):
        raise MalformedFrame("session record fields have the wrong types")
    return Session.from_bytes(raw["s"], rng=rng), raw["x"]


def _message(item: InboxMessage, inbox_seq: int | None = None) -> Message:
    return Message(
        sender=item.sender,
        message_id=item.message_id,
        data=decode_payload(item.data),
        sent_at=item.sent_at_ms / 1000,
        capability_id=item.capability_id,
        inbox_seq=inbox_seq,
    )
