"""Capability tokens: signed, delegable, attenuated grants (ARCHITECTURE §7).

Rules (the invariants :func:`verify` enforces):

1. A token is one canonical CBOR map (:data:`TOKEN_FIELDS`), at most
   :data:`MAX_TOKEN_SIZE` bytes, signed with Ed25519 by its issuer's key at
   ``key_sequence`` over :data:`DOMAIN_PREFIX` + canonical CBOR of every
   other field. The text form is ``tcap1.`` + unpadded base64url of those bytes.
2. A *pattern* (action or resource) is 1..256 printable ASCII characters
   without spaces. ``*`` may only be the last character. A pattern without
   ``*`` matches exactly that string; ``p*`` matches every string that starts
   with ``p`` (``p`` itself included, no path-segment semantics: write
   ``files/*``, not ``files*``). Requests are matched literally.
3. A delegated token embeds its parent whole and is issued by the parent's
   subject, for the parent's audience. It *attenuates*: each of its patterns
   is covered by one parent pattern (``c`` is covered by ``p`` when
   ``c == p``, or ``p`` ends in ``*`` and ``c`` starts with ``p`` minus the
   star), its expiry is no later, its not-before and issue time no earlier.
   The chain's *depth* is its number of tokens (a root token has depth 1).
4. Verification walks the whole chain, root to leaf, and checks at EVERY
   depth: signature, attenuation, the validity window, revocation and the
   freshness of the issuer's revocation list. Validity is the closed interval
   ``[max(not_before, issued_at) - skew, expires + skew]``; a token issued
   further in the future than ``skew`` is refused as clock skew.
5. :func:`verify` never returns a verdict: it returns ``None`` or raises a
   :class:`~talos.errors.CapabilityDenied` subclass; a forged or tampered
   token, or one signed by a key no verified key log knows, raises
   :class:`~talos.errors.CapabilitySignatureInvalid`, which is also a
   :class:`~talos.errors.SignatureInvalid`.

The package is split by responsibility; import from ``talos.core.capability``,
which re-exports the public names of:

- :mod:`~talos.core.capability.token`: the token, its byte and text forms and
  decoding (rules 1 and 2);
- :mod:`~talos.core.capability.scope`: pattern matching and the attenuation
  test (rules 2 and 3);
- :mod:`~talos.core.capability.issuing`: issuing and delegating;
- :mod:`~talos.core.capability.verification`: :class:`CapabilityPolicy`,
  :func:`verify` and :class:`CapabilityVerifier` (rules 4 and 5), which caches
  chains that passed rule 4 and re-checks only what can change (time,
  revocations, freshness) on later calls.
"""

from talos.core.capability.issuing import delegate, issue
from talos.core.capability.scope import covers, matches
from talos.core.capability.token import (
    DOMAIN_PREFIX,
    MAX_CHAIN_LENGTH,
    MAX_TOKEN_SIZE,
    TEXT_PREFIX,
    TOKEN_FIELDS,
    TOKEN_ID_SIZE,
    TOKEN_VERSION,
    Capability,
)
from talos.core.capability.token import MAX_PATTERN_LENGTH as MAX_PATTERN_LENGTH
from talos.core.capability.token import MAX_PATTERNS as MAX_PATTERNS
from talos.core.capability.verification import (
    DEFAULT_CLOCK_SKEW,
    DEFAULT_MAX_DEPTH,
    CapabilityPolicy,
    CapabilityVerifier,
    verify,
)
from talos.core.capability.verification import MAX_ALLOWED_PER_TOKEN as MAX_ALLOWED_PER_TOKEN

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_MAX_DEPTH",
    "DOMAIN_PREFIX",
    "MAX_CHAIN_LENGTH",
    "MAX_TOKEN_SIZE",
    "TEXT_PREFIX",
    "TOKEN_FIELDS",
    "TOKEN_ID_SIZE",
    "TOKEN_VERSION",
    "Capability",
    "CapabilityPolicy",
    "CapabilityVerifier",
    "covers",
    "delegate",
    "issue",
    "matches",
    "verify",
]
