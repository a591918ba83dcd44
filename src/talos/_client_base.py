"""ClientBase: the state and cross-part methods every part of :class:`TalosClient` uses.

:class:`~talos.client.TalosClient` is assembled from mixins, one module per
flow: :mod:`talos._sending` (send path), :mod:`talos._receiving` (receive
path) and :mod:`talos._revocation_exchange` (revocation lists between
agents). This base declares, as annotations only, the attributes
``TalosClient.__init__`` and ``_open`` fill in, and (for the type checker
only) the methods one part calls in another, so each mixin type-checks on
its own. It also holds what the parts share: sending a signed control
envelope and the session record helpers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref
from typing import TYPE_CHECKING, Any, Final

from talos.audit import AuditLog
from talos.audit.config import AuditConfig
from talos.core import wire
from talos.core.backoff import Backoff
from talos.core.capability import Capability
from talos.core.clock import Clock, time_ms
from talos.core.clocksync import InstanceTracker, PeerClocks
from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.ratchet import Session
from talos.core.ratelimit import RateLimiter
from talos.core.revocation import RevocationPolicy, RevocationState
from talos.core.rng import Rng
from talos.core.x3dh import PrekeyBundle, PrekeyStore
from talos.discovery.dht import DhtNode
from talos.discovery.registry_client import RegistryClient
from talos.errors import MalformedFrame, PeerUnreachable
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.storage.agent_state import AgentState, Enqueue, InboxMessage, Received
from talos.storage.home import AgentHome
from talos.storage.tokens import TokenStore
from talos.transport import Link, Transport

#: A peer's messages in flight: message id -> (outbox seq, ACK deadline on the
#: loop clock, payload bytes).
InFlight = dict[bytes, tuple[int, float, int]]

#: Fields of a stored session record.
_SESSION_FIELDS: Final = frozenset({"v", "s", "x"})


class ClientBase:
    """What the parts of :class:`~talos.client.TalosClient` share (annotations only).

    Set in ``TalosClient.__init__`` (and ``_open``); see there for what each holds.
    """

    _name: str
    _home: AgentHome
    _discovery: list[str]
    _registry_url: str | None
    _dht_bootstrap: list[tuple[str, int]]
    _dht_port: int
    _dht: DhtNode | None
    _listen: tuple[str, int]
    _offline: bool
    _queue_limit: int
    _backoff: Backoff
    _replay_window: float
    _revocation_policy: RevocationPolicy
    _audit_config: AuditConfig
    _accept_open: bool
    _passphrase: bytes | None
    _clock: Clock
    _rng: Rng
    _instance: bytes
    _closed: bool
    _identity: Identity
    _log: AuditLog | None
    _state: AgentState
    _tokens: TokenStore | None
    _registry: RegistryClient | None
    _peers: PeerDirectory
    _prekeys: PrekeyStore
    _transport: Transport | None
    _endpoint: str
    _links: dict[str, Link]
    _sessions: dict[str, tuple[Session, bytes | None]]
    _acks: dict[bytes, asyncio.Future[None]]
    _nacks: dict[bytes, asyncio.Event]
    _noisy_audits: RateLimiter
    _unknown_lookups: RateLimiter
    _answered: weakref.WeakSet[Link]
    _failures: dict[bytes, int]
    _failure_tick: asyncio.Future[None] | None
    _enqueues: list[tuple[Enqueue, asyncio.Future[None]]]
    _staged: list[tuple[Received, Link, wire.Envelope]]
    _staged_sessions: dict[str, Session]
    _staged_ids: set[bytes]
    _acknowledging: set[asyncio.Task[None]]
    _removing: dict[bytes, wire.Envelope]
    _removal_running: dict[bytes, wire.Envelope]
    _remover: asyncio.Task[None] | None
    _flushers: dict[str, asyncio.Task[None]]
    _wakeups: dict[str, asyncio.Event]
    _inflight: dict[str, InFlight]
    _outgoing: dict[str, list[tuple[bytes, bytes]]]
    _inbox_ready: asyncio.Event
    _takers: collections.deque[asyncio.Future[InboxMessage]]
    _inbox_cursor: int
    _read_ahead: collections.deque[tuple[int, InboxMessage]] | None
    _read_ahead_bytes: int
    _last_reset: dict[str, float]
    _revocations: RevocationState
    _sent_at: dict[bytes, float]
    _handshake_of: dict[bytes, bytes]
    _peer_clocks: PeerClocks
    _clock_warned: dict[str, float]
    registry_offset: float | None
    _instances: InstanceTracker
    _background: set[asyncio.Task[Any]]
    registry_reachable: bool | None
    metrics: AgentMetrics
    _metrics_port: int | None

    if TYPE_CHECKING:
        # Defined in TalosClient (talos.client).
        @property
        def agent_id(self) -> str: ...
        def queue_depth(self) -> int: ...
        async def establish_session(
            self, peer_id: str, bundle: PrekeyBundle | None = None
        ) -> None: ...
        def _session(self, peer: str) -> tuple[Session, bytes | None] | None: ...
        def _committed_session(self, peer: str) -> tuple[Session, bytes | None] | None: ...
        def _warn_clock(self, reference: str, ours_minus_theirs: float) -> None: ...
        def _audit_noisy(self, kind: str, data: dict[str, Any], peer: str) -> bool: ...
        def _audit(self, kind: str, data: dict[str, Any], peer: str | None) -> None: ...

        # Defined in SendingMixin (talos._sending).
        def _check_token(self, token: Capability, *, audience: str, holder: str) -> None: ...
        def _on_ack(self, envelope: wire.Envelope) -> None: ...
        async def _on_error(self, envelope: wire.Envelope) -> None: ...

        # Defined in ReceivingMixin (talos._receiving).
        def _settle(self) -> None: ...

        # Defined in RevocationExchangeMixin (talos._revocation_exchange).
        def _refresh_own_revocations(self) -> None: ...
        async def _offer_revocations(self, link: Link, peer: str) -> None: ...
        async def _on_revocations(
            self, link: Link, envelope: wire.Envelope, log: KeyLog
        ) -> None: ...

    async def _send_signed(
        self, link: Link, recipient: str, kind: wire.EnvelopeType, **fields: Any
    ) -> None:
        """Sign and send a control envelope (ACK, ERROR, REVOCATIONS) on ``link``,
        best effort: a link that dropped meanwhile is not an error."""
        envelope = wire.Envelope(
            type=kind,
            message_id=wire.new_message_id(self._rng),
            sender=self.agent_id,
            sender_instance=self._instance,
            recipient=recipient,
            timestamp_ms=time_ms(self._clock),
            **fields,
        )
        with contextlib.suppress(PeerUnreachable):
            await link.send(wire.seal(envelope, self._identity.signing_key))


def _session_record(session: Session, x3dh: bytes | None) -> bytes:
    return canonical_dumps({"v": 1, "s": session.to_bytes(), "x": x3dh})


def _load_session(data: bytes, rng: Rng) -> tuple[Session, bytes | None]:
    raw = strict_versioned_map(
        data, max_size=16 << 20, fields=_SESSION_FIELDS, version=1, what="session record"
    )
    if type(raw["s"]) is not bytes or not (raw["x"] is None or type(raw["x"]) is bytes):
        raise MalformedFrame("session record fields have the wrong types")
    return Session.from_bytes(raw["s"], rng=rng), raw["x"]
