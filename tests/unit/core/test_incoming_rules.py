"""The receive path's decisions (talos.core.incoming), rule by rule."""

from __future__ import annotations

from talos.core import incoming, wire
from talos.core.replay import ReplayWindow
from talos.errors import RevocationListStale, ScopeMismatch, SessionError

NOW_MS = 1_700_000_000_000


def _envelope(
    *, timestamp_ms: int = NOW_MS, kind: wire.EnvelopeType = wire.EnvelopeType.MESSAGE
) -> wire.Envelope:
    return wire.Envelope(
        type=kind,
        message_id=b"\x01" * 16,
        sender="bob",
        sender_instance=b"\x02" * 16,
        recipient="alice",
        timestamp_ms=timestamp_ms,
        ratchet_header=b"h",
        ciphertext=b"c",
        x3dh_header=b"x" if kind is wire.EnvelopeType.INITIAL else None,
    )


def test_rule_1_a_copy_being_committed_is_ignored() -> None:
    verdict = incoming.check_fresh(ReplayWindow(), b"id", _envelope(), NOW_MS, {b"id"})
    assert isinstance(verdict, incoming.Ignore)


def test_rule_2_a_recorded_id_is_a_duplicate() -> None:
    window = ReplayWindow()
    assert incoming.check_fresh(window, b"id", _envelope(), NOW_MS, set()) is None
    window.record(b"id", NOW_MS, NOW_MS)
    verdict = incoming.check_fresh(window, b"id", _envelope(), NOW_MS, set())
    assert isinstance(verdict, incoming.Duplicate)


def test_rule_3_old_and_future_messages_are_refused_stale() -> None:
    window = ReplayWindow()
    old = incoming.check_fresh(window, b"id", _envelope(timestamp_ms=NOW_MS - 10**8), NOW_MS, set())
    assert isinstance(old, incoming.Refusal)
    assert old.code is wire.ErrorCode.STALE
    assert old.event == "stale_message"
    assert old.security
    assert old.audit == ("PEER_REJECTED", {"id": b"\x01" * 16, "reason": "stale"})
    ahead = incoming.check_fresh(
        window, b"id", _envelope(timestamp_ms=NOW_MS + 10**6), NOW_MS, set()
    )
    assert isinstance(ahead, incoming.Refusal)
    assert ahead.event == "clock_skew"


def test_rule_4_capability_refusals() -> None:
    denied = incoming.capability_refusal(_envelope(), ScopeMismatch("no capability attached"))
    assert denied.code is wire.ErrorCode.CAPABILITY_DENIED
    assert denied.audit == ("CAPABILITY_DENIED", {"id": b"\x01" * 16, "reason": "ScopeMismatch"})
    assert denied.event == "capability_denied"
    later = incoming.capability_refusal(_envelope(), RevocationListStale("list too old"))
    assert later.code is wire.ErrorCode.UNAVAILABLE  # try later, not a denial
    assert not later.security
    long = incoming.capability_refusal(_envelope(), ScopeMismatch("x" * 1000))
    assert len(long.reason) == incoming.MAX_REASON


def test_rule_5_the_lower_id_keeps_its_own_handshake() -> None:
    asked: list[str] = []

    def waiting(peer: str) -> bool:
        asked.append(peer)
        return True

    initial = _envelope(kind=wire.EnvelopeType.INITIAL)
    assert incoming.keeps_own_handshake(initial, "alice", waiting)  # "alice" < "bob"
    assert not incoming.keeps_own_handshake(initial, "carol", waiting)
    assert not incoming.keeps_own_handshake(_envelope(), "alice", waiting)
    assert asked == ["bob"]  # asked only when it matters
    assert not incoming.keeps_own_handshake(initial, "alice", lambda peer: False)
    assert incoming.simultaneous_open_refusal().code is wire.ErrorCode.UNAVAILABLE


def test_rule_6_undecryptable_messages_are_refused_decrypt_failed() -> None:
    refusal = incoming.decrypt_refusal(_envelope(), SessionError("no session"))
    assert refusal.code is wire.ErrorCode.DECRYPT_FAILED
    assert refusal.audit == ("DECRYPTION_FAILURE", {"id": b"\x01" * 16, "reason": "SessionError"})
    assert refusal.event == "decrypt_failed"
