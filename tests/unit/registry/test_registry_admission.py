"""Admission policy as plain logic: which refusal each rule gives, without a database or HTTP."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
from registry_fixtures import Agent, make_agent

from talos.core.revocation import merge
from talos.registry.admission import (
    Refusal,
    RefusalKind,
    Refused,
    admit_keylog,
    admit_prekeys,
    admit_record,
    admit_revocations,
    check_same_agent,
    judge_merge,
)
from talos.registry.answers import REFUSAL_STATUS
from talos.registry.drain import client_key
from talos.registry.metrics import REJECTION_REASONS
from talos.testing import FakeClock


def kind(refusal: Refusal | None) -> RefusalKind | None:
    return None if refusal is None else refusal.kind


# -- refusals -------------------------------------------------------------------------------


def test_a_refusal_is_frozen_and_carried_by_refused() -> None:
    refusal = Refusal(RefusalKind.STALE_SEQUENCE, "not above 3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        refusal.reason = "other"  # type: ignore[misc]
    raised = Refused(refusal)
    assert (raised.refusal, raised.kind, raised.reason, str(raised)) == (
        refusal,
        "StaleSequence",
        "not above 3",
        "not above 3",
    )


def test_every_kind_has_one_status_and_a_metric_label() -> None:
    assert set(REFUSAL_STATUS) == set(RefusalKind)
    assert all(400 <= status < 500 for status in REFUSAL_STATUS.values())
    assert {k.value for k in RefusalKind} <= set(REJECTION_REASONS)


def test_only_forks_are_security_events() -> None:
    events = {k: k.security_event for k in RefusalKind if k.security_event is not None}
    assert events == {
        RefusalKind.KEYLOG_FORK: "keylog-fork",
        RefusalKind.REVOCATION_FORK: "revocation-forked",
        RefusalKind.REVOCATION_NOT_APPEND_ONLY: "revocation-not-append-only",
    }


def test_a_body_must_concern_the_path_agent() -> None:
    assert check_same_agent("did:talos:za", "did:talos:za") is None
    refusal = check_same_agent("did:talos:za", "did:talos:zb")
    assert refusal == Refusal(
        RefusalKind.AGENT_MISMATCH, "body is for did:talos:zb, the path names did:talos:za"
    )


# -- key logs ---------------------------------------------------------------------------------


def test_a_keylog_is_admitted_new_same_or_extended(alice: Agent) -> None:
    first = alice.identity.keylog
    assert admit_keylog(None, first) is None
    assert admit_keylog(first, first) is None
    alice.rotate()
    assert admit_keylog(first, alice.identity.keylog) is None


def test_a_shorter_keylog_is_a_rollback(alice: Agent) -> None:
    first = alice.identity.keylog
    alice.rotate()
    refusal = admit_keylog(alice.identity.keylog, first)
    assert kind(refusal) is RefusalKind.KEYLOG_ROLLBACK
    assert refusal is not None
    assert refusal.kind.security_event is None
    assert "(rollback)" in refusal.reason


def test_another_history_is_a_fork(alice: Agent) -> None:
    known = alice.identity.keylog
    twin = replace(alice, rng=type(alice.rng)(99))
    alice.rotate()
    twin.rotate()
    refusal = admit_keylog(alice.identity.keylog, twin.identity.keylog)
    assert kind(refusal) is RefusalKind.KEYLOG_FORK
    assert refusal is not None
    assert "fork at key event sequence 1" in refusal.reason
    assert admit_keylog(known, twin.identity.keylog) is None  # before the fork: an extension


# -- prekeys ----------------------------------------------------------------------------------


def test_prekeys_refusals_in_order(alice: Agent, clock: FakeClock) -> None:
    upload = alice.upload(2)
    log = alice.identity.keylog
    assert kind(admit_prekeys(upload, None, None)) is RefusalKind.UNKNOWN_AGENT
    assert admit_prekeys(upload, log, None) is None
    assert admit_prekeys(upload, log, upload.sequence - 1) is None
    assert kind(admit_prekeys(upload, log, upload.sequence)) is RefusalKind.STALE_SEQUENCE
    mallory = make_agent("mallory", 66, clock)
    forged = replace(upload, signature=mallory.upload(1).signature)
    # The signature is checked before the sequence: a forgery learns nothing of it.
    assert kind(admit_prekeys(forged, log, upload.sequence)) is RefusalKind.BAD_SIGNATURE
    alice.rotate()
    rotated = alice.identity.keylog
    assert kind(admit_prekeys(upload, rotated, None)) is RefusalKind.NOT_CURRENT_KEY
    assert admit_prekeys(alice.upload(), rotated, upload.sequence) is None


def test_a_signed_prekey_must_vouch_for_the_current_keys(alice: Agent) -> None:
    stale = alice.upload(1)
    alice.rotate()
    # Signed by the new key, but carrying the signed prekey made for the old identity DH key.
    resigned = type(stale).create(
        alice.identity.signing_key,
        agent_id=alice.agent_id,
        key_sequence=alice.identity.sequence,
        sequence=9,
        signed_prekey_id=stale.signed_prekey_id,
        signed_prekey=stale.signed_prekey,
        signed_prekey_signature=stale.signed_prekey_signature,
    )
    refusal = admit_prekeys(resigned, alice.identity.keylog, None)
    assert kind(refusal) is RefusalKind.BAD_SIGNATURE
    assert refusal is not None
    assert "current identity keys" in refusal.reason


# -- peer records -------------------------------------------------------------------------------


def test_record_refusals(alice: Agent, clock: FakeClock) -> None:
    now = clock.time()
    log = alice.identity.keylog
    record = alice.record(sequence=5, lifetime=10)
    assert kind(admit_record(record, None, None, now=now)) is RefusalKind.UNKNOWN_AGENT
    assert admit_record(record, log, None, now=now) is None
    assert admit_record(record, log, 4, now=now) is None
    assert kind(admit_record(record, log, 5, now=now)) is RefusalKind.STALE_SEQUENCE
    forged = replace(record, endpoint="ws://10.0.0.1:1")
    assert kind(admit_record(forged, log, 5, now=now)) is RefusalKind.BAD_SIGNATURE
    alice.rotate()
    assert kind(admit_record(record, alice.identity.keylog, None, now=now)) is (
        RefusalKind.NOT_CURRENT_KEY
    )


def test_records_expired_or_from_the_future_are_stale(alice: Agent, clock: FakeClock) -> None:
    now = clock.time()
    log = alice.identity.keylog
    record = alice.record(lifetime=10)
    # Expired by the registry's clock, though within a peer's skew tolerance.
    refusal = admit_record(record, log, None, now=now + 11)
    assert refusal == Refusal(RefusalKind.STALE_MESSAGE, f"peer record of {alice.agent_id} expired")
    assert kind(admit_record(record, log, None, now=now + 10 + 61)) is RefusalKind.STALE_MESSAGE
    clock.advance(3600)
    ahead = alice.record()
    assert kind(admit_record(ahead, log, None, now=now)) is RefusalKind.STALE_MESSAGE


def test_a_record_sequence_beyond_storage_is_malformed(alice: Agent, clock: FakeClock) -> None:
    record = alice.record(sequence=2**63)
    refusal = admit_record(record, alice.identity.keylog, None, now=clock.time())
    assert kind(refusal) is RefusalKind.MALFORMED


# -- revocation lists -----------------------------------------------------------------------------


def test_revocations_need_a_known_issuer_and_any_key_of_its_log(
    alice: Agent, clock: FakeClock
) -> None:
    offered = alice.revocations(1)
    assert kind(admit_revocations(offered, None)) is RefusalKind.UNKNOWN_AGENT
    alice.rotate()
    assert admit_revocations(offered, alice.identity.keylog) is None  # an older key of the log
    mallory = make_agent("mallory", 66, clock)
    forged = replace(offered, signature=mallory.revocations(1).signature)
    assert kind(admit_revocations(forged, alice.identity.keylog)) is RefusalKind.BAD_SIGNATURE


def test_merge_outcomes_and_their_refusals(alice: Agent) -> None:
    v1 = alice.revocations(1)
    v2 = alice.revocations(2, ids=(b"\x01" * 16,))
    assert judge_merge(merge(None, v1)) is None  # adopted
    assert judge_merge(merge(v1, v1)) is None  # unchanged
    assert judge_merge(merge(v1, v2)) is None  # adopted
    older = judge_merge(merge(v2, v1))
    assert older == Refusal(
        RefusalKind.STALE_SEQUENCE,
        "revocation list version 1 is older than the stored version 2",
    )
    forked = alice.revocations(2, ids=(b"\x02" * 16,))
    assert kind(judge_merge(merge(v2, forked))) is RefusalKind.REVOCATION_FORK
    shrinking = alice.revocations(3)
    assert kind(judge_merge(merge(v2, shrinking))) is RefusalKind.REVOCATION_NOT_APPEND_ONLY


# -- one-time prekey shares ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("testclient", "testclient"),
        ("", ""),
    ],
)
def test_clients_count_by_address_ipv6_by_its_64(host: str, key: str) -> None:
    assert client_key(host) == key
