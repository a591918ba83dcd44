"""The agent's sessions: loading, opening (X3DH), persisting, resetting.

The in-memory truth is a :class:`~talos.core.sessions.SessionTable`; this
driver keeps it and the durable records in step (persist first, then
update the table) and owns the agent's prekeys, which X3DH consumes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from talos.audit import AuditKind
from talos.client.own_keys import OwnIdentity, discard_sessions
from talos.core.clock import Clock
from talos.core.keylog import KeyLog
from talos.core.ratchet import Session
from talos.core.rng import Rng
from talos.core.sessions import SessionEntry, SessionTable, decode_record, encode_record
from talos.core.x3dh import PrekeyBundle, PrekeyStore, initiate
from talos.discovery.registry_client import PeerContact
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
_T = TypeVar("_T")

#: Seconds a first contact's bundle is kept for the session that follows.
BUNDLE_KEPT: Final = 60.0

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
        first_contact: Callable[[str], Awaitable[PeerContact | None]],
        clock: Clock,
    ) -> None:
        self.table = table
        self._state, self._own, self._peers = state, own, peers
        self._metrics, self._rng = metrics, rng
        #: Commits the receives staged in the table (see ReceiveBatch.settle).
        self._settle = settle
        self._fetch_bundle = fetch_bundle
        self._first_contact = first_contact
        #: First contacts' bundles, kept for the session set up next: peer -> (bundle,
        #: monotonic deadline); expired ones are dropped whenever one is added, so
        #: it holds at most the first contacts of the last BUNDLE_KEPT seconds.
        self._kept: dict[str, tuple[PrekeyBundle, float]] = {}
        #: First-contact requests in flight, shared by every caller.
        self._contacting: dict[str, asyncio.Future[KeyLog | None]] = {}
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

    async def establish(
        self,
        peer: str,
        bundle: PrekeyBundle | None = None,
        *,
        looked_up: Callable[[], None] | None = None,
    ) -> None:
        """Run X3DH with ``peer`` (see TalosClient.establish_session); timed from the
        start, and a failure of the bundle or the key agreement counted by its reason.

        Without a ``bundle``, what the session needs is looked up
        (:meth:`_look_up`); ``looked_up()`` is called as soon as the peer's key log
        is verified, before the key agreement (the client starts connecting then;
        if the agreement then fails, that link carries only the set-up offers and
        is closed by the peer like any link that brings no message).
        """
        started = self._clock.monotonic()
        if bundle is None:
            log, fetching = await self._look_up(peer)
        else:
            log = await self._peers.keylog(peer)
            fetching = _done(bundle)
        if looked_up is not None:
            looked_up()
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

    async def look_up(self, peer: str) -> KeyLog:
        """The peer's verified key log (fetched on first contact, see
        :meth:`PeerDirectory.keylog`).

        On first contact one request brings the key log, a bundle and the
        peer's record (:meth:`Discovery.first_contact`): the record goes to the
        peer cache, so the connection that follows looks nothing up, and the
        bundle is kept in memory for the session set up next (for
        :data:`BUNDLE_KEPT` seconds; one not used by then is dropped, and its
        one-time prekey wasted, as when a session attempt fails).

        Raises:
            PeerUnknown, PeerNotFound, KeyLogInvalid: as PeerDirectory.keylog.
        """
        log = await self._first_contact_log(peer)
        return log if log is not None else await self._peers.keylog(peer)

    async def _first_contact_log(self, peer: str) -> KeyLog | None:
        """The key log of a first contact (keeping its bundle, caching its record), or
        ``None`` when the peer is known already or the contact gave nothing.

        Callers asking at once share one request (a ``send()`` beside an
        ``establish_session()`` would otherwise take two one-time prekeys).
        """
        if self._peers.known_log(peer) is not None:
            return None
        pending = self._contacting.get(peer)
        if pending is None:
            pending = asyncio.ensure_future(self._contact(peer))
            self._contacting[peer] = pending
            pending.add_done_callback(functools.partial(self._contacted, peer))
        return await asyncio.shield(pending)

    def _contacted(self, peer: str, pending: asyncio.Future[KeyLog | None]) -> None:
        if self._contacting.get(peer) is pending:
            del self._contacting[peer]
        if not pending.cancelled():
            pending.exception()  # retrieved: every waiter got it (or none was left)

    async def stop(self) -> None:
        """Cancel the first-contact requests still running (the client is closing)."""
        pending = list(self._contacting.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _contact(self, peer: str) -> KeyLog | None:
        contact = await self._first_contact(peer)
        if contact is None:
            return None
        log = self._peers.learn_contact(contact.log, contact.record)
        if contact.bundle is not None:
            now = self._clock.monotonic()
            for stale in [p for p, (_, until) in self._kept.items() if until <= now]:
                del self._kept[stale]  # never used: their sessions were not set up
            self._kept[peer] = (contact.bundle, now + BUNDLE_KEPT)
        return log

    async def _look_up(self, peer: str) -> tuple[KeyLog, asyncio.Future[PrekeyBundle]]:
        """The peer's verified key log, and its bundle (possibly still being fetched):
        a first contact's (:meth:`look_up`), or the key log and a bundle asked for
        side by side (:meth:`_log_and_bundle`)."""
        log = await self._first_contact_log(peer)
        if log is None:
            log = self._peers.known_log(peer)
            if log is None:  # the first contact gave nothing: part by part
                return await self._log_and_bundle(peer)
        kept = self._kept.pop(peer, None)
        if kept is not None and kept[1] > self._clock.monotonic():
            return log, _done(kept[0])
        return log, asyncio.ensure_future(self._fetch_bundle(peer, _done(log)))

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
            # With the next commit: a confirmation lost to a crash only makes the
            # next message repeat the handshake (no commit of its own on the
            # first message's path).
            self._state.confirm_session(peer, encode_record(confirmed))
            self.table.commit(peer, confirmed)


def _done(value: _T) -> asyncio.Future[_T]:
    """A future already holding ``value``."""
    future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
