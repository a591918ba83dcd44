"""Revocation lists and the verifier's view of them (ARCHITECTURE §7).

Rules (the invariants every holder of lists enforces):

1. Each issuer publishes its own :class:`RevocationList`: revoked token ids,
   a cut-off "every token issued before T" (``revoked_before_ms``; 0 means
   none) and revoked issuer key sequence numbers. A list is signed by the
   issuer's key at ``key_sequence`` over :data:`DOMAIN_PREFIX` + canonical
   CBOR of every other field, and carries the time it was issued.
2. Versions increase and lists only grow: a higher version must revoke
   everything a lower one did (:meth:`RevocationList.covers`).
3. :func:`merge` of two lists of one issuer is deterministic and symmetric:
   the higher version wins when it covers the lower; otherwise the lower is
   kept and the pair is reported as ``NOT_APPEND_ONLY``. Two different lists
   with the same version are a *fork*, reported as ``FORKED``; the one that
   revokes more is kept (ties broken by the encoded bytes), so every node that
   saw both lists keeps the same one. Both are security events carrying the
   two lists as evidence: the issuer's key may be stolen, and it recovers by
   publishing a higher version that covers both.
4. Freshness is what the synchronization layer says it is: it calls
   :meth:`RevocationState.mark_synced` when it has confirmed it holds an
   issuer's newest list (or that the issuer has none). An issuer's list is
   *stale* at ``now`` when ``now > last_synced + max_age``; never synced means
   infinitely old. What a stale list means depends on the
   :class:`RevocationMode`:

   * ``strict``: deny with :class:`~talos.errors.RevocationListStale`;
   * ``permissive``: allow, with a :class:`StaleListAccepted` warning, while
     ``now <= last_synced + max_age + grace``; deny after that;
   * ``offline``: allow indefinitely, with a warning each time.

   Core does not log: warnings are returned to the caller
   (:mod:`talos.core.capability` hands them to the policy's ``on_warning``).

All times inside lists and tokens are integer milliseconds; ``now`` and the
policy durations are float seconds.

The package is split by responsibility; import from ``talos.core.revocation``,
which re-exports the public names of :mod:`~talos.core.revocation.lists`
(rules 1 to 3: the list, its encoding, :func:`merge`) and
:mod:`~talos.core.revocation.state` (rule 4: the freshness policy and the
verifier's :class:`RevocationState`), and the key lookup of
:mod:`talos.core.keylog` that verifying a list needs.
"""

from talos.core.keylog import IssuerKeys, KeyLookup, resolve_key
from talos.core.revocation.lists import (
    DOMAIN_PREFIX,
    LIST_VERSION,
    MAX_LIST_SIZE,
    MergeOutcome,
    MergeResult,
    RevocationList,
    merge,
)
from talos.core.revocation.lists import TOKEN_ID_SIZE as TOKEN_ID_SIZE
from talos.core.revocation.state import (
    DEFAULT_GRACE,
    DEFAULT_MAX_AGE,
    RevocationMode,
    RevocationPolicy,
    RevocationState,
    StaleListAccepted,
)

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_AGE",
    "DOMAIN_PREFIX",
    "LIST_VERSION",
    "MAX_LIST_SIZE",
    "IssuerKeys",
    "KeyLookup",
    "MergeOutcome",
    "MergeResult",
    "RevocationList",
    "RevocationMode",
    "RevocationPolicy",
    "RevocationState",
    "StaleListAccepted",
    "merge",
    "resolve_key",
]
