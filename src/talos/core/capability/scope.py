"""What a pattern matches and when one token's scope lies within another's.

Owns rule 2's matching and rule 3's attenuation test of
:mod:`talos.core.capability`; delegating (:mod:`~talos.core.capability.issuing`)
and verifying (:mod:`~talos.core.capability.verification`) both ask this module,
so a delegation that would be refused is never issued.
"""

from __future__ import annotations

from talos.core.capability.token import Capability

__all__ = ["attenuation_error", "covers", "matched", "matches"]


def matches(pattern: str, value: str) -> bool:
    """Whether ``pattern`` (rule 2) matches the concrete request ``value``."""
    return pattern == value or (pattern[-1] == "*" and value.startswith(pattern[:-1]))


def covers(parent: str, child: str) -> bool:
    """Whether every string ``child`` matches is matched by ``parent`` (rule 3).

    Sound and exact for single patterns; for sets, :func:`_covered` asks for
    one covering parent pattern per child pattern, which is conservative.
    """
    return child == parent or (parent[-1] == "*" and child.startswith(parent[:-1]))


def _covered(children: frozenset[str], parents: frozenset[str]) -> bool:
    return all(any(covers(p, c) for p in parents) for c in children)


def matched(patterns: frozenset[str], value: str) -> bool:
    """Whether any of ``patterns`` matches ``value`` (the set form of :func:`matches`)."""
    return value in patterns or any(matches(p, value) for p in patterns)


def attenuation_error(child: Capability, parent: Capability) -> str | None:
    """Why ``child`` is not a valid delegation of ``parent`` (rule 3), or ``None``."""
    if child.issuer != parent.subject:
        return "issued by an agent that does not hold the parent"
    if child.audience != parent.audience:
        return "audience differs from the parent's"
    if parent.delegations < 1:
        return "the parent token is not delegable"
    if child.delegations > parent.delegations - 1:
        return "allows more further delegation than the parent"
    if not _covered(child.actions, parent.actions):
        return "actions wider than the parent's"
    if not _covered(child.resources, parent.resources):
        return "resources wider than the parent's"
    if child.expires_ms > parent.expires_ms:
        return "expires after the parent"
    if child.not_before_ms < parent.not_before_ms:
        return "valid before the parent"
    if child.issued_at_ms < parent.issued_at_ms:
        return "issued before the parent"
    return None
