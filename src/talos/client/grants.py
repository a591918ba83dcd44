"""Capabilities in code: grant, add, list and revoke capability tokens.

One implementation behind both front ends: :class:`~talos.client.TalosClient`
(``grant``, ``add_capability``, ``capabilities``, ``revoke``) and
``talos capabilities`` (grant, add, list, revoke) call the methods of
:class:`Grants`, each handing it the collaborators it has:

* the running agent: its current identity, token store, revocation state
  (:class:`~talos.client.revocations.Capabilities`), peer directory (key logs
  through the cache, the registry, the DHT), audit log, and a
  publisher that puts a new revocation list in the registry and on live links;
* the CLI beside (or without) a running agent: the identity loaded from the
  home, the same token store, the revocation lists stored in it, a peer
  directory over the token store's key logs and ``--registry``, the home's
  audit log; nothing is published (the running agent adopts the new list the
  next time it checks a token, docs/design/capabilities.md).

Rules, in order of what each call does:

1. **Arguments first.** A bad peer id, action, resource, lifetime, reason or
   token id raises :class:`~talos.errors.InvalidArgument` before anything is
   signed, written or audited.
2. **Audited before shown.** A grant is appended to the audit log
   (``CAPABILITY_GRANTED``) and stored before the token is returned; an added
   token is audited ``CAPABILITY_RECEIVED``, a revocation
   ``CAPABILITY_REVOKED``. An audit log that cannot take the entry (AuditFull)
   stops the call.
3. **Verified on the way in.** An added token must name this agent as its
   subject, and its chain must verify with the issuers' key logs (fetched
   through discovery when not known) and not be expired or revoked as far as
   this agent knows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

from talos.audit import AuditKind, AuditLog
from talos.client.arguments import check_peer_id
from talos.client.capability_arguments import (
    AGENT_ACTIONS,
    MAX_GRANT_LIFETIME,
    check_actions,
    check_lifetime,
    check_patterns,
    check_reason,
    check_token,
    check_token_id,
)
from talos.client.revocations import _newest_keys as newest_keys  # one definition
from talos.client.wiring import Parts
from talos.core.capability import DEFAULT_MAX_DEPTH, Capability, CapabilityPolicy, issue, verify
from talos.core.clock import Clock
from talos.core.identity import Identity
from talos.core.keylog import IssuerKeys, KeyLog
from talos.core.revocation import RevocationList, RevocationMode, RevocationPolicy, RevocationState
from talos.core.rng import Rng
from talos.errors import (
    CapabilityDenied,
    CapabilitySignatureInvalid,
    Expired,
    InvalidArgument,
    LocalProtocolError,
    PeerNotFound,
    Revoked,
    ScopeMismatch,
    TalosError,
)
from talos.storage.tokens import TokenStore

__all__ = [
    "AGENT_ACTIONS",
    "MAX_GRANT_LIFETIME",
    "CapabilityInfo",
    "Grants",
    "KeyLogSource",
    "RevokedToken",
    "agent_grants",
]

_log = logging.getLogger("talos.client")
_E = TypeVar("_E", bound=TalosError)

#: Delegations a delegable grant allows (the default policy's depth, minus the root).
_DELEGATIONS: Final = DEFAULT_MAX_DEPTH - 1

_ISSUER_UNKNOWN_HINT: Final = (
    "the issuer's key log is needed to verify the token: use the registry (or DHT) the "
    "issuer announces to (CLI: `talos capabilities add TOKEN --registry URL`), or pass its "
    "key log (`issuer_logs=` in code, `--issuer-log FILE` from `talos whoami --export-log`)"
)


@dataclass(frozen=True, slots=True)
class CapabilityInfo:
    """One capability token this agent granted or holds, as :meth:`TalosClient.capabilities`
    lists it.

    ``direction`` is ``"granted"`` (this agent issued it) or ``"held"``
    (granted to this agent); ``expires`` is Unix seconds; ``state`` is
    ``"valid"``, ``"expired"``, ``"not-yet-valid"`` or ``"revoked"``, judged on
    the whole chain with the revocation lists this agent knows; ``token`` is
    the text form (``tcap1.…``) to hand over.
    """

    token_id: str
    direction: Literal["granted", "held"]
    issuer: str
    subject: str
    audience: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    expires: float
    delegable: bool
    delegations: int
    revoked: bool
    state: Literal["valid", "expired", "not-yet-valid", "revoked"]
    token: str


@dataclass(frozen=True, slots=True)
class RevokedToken:
    """What :meth:`Grants.revoke` did: the token id (hex), the version of this agent's
    revocation list that revokes it, whether the id is a token this home granted or
    holds, and whether it was revoked already (then nothing new was signed)."""

    token_id: str
    list_version: int
    known: bool
    already: bool = False


class KeyLogSource(Protocol):
    """Verified key logs of other agents (:class:`talos.peers.PeerDirectory`)."""

    def known_log(self, agent_id: str, /) -> KeyLog | None: ...
    def learn_log(self, log: KeyLog, /) -> KeyLog: ...
    async def keylog(self, agent_id: str, *, refresh: bool = False) -> KeyLog: ...


#: Appends one audit entry durably, raising if it cannot (AuditFull, StorageError).
Recorder = Callable[[str, dict[str, Any], "str | None"], None]


class Grants:
    """Grant, add, list and revoke capability tokens (see the module docstring)."""

    def __init__(
        self,
        *,
        identity: Callable[[], Identity],
        tokens: TokenStore,
        revocations: RevocationState,
        peers: KeyLogSource,
        record: Recorder,
        clock: Clock,
        rng: Rng,
        publish: Callable[[RevocationList], Awaitable[None]] | None = None,
        reload: Callable[[], None] | None = None,
    ) -> None:
        self._identity, self._tokens, self._revocations = identity, tokens, revocations
        self._peers, self._record, self._clock, self._rng = peers, record, clock, rng
        self._publish = publish
        #: Adopts this agent's own revocation list as stored (another process, the CLI,
        #: may have revised it) before it is read or revised.
        self._reload = reload or (lambda: None)

    @property
    def _me(self) -> str:
        return self._identity().agent_id

    # -- grant ----------------------------------------------------------------------

    def grant(
        self,
        subject: Any,
        actions: Any,
        *,
        expires_in: Any,
        resources: Any = ("*",),
        delegable: Any = False,
        audience: Any = None,
    ) -> Capability:
        """Issue a token for ``subject``, audit and store it, then return it.

        ``actions`` and ``resources`` are one pattern or several; ``audience``
        (who enforces it) defaults to this agent.

        Raises:
            InvalidArgument: a bad subject, audience, action, resource, lifetime
                or ``delegable`` (nothing signed or written).
            AuditFull, StorageError: the grant could not be recorded (not issued).
        """
        subject = check_peer_id(subject)
        audience = self._me if audience is None else check_peer_id(audience)
        action_set = check_actions(actions)
        resource_set = check_patterns("resource", resources)
        lifetime = check_lifetime(expires_in)
        if type(delegable) is not bool:
            raise InvalidArgument(f"delegable must be True or False, not {delegable!r}")
        me, now = self._identity(), self._clock.time()
        try:
            token = issue(
                me.signing_key,
                issuer=me.agent_id,
                key_sequence=me.sequence,
                subject=subject,
                audience=audience,
                actions=action_set,
                resources=resource_set,
                expires=now + lifetime,
                now=now,
                rng=self._rng,
                delegations=_DELEGATIONS if delegable else 0,
            )
        except LocalProtocolError as exc:
            raise InvalidArgument(f"the capability cannot be issued: {exc}") from None
        self._record(
            AuditKind.CAPABILITY_GRANTED,
            {
                "token": token.token_id,
                "actions": sorted(token.actions),
                "resources": sorted(token.resources),
                "expires_ms": token.expires_ms,
                "delegations": token.delegations,
            },
            token.subject,
        )
        self._tokens.add_granted(token.token_id, token.to_bytes())  # persisted before shown
        _log.info(
            "granted capability %s to %s",
            token.token_id.hex(),
            subject,
            extra={"event": "capability_granted", "peer_id": subject},
        )
        return token

    # -- add --------------------------------------------------------------------------

    async def add(self, token: Any, *, issuer_logs: Sequence[bytes] = ()) -> CapabilityInfo:
        """Verify a token granted to this agent and store it: from then on ``send()`` to
        its audience attaches it by itself.

        Every issuer's key log in its chain is taken from ``issuer_logs`` (the
        bytes ``talos whoami --export-log`` writes), the logs known here, or
        discovery (refreshed when the token names a key the known log lacks).

        Raises:
            InvalidArgument: ``token`` is not a capability token.
            ScopeMismatch: it was granted to another agent.
            PeerUnknown, PeerNotFound: an issuer's key log cannot be found.
            KeyLogInvalid, MalformedFrame: an offered key log is invalid or forks.
            Expired, NotYetValid, Revoked: it is not valid now.
            CapabilitySignatureInvalid: a signature in its chain does not verify.
            AuditFull, StorageError: it could not be recorded (not stored).
        """
        capability = check_token(token)
        me = self._me
        if capability.subject != me:
            raise _hinted(
                ScopeMismatch(
                    f"capability {capability.token_id.hex()} was granted to "
                    f"{capability.subject}, not to this agent ({me})"
                ),
                f"ask {capability.issuer} to grant it to {me}",
            )
        for data in issuer_logs:
            self._peers.learn_log(KeyLog.from_bytes(data))
        keys = IssuerKeys([self._identity().keylog])
        for issuer, sequence in newest_keys(capability).items():
            if issuer != me:
                keys.add(await self._issuer_log(capability, issuer, sequence))
        try:
            # As holder we cannot know every issuer's newest revocation list: check
            # what we have; the audience enforces freshness.
            verify(
                capability,
                action=min(capability.actions),
                resource=min(capability.resources),
                now=self._clock.time(),
                revocations=self._revocations,
                policy=CapabilityPolicy(
                    audience=capability.audience,
                    revocation=RevocationPolicy(mode=RevocationMode.OFFLINE),
                    on_warning=lambda warning: None,
                ),
                keys=keys,
                holder=me,
            )
        except CapabilityDenied as denial:
            raise _denial_hinted(denial, capability) from denial.__cause__
        self._record(
            AuditKind.CAPABILITY_RECEIVED,
            {"token": capability.token_id, "actions": sorted(capability.actions)},
            capability.issuer,
        )
        self._tokens.add_held(capability.token_id, capability.to_bytes())
        _log.info(
            "added capability %s from %s",
            capability.token_id.hex(),
            capability.issuer,
            extra={"event": "capability_added", "peer_id": capability.issuer},
        )
        return self.info("held", capability)

    async def _issuer_log(self, token: Capability, issuer: str, sequence: int) -> KeyLog:
        """``issuer``'s verified key log holding key ``sequence``; kept in the token store
        too (the CLI and the agent read known issuers' logs there).

        Raises:
            PeerUnknown, PeerNotFound: no log of ``issuer`` (named, with a hint).
        """
        known = self._peers.known_log(issuer)
        try:
            log = await self._peers.keylog(
                issuer, refresh=known is not None and sequence >= len(known)
            )
        except PeerNotFound as exc:
            raise _hinted(
                type(exc)(f"the issuer {issuer} of capability {token.token_id.hex()}: {exc}"),
                _ISSUER_UNKNOWN_HINT,
            ) from None
        if self._tokens.keylog(issuer) != log.to_bytes():
            self._tokens.put_keylog(issuer, log.to_bytes())
        return log

    # -- list -------------------------------------------------------------------------

    def listing(self) -> list[CapabilityInfo]:
        """Every token this agent granted, then every token it holds, in store order."""
        self._reload()
        rows = [self.info("granted", Capability.from_bytes(d)) for d in self._tokens.granted()]
        rows += [self.info("held", Capability.from_bytes(d)) for d in self._tokens.held()]
        return rows

    def info(self, direction: Literal["granted", "held"], token: Capability) -> CapabilityInfo:
        state = _state(self._revocations, token, self._clock.time())
        return CapabilityInfo(
            token_id=token.token_id.hex(),
            direction=direction,
            issuer=token.issuer,
            subject=token.subject,
            audience=token.audience,
            actions=tuple(sorted(token.actions)),
            resources=tuple(sorted(token.resources)),
            expires=token.expires_ms / 1000,
            delegable=token.delegations > 0,
            delegations=token.delegations,
            revoked=state == "revoked",
            state=state,
            token=token.to_text(),
        )

    # -- revoke -----------------------------------------------------------------------

    async def revoke(
        self, token_id: Any, *, reason: Any, granted_only: bool = True
    ) -> RevokedToken:
        """Revoke a token: a new version of this agent's revocation list, signed with its
        current key, audited, stored, adopted at once and published.

        ``token_id`` is the hex id, its bytes, or the token itself. With
        ``granted_only`` (the library's default) it must be a token this agent
        granted; the CLI may revoke any id it issued elsewhere. Revoking a
        revoked token again changes nothing.

        Raises:
            InvalidArgument: a bad id or reason, or (``granted_only``) not a token
                this agent granted.
            AuditFull, StorageError: it could not be recorded (nothing revoked).
        """
        ident = check_token_id(token_id)
        reason = check_reason(reason)
        self._reload()
        known = self._tokens.find(ident) is not None
        granted = {Capability.from_bytes(d).token_id for d in self._tokens.granted()}
        if granted_only and ident not in granted:
            raise InvalidArgument(
                f"{ident.hex()} is not a token this agent granted (see capabilities())"
            )
        me, now = self._identity(), self._clock.time()
        current = self._revocations.list_for(me.agent_id)
        if current is not None and ident in current.revoked_ids:
            return RevokedToken(ident.hex(), current.version, known, already=True)
        base = current or RevocationList.create(me.agent_id, now=now)
        signed = base.revise(now=now, token_ids=[ident]).signed_by(me.signing_key, me.sequence)
        self._record(
            AuditKind.CAPABILITY_REVOKED,
            {"token": ident, "reason": reason, "list_version": signed.version},
            None,
        )
        self._tokens.put_revocation_list(me.agent_id, signed.to_bytes(), synced_at=now)
        self._tokens.put_reason(ident, reason)
        self._revocations.apply(signed, keys=IssuerKeys([me.keylog]))
        self._revocations.mark_synced(me.agent_id, now)
        _log.info(
            "revoked capability %s (revocation list version %d)",
            ident.hex(),
            signed.version,
            extra={"event": "capability_revoked", "token_id": ident.hex()},
        )
        if self._publish is not None:
            await self._publish(signed)
        return RevokedToken(ident.hex(), signed.version, known)


# -- judging what is known --------------------------------------------------------


def _state(
    revocations: RevocationState, token: Capability, now: float
) -> Literal["valid", "expired", "not-yet-valid", "revoked"]:
    """Valid, expired, not-yet-valid or revoked, judged on the chain with what is known."""
    now_ms = now * 1000
    for link in token.chain():
        listed = revocations.list_for(link.issuer)
        if listed is not None and listed.revocation_of(
            link.token_id, link.issued_at_ms, link.key_sequence
        ):
            return "revoked"
    if any(link.expires_ms < now_ms for link in token.chain()):
        return "expired"
    if any(link.not_before_ms > now_ms for link in token.chain()):
        return "not-yet-valid"
    return "valid"


def _hinted(error: _E, hint: str) -> _E:
    error.hint = hint
    return error


def _denial_hinted(denial: CapabilityDenied, token: Capability) -> CapabilityDenied:
    """The denial of an added token, with what the holder can do about it."""
    if isinstance(denial, Expired):
        return _hinted(denial, f"ask {token.issuer} for a new grant (it expired)")
    if isinstance(denial, Revoked):
        return _hinted(denial, f"{token.issuer} revoked it; ask for a new grant")
    if isinstance(denial, CapabilitySignatureInvalid) and denial.hint == type(denial).hint:
        return _hinted(
            denial,
            "the token was altered, or the issuer's key log here is not the one that "
            "signed it; ask the issuer for the token again",
        )
    return denial


def agent_grants(
    parts: Parts,
    *,
    tokens: TokenStore,
    log: AuditLog,
    clock: Clock,
    rng: Rng,
) -> Grants:
    """The :class:`Grants` of a running agent: its drivers' identity, revocation state
    and peer directory; a new revocation list goes to the registry and every live
    outgoing link (incoming links get it on their next connection)."""
    capabilities, links = parts.capabilities, parts.deliverer.links

    async def publish(signed: RevocationList) -> None:
        with contextlib.suppress(TalosError):
            await capabilities.publish()
        for peer, link in list(links.items()):
            if link.is_open:
                with contextlib.suppress(TalosError):
                    await capabilities.offer(link, peer)

    def record(kind: str, data: dict[str, Any], peer: str | None) -> None:
        log.append(kind, data, peer=peer)

    return Grants(
        identity=lambda: parts.own.current,
        tokens=tokens,
        revocations=capabilities.revocations,
        peers=parts.peers,
        record=record,
        clock=clock,
        rng=rng,
        publish=publish,
        reload=capabilities.refresh_own,
    )
