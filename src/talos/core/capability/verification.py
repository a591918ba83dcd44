"""Verifying a token chain for a request, once or through a cache (rules 4 and 5).

Owns the verifier's policy (:class:`CapabilityPolicy`), the full walk of a
chain (:func:`verify`) and :class:`CapabilityVerifier`, which remembers chains
that passed and re-checks only what can change: time, revocations and the
freshness of revocation lists. Everything here raises a
:class:`~talos.errors.CapabilityDenied` subclass or returns ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from talos.core.capability.scope import attenuation_error, matched
from talos.core.capability.token import MAX_CHAIN_LENGTH, Capability
from talos.core.revocation import (
    KeyLookup,
    RevocationPolicy,
    RevocationState,
    StaleListAccepted,
    resolve_key,
)
from talos.errors import (
    CapabilitySignatureInvalid,
    ChainTooDeep,
    ConfigurationError,
    Expired,
    KeyRevoked,
    LocalProtocolError,
    NotYetValid,
    Revoked,
    ScopeMismatch,
    SignatureInvalid,
)

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_MAX_DEPTH",
    "CapabilityPolicy",
    "CapabilityVerifier",
    "verify",
]

DEFAULT_MAX_DEPTH: Final = 5
DEFAULT_CLOCK_SKEW: Final = 60.0
#: Distinct (action, resource) pairs remembered per cached token.
MAX_ALLOWED_PER_TOKEN: Final = 64


@dataclass(frozen=True, slots=True)
class CapabilityPolicy:
    """How a verifier checks tokens addressed to it.

    ``audience`` is the verifier's own agent id. ``on_warning`` receives a
    :class:`~talos.core.revocation.StaleListAccepted` for each stale list a
    successful verification relied on (core never logs).
    """

    audience: str
    max_depth: int = DEFAULT_MAX_DEPTH
    clock_skew: float = DEFAULT_CLOCK_SKEW
    revocation: RevocationPolicy = RevocationPolicy()
    on_warning: Callable[[StaleListAccepted], None] | None = None

    def __post_init__(self) -> None:
        """Raises: ConfigurationError: depth outside 1..8 or a negative skew."""
        if not 1 <= self.max_depth <= MAX_CHAIN_LENGTH:
            raise ConfigurationError(f"max_depth must be in 1..{MAX_CHAIN_LENGTH}")
        if not self.clock_skew >= 0:
            raise ConfigurationError("clock_skew must not be negative")

    @property
    def skew_ms(self) -> int:
        return round(self.clock_skew * 1000)


def verify(
    token: Capability,
    *,
    action: str,
    resource: str,
    now: float,
    revocations: RevocationState,
    policy: CapabilityPolicy,
    keys: KeyLookup,
    holder: str | None = None,
) -> None:
    """Full verification of ``token`` for ``action`` on ``resource`` at ``now``.

    ``holder``, when given, is the authenticated agent presenting the token;
    it must be the token's subject (transports should always pass it).

    Raises:
        ChainTooDeep: the chain is deeper than ``policy.max_depth``.
        ScopeMismatch: wrong audience or holder, a delegation wider than its
            parent, or the request is outside the token's patterns.
        SignatureInvalid: a signature in the chain does not verify, or its
            issuer's key is not in any verified key log, or was revoked by an
            emergency rotation (the message names the rotation).
        NotYetValid: before not-before, or issued in the future (clock skew).
        Expired: a token in the chain has expired.
        Revoked: a token in the chain is revoked by its issuer's list.
        RevocationListStale: an issuer's list is too old for the policy.
        LocalProtocolError: ``action`` or ``resource`` is not a string.
    """
    _emit(policy, _verify_full(token, action, resource, now, revocations, policy, keys, holder))


def _verify_full(
    token: Capability,
    action: str,
    resource: str,
    now: float,
    revocations: RevocationState,
    policy: CapabilityPolicy,
    keys: KeyLookup,
    holder: str | None,
) -> list[StaleListAccepted]:
    _check_request(action, resource)
    chain = token.chain()
    if len(chain) > policy.max_depth:
        raise ChainTooDeep(f"delegation chain of {len(chain)} exceeds {policy.max_depth}")
    _check_bindings(token, policy.audience, holder)
    parent: Capability | None = None
    for depth, link in enumerate(chain, 1):
        _check_signature(link, keys, depth)
        if parent is not None:
            reason = attenuation_error(link, parent)
            if reason is not None:
                raise ScopeMismatch(f"capability at depth {depth}: {reason}")
        parent = link
    return _check_live(chain, action, resource, now, revocations, policy)


def _check_request(action: object, resource: object) -> None:
    if type(action) is not str or type(resource) is not str:
        raise LocalProtocolError("action and resource must be strings")


def _check_bindings(token: Capability, audience: str, holder: str | None) -> None:
    if token.audience != audience:
        raise ScopeMismatch(f"capability is addressed to {token.audience}, not to this agent")
    if holder is not None and holder != token.subject:
        raise ScopeMismatch(f"capability was granted to {token.subject}, not to {holder}")


def _check_signature(token: Capability, keys: KeyLookup, depth: int) -> None:
    try:
        resolve_key(keys, token.issuer, token.key_sequence).verify(
            token.signature, token.signed_bytes()
        )
    except KeyRevoked as exc:
        # The reason names the rotation (the holder needs a fresh grant); the cause is
        # kept so that metrics count it as a revoked key, not a forgery.
        why = str(exc).replace(f" of {exc.agent_id}", "", 1)
        raise CapabilitySignatureInvalid.issuer_key_revoked(
            f"capability at depth {depth}: issuer {why}; it needs a fresh grant from the issuer"
        ) from exc
    except SignatureInvalid as exc:
        raise CapabilitySignatureInvalid(f"capability at depth {depth}: {exc}") from None


def _check_live(
    chain: tuple[Capability, ...],
    action: str,
    resource: str,
    now: float,
    revocations: RevocationState,
    policy: CapabilityPolicy,
) -> list[StaleListAccepted]:
    """Everything that can change after a chain verified once: time, revocation, scope."""
    skew, t = policy.skew_ms, now * 1000.0
    for depth, link in enumerate(chain, 1):
        _check_time(link, t, skew, depth)
    warnings = []
    for link in chain:
        warning = revocations.check(
            link.issuer,
            link.token_id,
            link.issued_at_ms,
            link.key_sequence,
            now=now,
            policy=policy.revocation,
        )
        if warning is not None:
            warnings.append(warning)
    for depth, link in enumerate(chain, 1):
        if not (matched(link.actions, action) and matched(link.resources, resource)):
            raise ScopeMismatch(f"capability at depth {depth} does not cover {action} {resource}")
    return warnings


def _check_time(token: Capability, t: float, skew: int, depth: int) -> None:
    if t < token.issued_at_ms - skew:
        raise NotYetValid(
            f"capability at depth {depth} was issued {(token.issued_at_ms - t) / 1000:.3f} s "
            f"in the future, beyond the {skew / 1000:g} s tolerance: clock skew"
        )
    if t < token.not_before_ms - skew:
        raise NotYetValid(f"capability at depth {depth} is not valid yet")
    if t > token.expires_ms + skew:
        raise Expired(f"capability at depth {depth} has expired")


def _emit(policy: CapabilityPolicy, warnings: list[StaleListAccepted]) -> None:
    if warnings and policy.on_warning is not None:
        for warning in warnings:
            policy.on_warning(warning)


# -- cached verification ------------------------------------------------------------


class _Verified:
    """A chain that passed full verification, and what the fast path may skip."""

    __slots__ = ("allowed", "chain", "fresh_until", "from_ms", "generation", "token", "until_ms")

    def __init__(self, token: Capability, skew: int) -> None:
        self.token = token
        self.chain = token.chain()
        self.from_ms = max(max(t.not_before_ms, t.issued_at_ms) - skew for t in self.chain)
        self.until_ms = min(t.expires_ms + skew for t in self.chain)
        self.fresh_until = -math.inf
        self.generation = -1
        self.allowed: set[tuple[str, str]] = set()


class CapabilityVerifier:
    """:func:`verify` with a cache of verified chains.

    After a full verification, the token id maps to the verified token, its
    validity window over the whole chain, the (action, resource) pairs it was
    checked for, the revocation ``generation`` it was checked against and the
    time until which every issuer's list stays fresh. A later call for the
    same token (equal, not just the same id) is allowed when the generation is
    unchanged, ``now`` is inside the window and before that freshness deadline,
    and the pair was seen. Otherwise time, revocation, freshness and scope are
    checked again (without signatures); a change to the revocation state
    always forces that. Denials are never cached.
    """

    __slots__ = ("_cache", "_keys", "_policy", "_revocations", "max_entries")

    def __init__(
        self,
        *,
        policy: CapabilityPolicy,
        keys: KeyLookup,
        revocations: RevocationState,
        max_entries: int = 10_000,
    ) -> None:
        self._policy = policy
        self._keys = keys
        self._revocations = revocations
        self._cache: dict[bytes, _Verified] = {}
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._cache)

    def verify(
        self,
        token: Capability,
        *,
        action: str,
        resource: str,
        now: float,
        holder: str | None = None,
    ) -> None:
        """As :func:`verify`, with this verifier's policy, keys and revocation state.

        Raises:
            the exceptions of :func:`verify`.
        """
        entry = self._cache.get(token.token_id)
        if (
            entry is not None
            and (entry.token is token or entry.token == token)
            and entry.generation == self._revocations.generation
            and entry.from_ms <= now * 1000.0 <= entry.until_ms
            and now <= entry.fresh_until
            and (action, resource) in entry.allowed
            and (holder is None or holder == token.subject)
        ):
            return
        self._verify_slow(token, action, resource, now, holder, entry)

    def _verify_slow(
        self,
        token: Capability,
        action: str,
        resource: str,
        now: float,
        holder: str | None,
        entry: _Verified | None,
    ) -> None:
        policy, revocations = self._policy, self._revocations
        if entry is None or (entry.token is not token and entry.token != token):
            warnings = _verify_full(
                token, action, resource, now, revocations, policy, self._keys, holder
            )
            entry = self._remember(token)
        else:
            warnings = self._recheck(entry, action, resource, now, holder)
        if len(entry.allowed) < MAX_ALLOWED_PER_TOKEN:
            entry.allowed.add((action, resource))
        entry.generation = revocations.generation
        entry.fresh_until = min(
            revocations.fresh_until(t.issuer, policy.revocation) for t in entry.chain
        )
        _emit(policy, warnings)

    def _recheck(
        self, entry: _Verified, action: str, resource: str, now: float, holder: str | None
    ) -> list[StaleListAccepted]:
        _check_request(action, resource)
        _check_bindings(entry.token, self._policy.audience, holder)
        try:
            return _check_live(entry.chain, action, resource, now, self._revocations, self._policy)
        except (Expired, Revoked):
            # Both are final: the token can never verify again.
            del self._cache[entry.token.token_id]
            raise

    def _remember(self, token: Capability) -> _Verified:
        cache = self._cache
        if token.token_id not in cache and len(cache) >= self.max_entries:
            del cache[next(iter(cache))]  # the oldest entry
        entry = _Verified(token, self._policy.skew_ms)
        cache[token.token_id] = entry
        return entry

    def clear(self) -> None:
        """Forget every cached verification."""
        self._cache.clear()
