"""Outcomes of sent messages: settled once, remembered, waited for (talos.client.outcomes)."""

from __future__ import annotations

import asyncio

import pytest

from talos.audit import AuditEntry
from talos.client.outcomes import MessageOutcome, Outcomes, from_audit
from talos.core.delivery import Outcome


def test_settled_outcomes_are_remembered_up_to_a_bound() -> None:
    outcomes = Outcomes(remembered=2)
    assert outcomes.settle(b"\1", "bob", Outcome.UNQUEUED, None) is None
    outcomes.settle(b"\1", "bob", Outcome.DELIVERED, None)
    outcomes.settle(b"\2", "bob", Outcome.REFUSED, "refused by the peer: no")
    outcomes.settle(b"\3", "bob", Outcome.EXPIRED, None)
    assert outcomes.get(b"\1") is None  # the oldest went
    assert outcomes.get(b"\2") == MessageOutcome("02", "bob", "failed", "refused by the peer: no")
    assert outcomes.get(b"\3") == MessageOutcome("03", "bob", "expired")


@pytest.mark.asyncio
async def test_waiters_get_the_outcome_once_settled() -> None:
    outcomes = Outcomes()
    waiter = outcomes.waiter(b"\1")
    outcomes.settle(b"\1", "bob", Outcome.CANCELLED, "cancelled after 0 attempt(s)")
    assert (await asyncio.wait_for(waiter, 1)).state == "cancelled"
    forgotten = outcomes.waiter(b"\2")
    outcomes.forget_waiter(b"\2", forgotten)
    outcomes.release()
    assert not forgotten.done()


def test_the_audit_log_answers_for_outcomes_before_a_restart() -> None:
    entries = [
        AuditEntry(1, 0, "MESSAGE_SENT", "bob", {"id": b"\1"}),
        AuditEntry(2, 0, "PEER_REJECTED", "bob", {"id": b"\1", "reason": "no capability"}),
        AuditEntry(3, 0, "MESSAGE_DELIVERED", "bob", {"id": b"\2", "status": 0}),
    ]
    assert from_audit(entries, b"\1") == MessageOutcome("01", "bob", "failed", "no capability")
    assert from_audit(entries, b"\2") == MessageOutcome("02", "bob", "delivered")
    assert from_audit(entries, b"\3") is None
