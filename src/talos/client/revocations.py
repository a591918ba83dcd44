"""Capabilities in use: checking tokens, and revocation lists between agents.

An incoming message is authorized by the capability it carries: its chain
must start at this agent, verify with the issuers' key logs, and not be
revoked. Revocation lists are kept fresh three ways: this agent's own list
is always current (and re-read when ``talos capabilities revoke`` writes a
new one while the agent runs); issuers' lists older than the policy's
``max_age`` are fetched from the registry before a check; and both sides of
every connection offer their own signed list, which the other verifies,
merges and persists.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref

from talos.audit import AuditKind
from talos.client.control import Auditor, Signer
from talos.client.own_keys import OwnIdentity, revoke_earlier_keys
from talos.core import wire
from talos.core.capability import Capability, CapabilityPolicy, verify
from talos.core.clock import Clock
from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.ratelimit import RateLimiter
from talos.core.revocation import (
    RevocationList,
    RevocationMode,
    RevocationPolicy,
    RevocationState,
    StaleListAccepted,
)
from talos.discovery.registry_client import RegistryClient
from talos.errors import (
    CapabilityDenied,
    MalformedFrame,
    PeerRejected,
    RemoteProtocolError,
    ScopeMismatch,
    SignatureInvalid,
    TalosError,
    UnsupportedVersion,
)
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.peers import PeerDirectory
from talos.storage.tokens import TokenStore
from talos.transport import Link

_log = logging.getLogger("talos.client")


class Capabilities:
    """Tokens held and checked by this agent, and the revocation lists behind them."""

    def __init__(
        self,
        *,
        own: OwnIdentity,
        tokens: TokenStore,
        peers: PeerDirectory,
        registry: RegistryClient | None,
        policy: RevocationPolicy,
        clock: Clock,
        metrics: AgentMetrics,
        auditor: Auditor,
        signer: Signer,
    ) -> None:
        self._own, self._tokens, self._peers = own, tokens, peers
        self._registry, self._policy, self._clock = registry, policy, clock
        self._metrics, self._auditor, self._signer = metrics, auditor, signer
        self.revocations = RevocationState()
        #: Incoming links we already answered with our revocation list.
        self._answered: weakref.WeakSet[Link] = weakref.WeakSet()
        #: Key log refreshes for tokens naming a key sequence we do not know yet.
        self._refreshes = RateLimiter(rate=1 / 30, burst=2)
        #: The held tokens decoded, with the token store's generation they were read at.
        self._held_tokens: tuple[int, list[Capability]] | None = None
        self._stale_logs = LimitedLog(_log, clock)
        #: Issuers whose list was due for a refresh that failed (the registry down).
        self._owed: set[str] = set()
        self._load()
        metrics.track_revocation_list_age(self.stale_list_age)

    @property
    def _me(self) -> str:
        return self._own.agent_id

    def _load(self) -> None:
        """Known key logs (imported with capabilities) and revocation lists, verified."""
        keys = IssuerKeys([self._own.current.keylog])
        for data in self._tokens.keylogs():
            with contextlib.suppress(TalosError):
                log = self._peers.learn_log(KeyLog.from_bytes(data))
                keys.add(log)
        for issuer, data, synced in self._tokens.revocation_lists():
            with contextlib.suppress(TalosError):
                self.revocations.apply(RevocationList.from_bytes(data), keys=keys)
                self.revocations.mark_synced(issuer, synced)
        self.revocations.mark_synced(self._me, self._clock.time())

    # -- tokens ---------------------------------------------------------------------

    def for_sending(self, peer: str, given: Capability | None) -> Capability | None:
        """The token to attach: the one given (decoded by the caller, see
        :func:`talos.client.capability_arguments.check_token`), else a held one for
        message.send to ``peer``.

        Raises:
            CapabilityDenied: the token does not authorize sending to ``peer`` now.
        """
        candidates = [given] if given is not None else self._held(peer)
        denial: CapabilityDenied | None = None
        for token in candidates:
            try:
                self.check(token, audience=peer, holder=self._me)
            except CapabilityDenied as exc:
                denial = exc
                continue
            return token
        if given is not None and denial is not None:
            raise denial
        return None

    async def fetch_issuers(self, peer: str, given: Capability | None) -> None:
        """Before :meth:`for_sending`: fetch again the key log of every issuer of the
        token(s) that names a key we do not know yet (the issuer rotated since we
        cached its log, and granted this token under its new key).

        Raises:
            nothing: a log that cannot be fetched leaves the check to :meth:`for_sending`.
        """
        for token in [given] if given is not None else self._held(peer):
            for issuer, sequence in _newest_keys(token).items():
                if issuer != self._me and self._needs_newer_log(issuer, sequence):
                    with contextlib.suppress(TalosError):
                        await self._peers.keylog(issuer, refresh=True)

    def _held(self, peer: str) -> list[Capability]:
        """The tokens granted to this agent for sending to ``peer``.

        Every ``send()`` asks (twice); the decoded tokens are kept until the token
        store's write generation moves (a grant, an add or a revocation, by this
        process or a ``talos`` command beside it), so a send reads one counter
        instead of decoding every held token.
        """
        generation = self._tokens.generation()
        if self._held_tokens is None or self._held_tokens[0] != generation:
            tokens = []
            for data in self._tokens.held():
                with contextlib.suppress(MalformedFrame, UnsupportedVersion):
                    tokens.append(Capability.from_bytes(data))
            # Read after the generation: a write in between reloads on the next call.
            self._held_tokens = (generation, tokens)
        return [token for token in self._held_tokens[1] if token.audience == peer]

    def check(self, token: Capability, *, audience: str, holder: str) -> None:
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
        self.revocations.mark_synced(self._me, now)
        keys = IssuerKeys(
            [
                log
                for a in {token.issuer for token in token.chain()}
                if (log := self._peers.known_log(a)) is not None
            ]
        )
        mine = audience == self._me
        policy = CapabilityPolicy(
            audience=audience,
            revocation=self._policy if mine else RevocationPolicy(mode=RevocationMode.OFFLINE),
            # Our own checks of tokens we hold, before sending, warn nobody.
            on_warning=self._stale_accepted if mine else None,
        )
        with self._metrics.time_capability_verification():
            verify(
                token,
                action="message.send",
                resource=f"inbox/{audience}",
                now=now,
                revocations=self.revocations,
                policy=policy,
                keys=keys,
                holder=holder,
            )

    def _stale_accepted(self, warning: StaleListAccepted) -> None:
        """A token was allowed on a stale list (``permissive`` or ``offline`` mode):
        counted, and logged (rate-limited per issuer)."""
        self._metrics.stale_list_accepted(str(warning.mode))
        age = warning.age_seconds
        self._stale_logs.warning(
            "revocation_list_stale_accepted",
            "accepting a capability in %s mode on the revocation list of %s, %s "
            "(max_age %g s): a token it revoked since may pass",
            warning.mode,
            warning.issuer,
            "never synced" if math.isinf(age) else f"{age:.0f} s old",
            self._policy.max_age,
            source=warning.issuer,
            peer_id=warning.issuer,
            mode=str(warning.mode),
            age_seconds=round(warning.age_seconds, 1),
        )

    async def authorize(self, envelope: wire.Envelope) -> bytes:
        """Check the capability attached to an incoming message; returns its id.

        Before checking, the key logs of every issuer in the chain are looked
        up, and any issuer whose revocation list is older than the policy's
        ``max_age`` is synchronized from the registry (if it can be reached).

        Raises:
            CapabilityDenied: missing or not valid for this sender and agent.
        """
        self.refresh_own()
        if envelope.capability_ref is None:
            raise ScopeMismatch("no capability attached; this agent requires one")
        try:
            token = Capability.from_bytes(envelope.capability_ref)
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise ScopeMismatch(f"attached capability is malformed: {exc}") from None
        for issuer, sequence in _newest_keys(token).items():
            if issuer == self._me:
                continue
            with contextlib.suppress(TalosError):
                await self._peers.keylog(issuer, refresh=self._needs_newer_log(issuer, sequence))
            await self._sync(issuer)
        self.check(token, audience=self._me, holder=envelope.sender)
        return token.token_id

    def _needs_newer_log(self, issuer: str, sequence: int) -> bool:
        """A token names a key ``issuer``'s known log does not have: the issuer rotated
        since we fetched it. Fetched again at most twice a minute per issuer (the
        token comes from an authenticated peer, but may name any sequence)."""
        known = self._peers.known_log(issuer)
        if known is not None and sequence < len(known):
            return False
        return self._refreshes.allow(issuer, self._clock.monotonic())

    async def _sync(self, issuer: str) -> None:
        """Fetch ``issuer``'s list from the registry when ours is older than ``max_age``."""
        now = self._clock.time()
        synced = self.revocations.last_synced(issuer)
        fresh = synced is not None and now - synced <= self._policy.max_age
        if fresh or self._registry is None:
            return
        log = self._peers.known_log(issuer)
        if log is None:
            return
        try:
            offered = await self._registry.fetch_revocations(issuer, IssuerKeys([log]))
        except TalosError as exc:
            if isinstance(exc, SignatureInvalid):
                self._metrics.signature_failed("bad_signature", "revocation_list")
            _log.info("revocation list of %s not refreshed: %s", issuer, exc)
            self._owed.add(issuer)
            return
        if offered is not None:
            result = self.revocations.apply(offered, keys=IssuerKeys([log]))
            if result.security_event:
                self._auditor.audit("REVOCATION_CONFLICT", {"outcome": result.outcome.name}, issuer)
            kept = self.revocations.list_for(issuer)
            if kept is not None:
                self._tokens.put_revocation_list(issuer, kept.to_bytes(), synced_at=now)
        self.revocations.mark_synced(issuer, now)
        self._owed.discard(issuer)

    def stale_list_age(self) -> float:
        """``talos_revocation_list_age_seconds``, computed at scrape time.

        The age, from its last successful sync, of the oldest list that was due
        for a refresh the registry did not answer (+Inf: never synced); 0 when
        every list in use was refreshed when due. It keeps growing during a
        registry outage, which is when ``RevocationListStale`` must fire. This
        agent's own list is the authority, never stale.
        """
        now = self._clock.time()
        synced = [self.revocations.last_synced(issuer) for issuer in list(self._owed)]
        return max((math.inf if at is None else now - at for at in synced), default=0.0)

    # -- revocation lists between agents ------------------------------------------------

    async def publish(self) -> None:
        """Put our own list in the registry, where verifiers of our delegations find it."""
        data = self._own_list()
        if data is None or self._registry is None:
            return
        with contextlib.suppress(PeerRejected):  # the registry holds this version already
            await self._registry.publish_revocations(RevocationList.from_bytes(data))

    def refresh_own(self) -> None:
        """Adopt a newer own list written by ``talos capabilities revoke`` while we run."""
        data = self._own_list()
        current = self.revocations.list_for(self._me)
        if data is None or (current is not None and current.to_bytes() == data):
            return
        with contextlib.suppress(TalosError):
            self.revocations.apply(
                RevocationList.from_bytes(data), keys=IssuerKeys([self._own.current.keylog])
            )

    def revoke_earlier_keys(self) -> RevocationList:
        """After an emergency rotation with ``revoke_old``: revoke every earlier key
        sequence and every token recorded as issued under one, in our own list, signed
        by the new key (the caller publishes and offers it)."""
        me = self._own.current
        signed = revoke_earlier_keys(self._tokens, me, now=self._clock.time())
        self.revocations.apply(signed, keys=IssuerKeys([me.keylog]))
        return signed

    def complete_revocation(self) -> bool:
        """At start: if our key log revoked earlier keys but our own list does not say so
        yet (a crash between the key file and the list), revise it now; returns whether."""
        me = self._own.current
        event = me.keylog.revoking_event()
        if event is None:
            return False
        current = self.revocations.list_for(me.agent_id)
        if current is not None and set(range(event.sequence)) <= current.revoked_key_sequences:
            return False
        self.revoke_earlier_keys()
        return True

    def _own_list(self) -> bytes | None:
        stored = self._tokens.revocation_list(self._me)
        return None if stored is None else stored[0]

    async def offer(self, link: Link, peer: str) -> None:
        """Send our own signed revocation list: both sides converge on every connection."""
        data = self._own_list()
        if data is None:
            return
        await self._signer.send(link, peer, wire.EnvelopeType.REVOCATIONS, revocation_list=data)

    async def on_revocations(self, link: Link, envelope: wire.Envelope, log: KeyLog) -> None:
        """Adopt a peer's own revocation list (verified, merged, persisted); answer with ours."""
        sender, now = envelope.sender, self._clock.time()
        try:
            offered = RevocationList.from_bytes(envelope.revocation_list or b"")
            if offered.issuer != sender:
                raise MalformedFrame("a peer may only offer its own revocation list")
            result = self.revocations.apply(offered, keys=IssuerKeys([log]))
        except (RemoteProtocolError, SignatureInvalid) as exc:
            if isinstance(exc, SignatureInvalid):
                self._metrics.signature_failed("bad_signature", "revocation_list")
            # Control envelopes are not replay-checked: a bad list sent (or replayed)
            # again and again is audited and logged at the noisy-event rate.
            fields = {"what": "revocation list"}
            if self._auditor.audit_noisy(AuditKind.SIGNATURE_FAILURE, fields, sender):
                _log.warning(
                    "refusing a revocation list from %s: %s",
                    sender,
                    exc,
                    extra={"event": "revocation_conflict", "peer_id": sender},
                )
            return
        if result.security_event:
            self._auditor.audit("REVOCATION_CONFLICT", {"outcome": result.outcome.name}, sender)
            _log.warning(
                "revocation list conflict from %s: %s",
                sender,
                result.outcome.name,
                extra={"event": "revocation_conflict", "peer_id": sender},
            )
        kept = self.revocations.list_for(sender)
        if kept is not None:
            self._tokens.put_revocation_list(sender, kept.to_bytes(), synced_at=now)
        self.revocations.mark_synced(sender, now)
        self._owed.discard(sender)
        if not link.outgoing and link not in self._answered:
            self._answered.add(link)
            await self.offer(link, sender)


def _newest_keys(token: Capability) -> dict[str, int]:
    """Each issuer of ``token``'s chain and the highest key sequence it signed with."""
    keys: dict[str, int] = {}
    for link in token.chain():
        keys[link.issuer] = max(keys.get(link.issuer, -1), link.key_sequence)
    return keys
