"""Issuing root tokens and delegating held ones (the granting side of capabilities).

A token is signed and then decoded again before it is handed out, so what
this module returns is always something a peer can read; a delegation wider
than its parent (rule 3 of :mod:`talos.core.capability`) is refused here with
:class:`~talos.errors.LocalProtocolError` rather than at the verifier.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from talos.core.capability.scope import attenuation_error
from talos.core.capability.token import TOKEN_ID_SIZE, Capability
from talos.core.crypto import SigningKey
from talos.core.rng import Rng
from talos.errors import LocalProtocolError, MalformedFrame, UnsupportedVersion

__all__ = ["delegate", "issue"]


def issue(
    signing_key: SigningKey,
    *,
    issuer: str,
    key_sequence: int,
    subject: str,
    audience: str,
    actions: Iterable[str],
    resources: Iterable[str],
    expires: float,
    now: float,
    rng: Rng,
    not_before: float | None = None,
    delegations: int = 0,
) -> Capability:
    """Issue a root token. Times are seconds; ``not_before`` defaults to ``now``.

    ``delegations`` is how many times the subject (and those it delegates to)
    may delegate further; 0 makes the token non-delegable.

    Raises:
        LocalProtocolError: a malformed field (agent id, pattern, times), or
            the token would not decode (e.g. too large).
    """
    issued = math.floor(now * 1000)
    token = Capability(
        token_id=rng.bytes(TOKEN_ID_SIZE),
        issuer=issuer,
        key_sequence=key_sequence,
        subject=subject,
        audience=audience,
        actions=frozenset(actions),
        resources=frozenset(resources),
        issued_at_ms=issued,
        not_before_ms=issued if not_before is None else math.ceil(not_before * 1000),
        expires_ms=math.floor(expires * 1000),
        delegations=delegations,
    )
    return _sealed(token, signing_key)


def delegate(
    parent: Capability,
    signing_key: SigningKey,
    *,
    key_sequence: int,
    subject: str,
    now: float,
    rng: Rng,
    actions: Iterable[str] | None = None,
    resources: Iterable[str] | None = None,
    expires: float | None = None,
    not_before: float | None = None,
    delegations: int | None = None,
) -> Capability:
    """Delegate ``parent`` (held by its subject, who signs) to ``subject``.

    Omitted scope and expiry are the parent's; ``not_before`` defaults to the
    later of ``now`` and the parent's; ``delegations`` defaults to one fewer
    than the parent allows.

    Raises:
        LocalProtocolError: the child would be wider than the parent (rule 3),
            the chain too long, or a field malformed.
    """
    issued = max(math.floor(now * 1000), parent.issued_at_ms)
    nbf = max(issued, parent.not_before_ms) if not_before is None else not_before * 1000
    token = Capability(
        token_id=rng.bytes(TOKEN_ID_SIZE),
        issuer=parent.subject,
        key_sequence=key_sequence,
        subject=subject,
        audience=parent.audience,
        actions=parent.actions if actions is None else frozenset(actions),
        resources=parent.resources if resources is None else frozenset(resources),
        issued_at_ms=issued,
        not_before_ms=math.ceil(nbf),
        expires_ms=parent.expires_ms if expires is None else math.floor(expires * 1000),
        delegations=max(parent.delegations - 1, 0) if delegations is None else delegations,
        parent=parent,
    )
    reason = attenuation_error(token, parent)
    if reason is not None:
        raise LocalProtocolError(f"cannot delegate: {reason}")
    return _sealed(token, signing_key)


def _sealed(token: Capability, signing_key: SigningKey) -> Capability:
    """Sign, then prove the token decodes to itself (so a peer can read it)."""
    try:
        signed = token.signed_by(signing_key)
        if Capability.from_bytes(signed.to_bytes()) != signed:
            raise MalformedFrame("token does not survive encoding")
    except (MalformedFrame, UnsupportedVersion, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"invalid capability: {exc}") from exc
    return signed
