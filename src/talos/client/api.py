"""TalosClient: one agent — identity, sessions, durable delivery, audit.

The public API and the composition root: every public method delegates to
the part that owns its concern, opened by
:class:`~talos.client.resources.Resources` and wired by
:func:`~talos.client.wiring.assemble` (``docs/design/layout.md`` says who
owns what). The decisions those parts act on are pure and live in
:mod:`talos.core`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

from talos.client import contacts
from talos.client.config import ClientConfig
from talos.client.discovery import RECORD_LIFETIME
from talos.client.grants import CapabilityInfo, RevokedToken
from talos.client.outbox import QueuedEntry
from talos.client.outcomes import MessageOutcome
from talos.client.own_keys import Rotation
from talos.client.resources import Creating, Opened, Resources
from talos.client.rotation import key_summary
from talos.client.sending import SendResult
from talos.client.status import known_peer_rows, status_report
from talos.client.wiring import Parts
from talos.core.capability import Capability
from talos.core.clock import Clock
from talos.core.message import Message
from talos.core.peer_record import PeerRecord
from talos.core.revocation import DEFAULT_GRACE
from talos.core.rng import Rng
from talos.core.x3dh import PrekeyBundle
from talos.errors import LocalProtocolError
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG

__all__ = [
    "CapabilityInfo",
    "MessageOutcome",
    "QueuedEntry",
    "RevokedToken",
    "SendResult",
    "TalosClient",
]


class TalosClient:
    """One agent: its identity, its sessions with peers, its durable outbox and
    inbox, and its audit log.

    Create it with :meth:`create`, as an async context manager that closes it
    at the end, or awaited (then call :meth:`close`)::

        async with TalosClient.create("alice", home="alice-home", registry_url=url) as alice:
            await alice.send(bob_id, {"tool": "search"}, capability=token)
            message = await alice.receive(timeout=10)

    Sending: :meth:`send`, then :meth:`outcome`, :meth:`outbox`, :meth:`cancel`.
    Receiving: :meth:`receive`, :meth:`messages`, :meth:`acknowledge`.
    Introductions without a registry: :meth:`contact_card`, :meth:`add_contact`,
    :meth:`get_prekey_bundle`, :meth:`establish_session`. The guide
    (``docs/guide/``) says what each call guarantees.
    """

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
    ) -> Creating[TalosClient]:
        """Open (or create) the agent in ``home`` and start it.

        The first start in an empty ``home`` creates the agent's identity
        there (its key file, sealed with ``passphrase`` if given, else with a
        local key readable only by the owner); later starts load it. ``name``
        is a label stored with a new identity; the identity is
        :attr:`agent_id`. Awaited it returns the started client; used as
        ``async with`` it also closes it on exit.

        Args:
            name: the label of a new identity (ignored once one exists).
            home: the agent's directory; default ``$TALOS_HOME`` or ``~/.talos``.
            registry_url: the registry (one URL, or replicas of one registry).
            listen: ``HOST:PORT`` to accept peers on (port 0: any free port).
            announce: the ``HOST[:PORT]`` peers are told to connect to.
            discovery: where unknown peers are looked up, in order.
            dht_bootstrap: ``(host, port)`` of DHT nodes to join through.
            dht_port: the UDP port of this agent's DHT node (0: any).
            offline_mode: no network at all (docs/guide/offline.md).
            queue_limit: the most messages the outbox holds (``send`` then
                raises :class:`~talos.errors.QueueFull`).
            reconnect_interval: the longest wait between delivery attempts
                to an unreachable peer, in seconds (backoff grows up to it).
            replay_window: seconds within which a repeated message is
                recognized and dropped; an older one is refused as stale.
            revocation_mode: ``"strict"``, ``"permissive"`` or ``"offline"``:
                how a revocation list older than ``revocation_max_age``
                seconds is treated when a capability is checked
                (docs/design/capabilities.md).
            revocation_max_age: see ``revocation_mode``.
            revocation_grace: in ``permissive`` mode, how many seconds past
                ``revocation_max_age`` a stale list is still accepted
                (default 3600). Each acceptance on a stale list is logged
                (``revocation_list_stale_accepted``) and counted
                (``talos_revocation_stale_accepted_total``).
            audit_config: the audit log's settings (``max_size_gb``,
                ``block_entries``, ``block_seconds``, ``witnesses``,
                ``mirror_to``, ``mirror_quota_mb``, ``prune_after_anchor``).
            metrics_port: serve Prometheus metrics on this port (0: any).
            accept_policy: ``"capability"`` (default): a message must carry a
                capability this agent issued; ``"open"``: any verified peer
                may send.
            passphrase: the key file's passphrase (``None``: a local key).
            clock: the time source of every timer and deadline.
            rng: the source of every id and key.
            anchor: anchoring of the audit log on a chain (see below).

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
        options = dict(locals())
        return Creating(lambda: TalosClient._start(options))

    # -- start and stop -----------------------------------------------------------------

    @classmethod
    async def _start(cls, options: dict[str, Any]) -> TalosClient:
        client = cls(ClientConfig.from_options(**options))
        try:
            await client._open()
        except BaseException:
            await client.close()
            raise
        return client

    def __init__(self, config: ClientConfig) -> None:
        self._config, self._clock, self._rng = config, config.clock, config.rng
        # Opens and closes everything (talos.client.resources); _open() keeps
        # what the public methods use once everything is up.
        self._resources = Resources(config)
        #: Prometheus collectors of this agent (served on ``metrics_port`` if given).
        self.metrics = self._resources.metrics
        self._opened: Opened | None = None
        self._parts: Parts | None = None

    async def _open(self) -> None:
        agent = self._opened = await self._resources.open()
        # Kept by name too: the tests reach for them.
        self._own, self._log, self._state = agent.own, agent.log, agent.state
        self._peers, self._transport, self._parts = agent.peers, agent.transport, agent.parts

    @property
    def _agent(self) -> Opened:
        if self._opened is None:
            raise LocalProtocolError("the client is not open")
        return self._opened

    @property
    def _drivers(self) -> Parts:
        return self._agent.parts

    @property
    def dht_address(self) -> tuple[str, int] | None:
        """UDP address of this agent's DHT node, if it runs one."""
        return self._resources.dht_address

    @property
    def registry_reachable(self) -> bool | None:
        """Whether the registry answered last time it was asked (``None``: not yet)."""
        return self._resources.registry_reachable

    @property
    def registry_offset(self) -> float | None:
        """Offset of our clock from the registry's (seconds, positive: we are ahead)."""
        return self._resources.clocks.registry_offset

    async def close(self) -> None:
        """Stop delivering, close links and stores, and release the home.

        Queued messages stay queued (on disk) and are delivered after the
        next start; received messages not yet taken stay in the inbox.
        Closing twice does nothing.
        """
        await self._resources.close()

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
                ``retry_count``, ``on_failure``, ``wait`` or ``expires_in``, or a
                ``capability`` that is not a token (checked before any look-up).
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

    async def request(
        self,
        peer_id: str,
        data: Any,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 -- like send(timeout=...)
        retry_count: int = 3,
        capability: str | Capability | None = None,
    ) -> Message:
        """Send ``data`` to ``peer_id`` as a request and return the peer's reply.

        The peer answers with ``await message.reply(answer)``; the reply needs
        no capability of its own: it is authorized by this request (one reply,
        from ``peer_id``, within ``timeout``; docs/design/request-reply.md).
        ``timeout`` (seconds, on the agent's clock) bounds the whole call and
        is the request's expiry: a reply after it is refused. The returned
        :class:`Message` has ``in_reply_to`` set to the request's id.

        Raises:
            InvalidArgument: a malformed ``peer_id``, a bad ``timeout`` or ``retry_count``,
                or a ``capability`` that is not a token.
            DeliveryTimeout: the request itself was not acknowledged in time
                (removed from the outbox).
            ReplyTimeout: the request was delivered but no reply came in time.
            PeerRejected, PeerUnknown, CapabilityDenied, QueueFull, LocalProtocolError:
                as :meth:`send`.
        """
        return await self._agent.requester.request(
            peer_id, data, timeout=timeout, retry_count=retry_count, capability=capability
        )

    async def reply(self, message: Message, data: Any) -> SendResult:
        """Answer the request ``message`` with ``data``; the same as ``message.reply(data)``.

        Returns once the reply is durable in the outbox (it is delivered in the
        background until the request's expiry). One reply per request: called
        again (say, by an at-least-once application after a restart) it sends
        nothing and returns the first reply's id.

        Raises:
            LocalProtocolError: ``message`` is not a request.
            RequestExpired: the request's expiry passed; nothing was sent.
            QueueFull, LocalProtocolError: as :meth:`send`.
        """
        return await self._agent.replies.attach(message).reply(data)  # type: ignore[no-any-return]

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
        return await self._agent.outbox.outcome(message_id, timeout)

    def outbox(self) -> dict[str, list[QueuedEntry]]:
        """The queued messages by peer, oldest first: id, attempts, age, expiry, size.

        Nothing is decrypted; the listing is one read of the outbox.
        """
        return self._agent.outbox.listing()

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
        return await self._agent.outbox.cancel(message_id)

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
        return await self._drivers.inbox.receive(timeout, auto_ack=auto_ack)

    async def acknowledge(self, *messages: Message) -> None:
        """Remove messages received with ``auto_ack=False`` from the durable inbox,
        all in one commit. For eight messages or more it is made in a worker
        thread, so the event loop keeps running while it syncs to disk. Fewer
        ride the agent's next commit (typically the receipt of the next message),
        or are committed alone after 2 ms if none comes: an application that
        acknowledges a request as the next one arrives costs no commit of its own.

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
        """This agent's identity, ``did:talos:z…``: derived from its first key,
        stable across key rotations. Peers address messages to it."""
        return self._agent.own.current.agent_id

    @property
    def endpoint(self) -> str:
        """``ws://host:port`` this agent listens on."""
        return "" if self._opened is None else self._opened.endpoint

    def peer_record(self, *, lifetime: float = RECORD_LIFETIME) -> PeerRecord:
        """A freshly signed record of where this instance listens."""
        return self._resources.peer_record(lifetime=lifetime)

    def contact_card(self) -> bytes:
        """Key log and peer record in one blob, for introductions without a registry."""
        return contacts.card(self._agent.own.current.keylog, self.peer_record())

    def add_contact(self, card: bytes) -> str:
        """Learn a peer from its :meth:`contact_card`; returns its agent id.

        Raises:
            MalformedFrame, UnsupportedVersion: not a contact card.
            KeyLogInvalid: its key log is invalid or forks what we know.
            SignatureInvalid, StaleMessage: its record does not verify now.
        """
        return contacts.learn(self._agent.peers, card)

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
        contacts.require_bundle(peer_id, bundle, offline=self._config.offline)
        deliverer = self._drivers.deliverer
        # The connection opens beside the key agreement, once the peer's key log
        # (and on first contact its record) is known: the first send() finds it open.
        await self._drivers.sessions.establish(
            peer_id, bundle, looked_up=functools.partial(deliverer.prepare_link, peer_id)
        )
        deliverer.kick(peer_id)

    async def reset_session(self, peer_id: str) -> None:
        """Forget the session with ``peer_id``; the next message establishes a new one.

        Queued messages are not lost: they go out under the new session.
        """
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
        rotation = Rotation(reason=reason, emergency=emergency, revoke_old=revoke_old)
        return key_summary(await self._agent.rotator.rotate(rotation))

    # -- status ---------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Messages waiting in the outbox."""
        return self._agent.state.outbox_count()

    def status(self) -> dict[str, Any]:
        """What ``talos status`` shows: identity, endpoint, queue, sessions, registry, clocks.

        ``clock_offset_s`` is our offset from the registry's clock (positive:
        we are ahead); ``peer_clock`` holds each peer's offset from ours
        (positive: the peer is ahead), estimated from signed ACKs.
        """
        return status_report(self._resources, self._agent)

    def known_peers(self) -> list[dict[str, Any]]:
        """Peers with a cached, verified record: what ``talos peers`` lists."""
        agent = self._agent
        return known_peer_rows(agent.state, agent.parts.deliverer.links)

    # -- capabilities in code (talos.client.grants; docs/guide/capabilities.md) ------------

    async def grant(
        self,
        peer_id: str,
        action: str | Sequence[str] = "message.send",
        *,
        expires_in: float,
        resource: str | Sequence[str] = "*",
        delegable: bool = False,
    ) -> str:
        """Grant ``peer_id`` a capability signed by this agent; returns the token (text).

        ``"message.send"`` lets the peer send to this agent (the peer passes
        the token to :meth:`add_capability`); other actions, outside the
        ``message.`` namespace, are the application's to check. The grant is
        audited ``CAPABILITY_GRANTED`` and stored (listed by
        :meth:`capabilities`, revocable by :meth:`revoke`) before it returns.

        Raises:
            InvalidArgument: a bad ``peer_id``, an unknown ``message.`` action, a
                bad resource pattern, ``expires_in`` not 1 s to 3650 days, or a
                ``delegable`` that is not a bool (nothing signed or written).
            AuditFull, StorageError: the grant could not be recorded (not issued).
        """
        token = self._agent.grants.grant(
            peer_id, action, expires_in=expires_in, resources=resource, delegable=delegable
        )
        return token.to_text()

    async def add_capability(
        self, token: str | Capability, *, issuer_logs: Sequence[bytes] = ()
    ) -> CapabilityInfo:
        """Verify and keep a capability another agent granted to this one; from then on
        :meth:`send` to that agent attaches it by itself.

        The issuers' key logs come from discovery (registry, DHT) when they are
        not known here; ``issuer_logs`` may carry them instead (the bytes of
        ``talos whoami --export-log``), e.g. in ``offline_mode``.

        Raises:
            InvalidArgument: ``token`` is not a capability token.
            ScopeMismatch: it was granted to another agent.
            PeerUnknown, PeerNotFound: an issuer's key log cannot be found.
            Expired, NotYetValid, Revoked: it is not valid now.
            CapabilitySignatureInvalid: a signature in its chain does not verify.
        """
        return await self._agent.grants.add(token, issuer_logs=issuer_logs)

    def capabilities(self) -> list[CapabilityInfo]:
        """Every capability this agent granted, then every one it holds, with its state."""
        return self._agent.grants.listing()

    async def revoke(self, token_id: str | bytes, *, reason: str) -> RevokedToken:
        """Revoke a capability this agent granted (``token_id``: its hex id or the token).

        The new version of this agent's revocation list is signed, audited
        ``CAPABILITY_REVOKED`` and stored, and enforced here at once: the next
        message carrying the token is refused. It is then published to the
        registry and offered on every open link this agent made (other peers
        get it when they next connect). Revoking it again changes nothing.

        Raises:
            InvalidArgument: not a token id, a reason that is not 1-512 printable
                characters, or not a token this agent granted.
            AuditFull, StorageError: it could not be recorded (nothing revoked).
        """
        return await self._agent.grants.revoke(token_id, reason=reason)
