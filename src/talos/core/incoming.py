"""What happens to an incoming message: the decisions of the receive path, pure.

The asyncio receiver (:mod:`talos.client.receiving`) verifies the envelope's
signature, then walks these rules in this order, acting on each verdict.
Nothing here touches state: a refusal changes nothing but the audit log
and the answer the sender gets.

Rules, in order:

1. A copy of the message is already decrypted and waiting for its group
   commit: *ignore* it (that commit's ACK answers both).
2. Its id is in the replay window: *duplicate*. It is acknowledged again
   (the first ACK may have been lost) and audited, rate-limited.
3. It is too old, or from too far in the future: *refuse* ``STALE``,
   audited as ``PEER_REJECTED``; logged as clock skew when from the future.
4. Its capability does not authorize it: *refuse* ``CAPABILITY_DENIED``, or
   ``UNAVAILABLE`` (try later) when only a stale revocation list stands in
   the way; audited as ``CAPABILITY_DENIED``.
5. Both agents opened a session with each other at once and this agent has
   the lower id: *refuse* ``UNAVAILABLE``; the peer adopts our session.
6. It does not decrypt (or its payload does not decode): *refuse*
   ``DECRYPT_FAILED``, audited as ``DECRYPTION_FAILURE``; the sender resets.
7. Otherwise *accept*: committed with its ratchet state, replay entry,
   audit entry and inbox row in one transaction, then acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from talos.core import wire
from talos.core.replay import ReplayWindow
from talos.errors import (
    CapabilityDenied,
    DuplicateMessage,
    RevocationListStale,
    StaleMessage,
    TalosError,
)

__all__ = [
    "REFUSAL_EVENTS",
    "SECURITY_REFUSALS",
    "Duplicate",
    "Ignore",
    "Refusal",
    "capability_refusal",
    "check_fresh",
    "decrypt_refusal",
    "keeps_own_handshake",
    "simultaneous_open_refusal",
]

#: Refusals logged as security events (WARNING), and their log event names.
SECURITY_REFUSALS: Final = frozenset({wire.ErrorCode.CAPABILITY_DENIED, wire.ErrorCode.STALE})
REFUSAL_EVENTS: Final = {
    wire.ErrorCode.CAPABILITY_DENIED: "capability_denied",
    wire.ErrorCode.STALE: "stale_message",
    wire.ErrorCode.DECRYPT_FAILED: "decrypt_failed",
}

#: Longest reason sent back to a peer or written in the audit log.
MAX_REASON: Final = 200


@dataclass(frozen=True, slots=True)
class Ignore:
    """Rule 1: say nothing now."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Rule 2: acknowledge again as DUPLICATE."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Answer a signed ERROR ``code`` with ``reason``; write ``audit`` (kind, fields) if
    given; log under ``event``."""

    code: wire.ErrorCode
    reason: str
    audit: tuple[str, dict[str, Any]] | None
    event: str

    @property
    def security(self) -> bool:
        """Logged as a WARNING (a security event) rather than INFO."""
        return self.code in SECURITY_REFUSALS


def _refusal(
    code: wire.ErrorCode, reason: str, audit: tuple[str, dict[str, Any]] | None, event: str = ""
) -> Refusal:
    return Refusal(code, reason[:MAX_REASON], audit, event or REFUSAL_EVENTS.get(code, "refused"))


def check_fresh(
    window: ReplayWindow,
    replay_id: bytes,
    envelope: wire.Envelope,
    now_ms: int,
    staged: set[bytes] | frozenset[bytes],
) -> Ignore | Duplicate | Refusal | None:
    """Rules 1-3; ``None`` when the message is fresh and new."""
    if replay_id in staged:
        return Ignore()
    try:
        window.check(replay_id, envelope.timestamp_ms, now_ms)
    except DuplicateMessage:
        return Duplicate()
    except StaleMessage as exc:
        return _refusal(
            wire.ErrorCode.STALE,
            str(exc),
            ("PEER_REJECTED", {"id": envelope.message_id, "reason": "stale"}),
            "clock_skew" if envelope.timestamp_ms > now_ms else "stale_message",
        )
    return None


def capability_refusal(envelope: wire.Envelope, error: CapabilityDenied) -> Refusal:
    """Rule 4."""
    code = (
        wire.ErrorCode.UNAVAILABLE
        if isinstance(error, RevocationListStale)
        else wire.ErrorCode.CAPABILITY_DENIED
    )
    audit = ("CAPABILITY_DENIED", {"id": envelope.message_id, "reason": type(error).__name__})
    return _refusal(code, str(error), audit)


def keeps_own_handshake(
    envelope: wire.Envelope, our_id: str, awaiting_confirmation: Callable[[str], bool]
) -> bool:
    """Rule 5: an X3DH initial message, we have the lower id, and our own opening of
    a session with the sender is unconfirmed (asked last, only when it matters)."""
    return (
        envelope.type is wire.EnvelopeType.INITIAL
        and our_id <= envelope.sender
        and awaiting_confirmation(envelope.sender)
    )


def simultaneous_open_refusal() -> Refusal:
    """Rule 5's answer."""
    return _refusal(wire.ErrorCode.UNAVAILABLE, "both sides opened a session; use mine", None)


def decrypt_refusal(envelope: wire.Envelope, error: TalosError) -> Refusal:
    """Rule 6."""
    audit = ("DECRYPTION_FAILURE", {"id": envelope.message_id, "reason": type(error).__name__})
    return _refusal(wire.ErrorCode.DECRYPT_FAILED, "cannot decrypt; re-establish", audit)
