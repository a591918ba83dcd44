"""The agent's sessions: loading, opening (X3DH), persisting, resetting.

The in-memory truth is a :class:`~talos.core.sessions.SessionTable`; this
driver keeps it and the durable records in step (persist first, then
update the table) and owns the agent's prekeys, which X3DH consumes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from talos.audit import AuditKind
from talos.client.own_keys import OwnIdentity, discard_sessions
from talos.core.clock import Clock
from talos.core.keylog import KeyLog
from talos.core.ratchet import Session
from talos.core.rng import Rng
from talos.core.sessions import SessionEntry, SessionTable, decode_record, encode_record
from talos.core.x3dh import PrekeyBundle, PrekeyStore, initiate
from talos.errors import (
    CryptoError,
    DiscoveryError,
    MalformedFrame,
    SignatureInvalid,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.storage.agent_state import AgentState

_log = logging.getLogger("talos.client")

#: One-time prekeys kept published at the registry.
ONE_TIME_PREKEYS = 20


class Sessions:
    """Sessions with peers, and this agent's prekeys."""

    def __init__(
        self,
        *,
        table: SessionTable,
        state: AgentState,
        own: OwnIdentity,
        peers: PeerDirectory,
        metrics: AgentMetrics,
        rng: Rng,
        settle: Callable[[], None],
        fetch_bundle: Callable[[str, Awaitable[KeyLog]], Awaitable[PrekeyBundle]],
        clock: Clock,
    ) -> None:
        self.table = table
        self._state, self._own, self._peers = state, own, peers
        self._metrics, self._rng = metrics, rng
        #: Commits the receives staged in the table (see ReceiveBatch.settle).
        self._settle = settle
        self._fetch_bundle = fetch_bundle
        self._clock = clock
        self._prekeys = self._load_prekeys()

    @property
    def prekeys(self) -> PrekeyStore:
        """This agent's prekeys, vouched for by its current signing key."""
        return self._prekeys

    @prekeys.setter
    def prekeys(self, store: PrekeyStore) -> None:
        # A receive that consumed a prekey of the identity a rotation just replaced
        # must not bring the old prekeys back.
        if self._ours(store):
            self._prekeys = store

    def _ours(self, store: PrekeyStore) -> bool:
        return store.identity_signing_key == self._own.current.signing_key.public_key.raw

    def _load_prekeys(self) -> PrekeyStore:
        data = self._state.prekeys()
        if data is not None:
            store = PrekeyStore.from_bytes(data)
            if self._ours(store):
                return store
        return self._new_prekeys()

    def _new_prekeys(self) -> PrekeyStore:
        me = self._own.current
        store = PrekeyStore.create(
            agent_id=me.agent_id,
            signing_key=me.signing_key,
            identity_dh=me.dh_key,
            rng=self._rng,
        ).add_one_time_prekeys(ONE_TIME_PREKEYS, self._rng)
        self._state.put_prekeys(store.to_bytes())
        return store

    def rotated(self) -> list[str]:
        """This agent rotated its keys: every session (committed, awaiting confirmation,
        staged) is discarded and new prekeys are made under the new key; returns the
        peers that had a session. Their next message runs X3DH against the new keys."""
        self._settle()  # staged receives committed: every session is a stored one
        peers = discard_sessions(self._state)
        for peer in peers:
            self.table.drop(peer)
            self._metrics.session_reset()
        self._prekeys = self._new_prekeys()
        return peers

    def current(self, peer: str) -> SessionEntry | None:
        """The session with ``peer`` after committing staged receives."""
        self._settle()
        return self.committed(peer)

    def committed(self, peer: str) -> SessionEntry | None:
        """The committed session with ``peer``; a stored one that is damaged is discarded.

        Seed, "Session State Corruption": a session that cannot be read is
        dropped (audited as SESSION_RESET) and treated as absent, so the
        sender re-establishes and the receiver answers DECRYPT_FAILED, which
        makes the peer do the same.
        """
        entry = self.table.committed(peer)
        if entry is not None:
            return entry
        try:
            data = self._state.session(peer)
            if data is None:
                return None
            entry = decode_record(data, self._rng)
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
            self._metrics.session_reset()
            return None
        self.table.commit(peer, entry)
        return entry

    def for_decrypt(self, peer: str) -> Session | None:
        """The session the next message from ``peer`` decrypts with (staged, else
        committed)."""
        staged = self.table.staged(peer)
        if staged is not None:
            return staged
        entry = self.committed(peer)
        return None if entry is None else entry.session

    async def establish(self, peer: str, bundle: PrekeyBundle | None = None) -> None:
        """Run X3DH with ``peer`` (see TalosClient.establish_session); timed from the
        start, and a failure of the bundle or the key agreement counted by its reason.

        Without a ``bundle``, the peer's key log and a bundle are asked for at
        the same time: on first contact that is two registry requests in
        parallel instead of in series. The bundle is only used once the key
        log is verified (:func:`talos.core.x3dh.initiate` checks its keys
        against the log). The price: when the key log cannot be had, the
        registry has usually handed out one of the peer's one-time prekeys
        already, and it is wasted (the next attempt takes another).
        """
        started = self._clock.monotonic()
        if bundle is None:
            log, fetching = await self._log_and_bundle(peer)
        else:
            log = await self._peers.keylog(peer)
            fetching = asyncio.get_running_loop().create_future()
            fetching.set_result(bundle)
        try:
            self._initiate(peer, log, await fetching)
        except SignatureInvalid:
            self._metrics.signature_failed("bad_signature", "prekey_bundle")
            self._metrics.session_failed("bad_bundle")
            raise
        except (MalformedFrame, UnsupportedVersion):
            self._metrics.session_failed("bad_bundle")
            raise
        except DiscoveryError:  # PeerNotFound, RegistryUnavailable
            self._metrics.session_failed("no_bundle")
            raise
        except CryptoError:
            self._metrics.session_failed("key_agreement")
            raise
        self._metrics.session_established(self._clock.monotonic() - started)

    async def _log_and_bundle(self, peer: str) -> tuple[KeyLog, asyncio.Future[PrekeyBundle]]:
        """The peer's key log, and the bundle fetch running beside it (awaited by the
        caller). If the key log cannot be had, the bundle fetch is cancelled and the
        key log's error raised (not a session failure: nobody was asked for a session).
        """
        keylog = asyncio.ensure_future(self._peers.keylog(peer))
        fetching = asyncio.ensure_future(self._fetch_bundle(peer, keylog))
        try:
            log = await asyncio.shield(keylog)
        except BaseException:
            keylog.cancel()
            fetching.cancel()
            await asyncio.gather(keylog, fetching, return_exceptions=True)
            raise
        return log, fetching

    def _initiate(self, peer: str, log: KeyLog, bundle: PrekeyBundle) -> None:
        state = log.state
        me = self._own.current
        start = initiate(
            bundle,
            peer_agent_id=peer,
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
        entry = SessionEntry(session, start.header.to_bytes())
        self._settle()
        self._state.put_session(
            peer,
            encode_record(entry),
            audit=[(AuditKind.SESSION_ESTABLISHED, {"role": "initiator"}, peer)],
        )
        self.table.commit(peer, entry)

    def reset(self, peer: str, reason: str) -> None:
        """Forget the session with ``peer`` (audited as SESSION_RESET with ``reason``)."""
        self._settle()
        self.table.drop(peer)
        self._state.drop_session(peer, audit=[(AuditKind.SESSION_RESET, {"reason": reason}, peer)])

    def confirm(self, peer: str, handshakes: set[bytes | None]) -> None:
        """An ACK from ``peer`` to messages sent with ``handshakes`` arrived: if one is
        the handshake its session awaits confirmation for, the peer holds the session
        and later messages need no X3DH header."""
        if self.table.awaiting_confirmation(peer):
            self._settle()  # a staged receive may have advanced (and confirmed) the session
        confirmed = self.table.confirmable(peer, handshakes)
        if confirmed is not None:
            self._state.put_session(peer, encode_record(confirmed))
            self.table.commit(peer, confirmed)
