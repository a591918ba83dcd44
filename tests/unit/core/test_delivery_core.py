"""The outbound delivery state machine (talos.core.delivery), driven by hand."""

from __future__ import annotations

import pytest

from talos.core import wire
from talos.core.delivery import (
    ACK_TIMEOUT,
    RESET_INTERVAL,
    SEND_WINDOW,
    Delivery,
    Window,
    window_size,
)
from talos.errors import DeliveryTimeout, SessionError

PEER = "peer"


def _ack(refs: tuple[bytes, ...], sender: str = PEER) -> wire.Envelope:
    return wire.Envelope(
        type=wire.EnvelopeType.ACK,
        message_id=b"\x09" * 16,
        sender=sender,
        sender_instance=b"\x01" * 16,
        recipient="me",
        timestamp_ms=1,
        ref_ids=refs,
        status=wire.AckStatus.ACCEPTED,
    )


def _in_flight(delivery: Delivery, *ids: bytes, now: float = 0.0) -> Window:
    window = delivery.window(PEER)
    for seq, message_id in enumerate(ids):
        window.transmitted(
            delivery.track(message_id, PEER),
            seq=seq,
            size=10 * (seq + 1),
            sent_at=1000.0 + now,
            deadline=now + ACK_TIMEOUT,
        )
    return window


def test_one_record_per_message_tracked_once() -> None:
    delivery = Delivery()
    first = delivery.track(b"a", PEER)
    assert delivery.track(b"a", PEER) is first
    assert delivery.get(b"a") is first
    assert delivery.finish(b"a") is first
    assert delivery.get(b"a") is None
    assert delivery.finish(b"a") is None  # leaves exactly once


def test_window_size_is_one_until_the_peer_holds_the_session() -> None:
    assert window_size(confirmed=False) == 1
    assert window_size(confirmed=True) == SEND_WINDOW


def test_window_facts_follow_transmissions() -> None:
    delivery = Delivery()
    window = _in_flight(delivery, b"a", b"b", b"c")
    assert len(window) == 3
    assert window.head() == b"a"
    assert window.last_seq() == 2
    assert window.bytes_in_flight() == 10 + 20 + 30
    assert window.next_deadline() == ACK_TIMEOUT
    window.failed()
    assert len(window) == 0
    assert window.last_seq() is None


def test_tick_forgets_finished_and_removing_messages() -> None:
    delivery = Delivery()
    window = _in_flight(delivery, b"a", b"b", b"c")
    assert window.tick(1.0, delivery).progressed is False
    delivery.finish(b"a")
    delivery.acked(_ack((b"b",)), [b"b"])
    check = window.tick(1.0, delivery)
    assert check.progressed is True
    assert check.failure is None
    assert list(window.inflight) == [b"c"]


def test_a_handshake_message_holds_the_window_until_its_removal_commits() -> None:
    """The first message of an unconfirmed session stays in flight while its ACK's
    removal commits: its ACK confirms the session only after that commit, and the
    next message sent meanwhile would carry the same X3DH header again (found by the
    soak: the peer refused it DECRYPT_FAILED, and it arrived after later ones)."""
    delivery = Delivery()
    window = _in_flight(delivery, b"a")
    delivery.get(b"a").handshake = b"x3dh header"  # type: ignore[union-attr]
    delivery.acked(_ack((b"a",)), [b"a"])
    assert window.tick(1.0, delivery).progressed is False
    assert list(window.inflight) == [b"a"]
    delivery.start_removal()
    assert list(window.inflight) == [b"a"]
    delivery.removal_committed()
    delivery.finish(b"a")  # released as delivered, and the session confirmed
    assert window.tick(1.0, delivery).progressed is True
    assert len(window) == 0


def test_a_passed_ack_deadline_fails_the_window() -> None:
    delivery = Delivery()
    window = _in_flight(delivery, b"a", now=5.0)
    assert window.tick(5.0 + ACK_TIMEOUT - 0.001, delivery).failure is None
    failure = window.tick(5.0 + ACK_TIMEOUT, delivery).failure
    assert isinstance(failure, DeliveryTimeout)


def test_unavailable_nacks_and_the_next_transmission_clears_it() -> None:
    delivery = Delivery()
    window = _in_flight(delivery, b"a")
    action = delivery.refused(b"a", PEER, wire.ErrorCode.UNAVAILABLE, now=0.0)
    assert (action.retry, action.reset_session, action.final) == (True, False, False)
    assert isinstance(window.tick(0.0, delivery).failure, SessionError)
    record = delivery.get(b"a")
    assert record is not None
    window.transmitted(record, seq=0, size=1, sent_at=0.0, deadline=10.0)
    assert window.tick(0.0, delivery).failure is None


def test_decrypt_failed_resets_at_most_once_per_interval() -> None:
    delivery = Delivery()
    _in_flight(delivery, b"a")
    code = wire.ErrorCode.DECRYPT_FAILED
    assert delivery.refused(b"a", PEER, code, now=100.0).reset_session is True
    assert delivery.refused(b"a", PEER, code, now=100.0 + RESET_INTERVAL / 2).reset_session is False
    assert delivery.refused(b"a", PEER, code, now=100.0 + RESET_INTERVAL).reset_session is True
    assert delivery.refused(b"a", "other", code, now=100.0 + RESET_INTERVAL).reset_session is True


def test_an_untracked_refusal_does_not_wake_anyone() -> None:
    delivery = Delivery()
    action = delivery.refused(b"zz", PEER, wire.ErrorCode.UNAVAILABLE, now=0.0)
    assert action.retry is False


@pytest.mark.parametrize("code", [wire.ErrorCode.CAPABILITY_DENIED, wire.ErrorCode.STALE, None])
def test_other_refusals_are_final(code: wire.ErrorCode | None) -> None:
    delivery = Delivery()
    _in_flight(delivery, b"a")
    assert delivery.refused(b"a", PEER, code, now=0.0).final is True


def test_acked_messages_are_removed_in_batches() -> None:
    delivery = Delivery()
    _in_flight(delivery, b"a", b"b")
    ack = _ack((b"a", b"b"))
    delivery.acked(ack, [b"a"])
    assert delivery.being_removed(b"a")
    assert not delivery.being_removed(b"b")
    batch = delivery.start_removal()
    assert list(batch) == [b"a"]
    assert delivery.being_removed(b"a")  # while its commit runs
    delivery.acked(ack, [b"a", b"b"])  # a's second ACK is ignored; b forms the next batch
    delivery.removal_committed()
    assert not delivery.being_removed(b"a")
    assert delivery.has_removals()
    assert list(delivery.start_removal()) == [b"b"]
    delivery.removal_committed()
    assert not delivery.has_removals()


def test_a_failed_removal_restarts_the_peers_window() -> None:
    delivery = Delivery()
    window = _in_flight(delivery, b"a", b"b")
    window.outgoing.append((b"b", b"frame"))
    delivery.acked(_ack((b"a",)), [b"a"])
    batch = delivery.start_removal()
    assert delivery.removal_failed(batch) == {PEER}
    assert len(window) == 0
    assert window.take_outgoing() == []


def test_failures_are_counted_only_for_tracked_messages() -> None:
    delivery = Delivery()
    delivery.track(b"a", PEER)
    assert delivery.count_failure(b"a") is True
    assert delivery.count_failure(b"a") is True
    record = delivery.get(b"a")
    assert record is not None
    assert record.failures == 2
    assert delivery.count_failure(b"untracked") is False
