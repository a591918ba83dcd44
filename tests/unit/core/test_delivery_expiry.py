"""Rule 5 of talos.core.delivery: expiry as a pure function of ``now``."""

from __future__ import annotations

from talos.core.delivery import Delivery, Expiries, expires_at_ms


def test_expiry_is_counted_from_the_enqueue_time() -> None:
    assert expires_at_ms(1_000, 2.5) == 3_500
    assert expires_at_ms(1_000, 0.0001) == 1_001  # never the enqueue instant itself


def test_due_messages_leave_soonest_first_and_only_when_due() -> None:
    expiries = Expiries()
    expiries.add(b"late", "bob", 9_000)
    expiries.add(b"soon", "bob", 2_000)
    expiries.add(b"mid", "carol", 5_000)
    assert expiries.next_at() == 2.0
    assert expiries.due(1.999) == []
    assert expiries.due(5.0) == [(b"soon", "bob", 2_000), (b"mid", "carol", 5_000)]
    assert (len(expiries), expiries.next_at()) == (1, 9.0)
    assert expiries.due(100.0) == [(b"late", "bob", 9_000)]
    assert expiries.next_at() is None


def test_a_failure_is_recorded_with_its_reason() -> None:
    delivery = Delivery()
    delivery.track(b"m", "bob")
    assert delivery.count_failure(b"m", "PeerUnreachable: refused")
    record = delivery.get(b"m")
    assert record is not None
    assert (record.failures, record.last_failure) == (1, "PeerUnreachable: refused")
