"""Assembling an agent's drivers from its opened resources.

:func:`assemble` builds every driver of :class:`~talos.client.TalosClient`
and hands each its collaborators through its constructor; nothing here
does I/O. The resources it takes (audit log, agent state, token store,
transport, discovery) are opened, and closed, by the client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from talos.audit import AuditLog
from talos.audit.mirror_store import MirrorStore
from talos.client.acks import Acknowledgements
from talos.client.clocks import ClockWatch
from talos.client.config import ClientConfig
from talos.client.control import Auditor, Signer
from talos.client.delivery import Deliverer
from talos.client.discovery import Discovery
from talos.client.inbox import InboxReader
from talos.client.keylogs import KeyLogs
from talos.client.mirroring import Mirroring
from talos.client.own_keys import OwnIdentity
from talos.client.presence import PresenceAnswers
from talos.client.receiving import ReceiveBatch, Receiver
from talos.client.revocations import Capabilities
from talos.client.sending import Sender
from talos.client.sessions import Sessions
from talos.client.witnessing import Witnessing
from talos.core.sessions import SessionTable
from talos.metrics import AgentMetrics
from talos.peers import DhtSource, PeerDirectory, RecordSource, RegistrySource
from talos.storage.agent_state import AgentState
from talos.storage.tokens import TokenStore
from talos.transport import Transport


@dataclass(frozen=True, slots=True)
class Parts:
    """The drivers of one agent (see talos.client.api for what each does)."""

    own: OwnIdentity
    peers: PeerDirectory
    capabilities: Capabilities
    sessions: Sessions
    inbox: InboxReader
    batch: ReceiveBatch
    deliverer: Deliverer
    acks: Acknowledgements
    sender: Sender
    receiver: Receiver
    keylogs: KeyLogs
    witnessing: Witnessing
    mirroring: Mirroring | None = None
    auditor: Auditor | None = None
    presence: PresenceAnswers | None = None


@dataclass(frozen=True, slots=True)
class Foundation:
    """What the drivers are built on: the opened resources (opened and closed by
    :class:`~talos.client.resources.Resources`) and what the client holds from its
    construction on."""

    config: ClientConfig
    own: OwnIdentity
    instance: bytes
    log: AuditLog
    state: AgentState
    tokens: TokenStore
    discovery: Discovery
    transport: Transport
    metrics: AgentMetrics
    clocks: ClockWatch
    closed: Callable[[], bool]
    mirrors: MirrorStore | None = None


def peer_directory(
    config: ClientConfig, state: AgentState, own: OwnIdentity, discovery: Discovery
) -> PeerDirectory:
    """Verified peers: the local cache first, then the sources in ``config``'s order."""
    sources: list[RecordSource] = []
    for name in config.discovery:
        if name == "registry" and discovery.registry is not None:
            sources.append(RegistrySource(discovery.registry))
        elif name == "dht" and discovery.dht is not None:
            sources.append(DhtSource(discovery.dht, config.clock))
    return PeerDirectory(
        state,
        sources,
        clock=config.clock,
        own=own.current.keylog,
        on_source_down=discovery.source_down,
        on_source_up=discovery.source_up,
    )


def assemble(base: Foundation) -> Parts:
    """The drivers over ``base``, each handed its collaborators."""
    config, own, instance, closed = base.config, base.own, base.instance, base.closed
    log, state, tokens, mirrors = base.log, base.state, base.tokens, base.mirrors
    discovery, transport = base.discovery, base.transport
    metrics, clocks = base.metrics, base.clocks
    clock, rng = config.clock, config.rng
    peers = peer_directory(config, state, own, discovery)
    auditor = Auditor(log, clock, metrics)
    peers.on_signature_failure = lambda signed: metrics.signature_failed("bad_signature", signed)
    signer = Signer(own, instance, clock, rng)
    capabilities = Capabilities(
        own=own,
        tokens=tokens,
        peers=peers,
        registry=discovery.registry,
        policy=config.revocation_policy,
        clock=clock,
        metrics=metrics,
        auditor=auditor,
        signer=signer,
    )
    table = SessionTable()
    inbox = InboxReader(state, clock, closed)
    batch = ReceiveBatch(table=table, state=state, inbox=inbox, signer=signer, metrics=metrics)
    sessions = Sessions(
        table=table,
        state=state,
        own=own,
        peers=peers,
        metrics=metrics,
        rng=rng,
        settle=batch.settle,
        fetch_bundle=discovery.fetch_bundle,
        first_contact=discovery.first_contact,
        clock=config.clock,
    )
    deliverer = Deliverer(
        own=own,
        instance=instance,
        state=state,
        sessions=sessions,
        peers=peers,
        transport=transport,
        capabilities=capabilities,
        metrics=metrics,
        clock=clock,
        rng=rng,
        backoff=config.backoff,
        closed=closed,
        offline=config.offline,
    )
    keylogs = KeyLogs(
        own=lambda: own.current.keylog,
        peers=peers,
        sessions=sessions,
        signer=signer,
        auditor=auditor,
        metrics=metrics,
        clock=clock,
        outgoing=deliverer.links,
        on_sessions_dropped=deliverer.resend,
    )
    witnessing = Witnessing(
        own=own,
        log=log,
        tokens=tokens,
        signer=signer,
        auditor=auditor,
        metrics=metrics,
        clock=clock,
        connect=deliverer.link,
        witnesses=config.audit.witnesses,
        max_origins=config.audit.witness_max_origins,
        session_peers=state.session_peers,
    )

    # On a link we open, our key log goes first (nothing may overtake it); our
    # checkpoint follows once the messages waiting for the link are out.
    deliverer.on_connected = keylogs.offer
    transport.on_hello = keylogs.prefetch
    deliverer.on_settled = witnessing.offer_safely
    acks = Acknowledgements(
        core=deliverer.core,
        state=state,
        sessions=sessions,
        metrics=metrics,
        clocks=clocks,
        clock=clock,
        finish=deliverer.finish,
        wake=deliverer.wake,
        closed=closed,
    )
    sender = Sender(
        agent_id=own.agent_id,
        state=state,
        sessions=sessions,
        deliverer=deliverer,
        capabilities=capabilities,
        peers=peers,
        metrics=metrics,
        clock=clock,
        rng=rng,
        queue_limit=config.queue_limit,
        offline=config.offline,
        closed=closed,
    )
    receiver = Receiver(
        agent_id=own.agent_id,
        state=state,
        sessions=sessions,
        batch=batch,
        inbox=inbox,
        peers=peers,
        capabilities=None if config.accept_open else capabilities,
        signer=signer,
        auditor=auditor,
        metrics=metrics,
        clock=clock,
        rng=rng,
        on_ack=acks.on_ack,
        on_error=acks.on_error,
        on_revocations=capabilities.on_revocations,
        keylogs=keylogs,
        witnessing=witnessing,
    )
    mirroring = None
    if mirrors is not None:
        mirroring = Mirroring(
            own=own,
            log=log,
            store=mirrors,
            mirror_to=config.audit.mirror_to,
            serve=config.audit.mirror_quota_bytes > 0,
            mirror_for=config.audit.mirror_for,
            rng=rng,
            signer=signer,
            link=deliverer.link,
            metrics=metrics,
            clock=clock,
            closed=closed,
        )
        receiver.on_mirror = mirroring.on_mirror
    presence = PresenceAnswers(own=own, instance=instance, metrics=metrics, clock=clock, rng=rng)
    receiver.on_presence = presence.on_presence
    return Parts(
        own,
        peers,
        capabilities,
        sessions,
        inbox,
        batch,
        deliverer,
        acks,
        sender,
        receiver,
        keylogs,
        witnessing,
        mirroring,
        auditor,
        presence,
    )
