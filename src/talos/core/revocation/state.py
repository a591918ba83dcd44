"""The verifier's view of revocations: freshness policy and the lists in use.

Owns rule 4 of :mod:`talos.core.revocation`: :class:`RevocationPolicy` (how old
a list may be, per :class:`RevocationMode`), :class:`RevocationState` (each
issuer's list in use, when it was last synchronized, and the conflicts seen)
and the decision :meth:`RevocationState.check` makes for one token. Core does
not log: a stale list that is accepted comes back as a
:class:`StaleListAccepted` warning.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from talos.core.keylog import KeyLookup
from talos.core.revocation.lists import MergeResult, RevocationList, merge
from talos.errors import ConfigurationError, RevocationListStale, Revoked

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_AGE",
    "RevocationMode",
    "RevocationPolicy",
    "RevocationState",
    "StaleListAccepted",
]

DEFAULT_MAX_AGE: Final = 300.0
DEFAULT_GRACE: Final = 3600.0


# -- freshness policy ---------------------------------------------------------------


class RevocationMode(enum.StrEnum):
    """How to treat a revocation list older than ``max_age`` (Failure-Modes)."""

    STRICT = "strict"
    PERMISSIVE = "permissive"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class RevocationPolicy:
    """Freshness requirements: mode, ``max_age`` and the permissive ``grace`` (seconds)."""

    mode: RevocationMode = RevocationMode.STRICT
    max_age: float = DEFAULT_MAX_AGE
    grace: float = DEFAULT_GRACE

    def __post_init__(self) -> None:
        """Raises: ConfigurationError: unknown mode or a negative duration."""
        if not isinstance(self.mode, RevocationMode):
            raise ConfigurationError(f"unknown revocation mode {self.mode!r}")
        if not (self.max_age >= 0 and self.grace >= 0):
            raise ConfigurationError("revocation max_age and grace must not be negative")


@dataclass(frozen=True, slots=True)
class StaleListAccepted:
    """Warning: a token was allowed although its issuer's list is older than ``max_age``."""

    issuer: str
    mode: RevocationMode
    age_seconds: float

    @property
    def message(self) -> str:
        return (
            f"revocation list of {self.issuer} is {self.age_seconds:.0f} s old; "
            f"accepted in {self.mode} mode"
        )


# -- the verifier's state -----------------------------------------------------------


@dataclass(slots=True)
class RevocationState:
    """The lists a verifier uses, when each issuer was last synchronized, and conflicts.

    Sans-I/O and mutable; persistence stores :meth:`RevocationList.to_bytes`
    and the sync time per issuer and replays them through :meth:`apply` and
    :meth:`mark_synced`. ``generation`` increases whenever the revocations in
    use change, which is how cached verifications notice.
    """

    _lists: dict[str, RevocationList] = field(default_factory=dict)
    _synced: dict[str, float] = field(default_factory=dict)
    #: Forks and append-only violations seen, in order: evidence for the audit log.
    conflicts: list[MergeResult] = field(default_factory=list)
    generation: int = 0

    def apply(self, offered: RevocationList, *, keys: KeyLookup) -> MergeResult:
        """Verify ``offered`` and merge it with the issuer's list in use.

        A security event is recorded in :attr:`conflicts` and returned; it is
        not raised, so synchronization of other issuers goes on.

        Raises:
            SignatureInvalid: the list is not signed by its issuer.
        """
        offered.verify_signature(keys)
        result = merge(self._lists.get(offered.issuer), offered)
        if result.security_event:
            self.conflicts.append(result)
        if result.changed:
            self._lists[offered.issuer] = result.kept
            self.generation += 1
        return result

    def mark_synced(self, issuer: str, now: float) -> None:
        """Record that at ``now`` this state holds ``issuer``'s newest list (or it has none)."""
        self._synced[issuer] = max(now, self._synced.get(issuer, now))

    def list_for(self, issuer: str) -> RevocationList | None:
        return self._lists.get(issuer)

    @property
    def lists(self) -> Mapping[str, RevocationList]:
        return dict(self._lists)

    def last_synced(self, issuer: str) -> float | None:
        return self._synced.get(issuer)

    def revocation_list_age_seconds(self, now: float) -> float:
        """Age of the oldest list in use: the ``talos_revocation_list_age_seconds`` gauge.

        An issuer with a list but no sync counts as infinitely old; 0.0 when
        no issuer is known.
        """
        issuers = self._lists.keys() | self._synced.keys()
        if not issuers:
            return 0.0
        return max(now - self._synced.get(issuer, -math.inf) for issuer in issuers)

    def fresh_until(self, issuer: str, policy: RevocationPolicy) -> float:
        """The last ``now`` at which ``issuer``'s list is within ``max_age``."""
        return self._synced.get(issuer, -math.inf) + policy.max_age

    def check(
        self,
        issuer: str,
        token_id: bytes,
        issued_at_ms: int,
        key_sequence: int,
        *,
        now: float,
        policy: RevocationPolicy,
    ) -> StaleListAccepted | None:
        """Is this token of ``issuer`` revoked, and is the list fresh enough to say?

        Returns a warning when a stale list is accepted under the policy.

        Raises:
            Revoked: the issuer's list revokes the token id, every token issued
                before the token's issue time, or the key sequence that signed it.
            RevocationListStale: the list is too old for the policy's mode.
        """
        lst = self._lists.get(issuer)
        if lst is not None:
            reason = lst.revocation_of(token_id, issued_at_ms, key_sequence)
            if reason is not None:
                raise Revoked(f"capability {token_id.hex()} of {issuer}: {reason}")
        synced = self._synced.get(issuer, -math.inf)
        if now <= synced + policy.max_age:
            return None
        return _stale(issuer, synced, now, policy)


def _stale(issuer: str, synced: float, now: float, policy: RevocationPolicy) -> StaleListAccepted:
    """Apply the mode to a list last synchronized at ``synced``, older than ``max_age``.

    Raises:
        RevocationListStale: strict mode, or permissive beyond the grace period.
    """
    mode, age = policy.mode, now - synced
    if mode is RevocationMode.OFFLINE:
        return StaleListAccepted(issuer, mode, age)
    if mode is RevocationMode.PERMISSIVE and now <= synced + policy.max_age + policy.grace:
        return StaleListAccepted(issuer, mode, age)
    limit = policy.max_age + (policy.grace if mode is RevocationMode.PERMISSIVE else 0.0)
    raise RevocationListStale(
        f"revocation list of {issuer} is {age:.0f} s old, beyond the {limit:.0f} s "
        f"allowed in {mode} mode"
    )
