"""The transport's admission rules (talos.transport.admission), with plain numbers for time."""

from __future__ import annotations

import itertools

import pytest

from talos.errors import ConfigurationError
from talos.transport import (
    EVICTABLE_AFTER,
    MAX_INCOMING,
    MAX_INCOMING_PER_HOST,
    MAX_VERIFIED_PER_PEER,
    VERIFY_WITHIN,
)
from talos.transport.admission import (
    AdmissionPolicy,
    Admit,
    Crowded,
    Displace,
    LinkFacts,
    Refuse,
)

_serials = itertools.count()


def link(
    host: str = "10.0.0.1",
    opened_at: float = 0.0,
    verified_by: str | None = None,
    verified_at: float | None = None,
    *,
    serial: int | None = None,
) -> LinkFacts:
    """One open incoming link; later calls get larger serials (opened later). A verified
    link without ``verified_at`` was verified as it opened."""
    return LinkFacts(
        serial=next(_serials) if serial is None else serial,
        host=host,
        opened_at=opened_at,
        verified_by=verified_by,
        verified_at=opened_at if verified_by is not None and verified_at is None else verified_at,
    )


def policy(**limits: float) -> AdmissionPolicy:
    return AdmissionPolicy(**limits)  # type: ignore[arg-type]  # tests pass numbers


# -- limits ------------------------------------------------------------------------------


def test_the_default_limits() -> None:
    defaults = AdmissionPolicy()
    assert (MAX_INCOMING, MAX_INCOMING_PER_HOST, MAX_VERIFIED_PER_PEER) == (256, 64, 4)
    assert (VERIFY_WITHIN, EVICTABLE_AFTER) == (10.0, 2.0)
    assert defaults == AdmissionPolicy(
        max_incoming=MAX_INCOMING,
        max_per_host=MAX_INCOMING_PER_HOST,
        verify_within=VERIFY_WITHIN,
        evictable_after=EVICTABLE_AFTER,
        max_verified_per_peer=MAX_VERIFIED_PER_PEER,
    )


@pytest.mark.parametrize(
    "limits",
    [
        {"max_incoming": 0},
        {"max_per_host": 0},
        {"max_verified_per_peer": 0},
        {"verify_within": 0.0},
        {"verify_within": -1.0},
        {"evictable_after": -0.5},
    ],
)
def test_limits_must_be_positive(limits: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match="must be positive"):
        policy(**limits)


def test_evictable_after_may_be_zero_and_limits_may_be_one() -> None:
    policy(evictable_after=0.0, max_incoming=1, max_per_host=1, max_verified_per_peer=1)


# -- rule 1: places ----------------------------------------------------------------------


def test_a_newcomer_is_admitted_while_both_limits_leave_room() -> None:
    rules = policy(max_incoming=3, max_per_host=2)
    assert rules.decide("10.0.0.1", [], now=0.0) == Admit()
    held = [link("10.0.0.1"), link("10.0.0.2")]
    assert rules.decide("10.0.0.1", held, now=0.0) == Admit()  # 2 of 3, 1 of 2 from it


def test_the_last_place_in_all_is_taken_then_none_is_free() -> None:
    rules = policy(max_incoming=3, evictable_after=5.0)
    held = [link(f"10.0.0.{n}", opened_at=1.0) for n in range(3)]
    assert rules.decide("10.0.0.9", held[:2], now=2.0) == Admit()
    assert rules.decide("10.0.0.9", held, now=2.0) == Refuse(Crowded.ALL, incoming=3, from_host=0)


def test_one_address_is_refused_at_its_share_while_another_gets_in() -> None:
    rules = policy(max_incoming=10, max_per_host=2, evictable_after=5.0)
    held = [link("10.0.0.2", opened_at=1.0) for _ in range(2)]
    assert rules.decide("10.0.0.2", held[:1], now=2.0) == Admit()
    assert rules.decide("10.0.0.2", held, now=2.0) == Refuse(Crowded.HOST, incoming=2, from_host=2)
    assert rules.decide("10.0.0.3", held, now=2.0) == Admit()


def test_an_address_at_its_share_of_a_full_agent_is_crowded_by_its_share() -> None:
    rules = policy(max_incoming=2, max_per_host=2, evictable_after=5.0)
    held = [link("10.0.0.2", opened_at=1.0) for _ in range(2)]
    assert rules.decide("10.0.0.2", held, now=2.0) == Refuse(Crowded.HOST, incoming=2, from_host=2)


# -- rule 4: displacement ----------------------------------------------------------------


def test_a_newcomer_displaces_the_oldest_unverified_link() -> None:
    rules = policy(max_incoming=3, evictable_after=2.0)
    middle, oldest, newest = link(opened_at=5.0), link(opened_at=4.0), link(opened_at=6.0)
    decision = rules.decide("10.0.0.9", [middle, oldest, newest], now=100.0)
    assert decision == Displace(oldest, Crowded.ALL)


def test_a_link_is_displaceable_from_exactly_evictable_after() -> None:
    rules = policy(max_incoming=1, evictable_after=2.0)
    held = [link(opened_at=10.0)]
    assert rules.decide("10.0.0.9", held, now=11.999) == Refuse(
        Crowded.ALL, incoming=1, from_host=0
    )
    assert rules.decide("10.0.0.9", held, now=12.0) == Displace(held[0], Crowded.ALL)


def test_with_evictable_after_zero_a_link_of_this_instant_is_displaceable() -> None:
    rules = policy(max_incoming=1, evictable_after=0.0)
    held = [link(opened_at=3.0)]
    assert rules.decide("10.0.0.9", held, now=3.0) == Displace(held[0], Crowded.ALL)


def test_young_links_are_passed_over_for_an_older_one() -> None:
    rules = policy(max_incoming=3, evictable_after=2.0)
    young = [link(opened_at=9.0), link(opened_at=9.5)]
    ripe = link(opened_at=7.0)
    assert rules.decide("10.0.0.9", [*young, ripe], now=9.9) == Displace(ripe, Crowded.ALL)


def test_links_opened_at_the_same_time_go_in_opening_order() -> None:
    rules = policy(max_incoming=2, evictable_after=0.0)
    later, first = link(opened_at=1.0, serial=8), link(opened_at=1.0, serial=7)
    assert rules.decide("10.0.0.9", [later, first], now=1.0) == Displace(first, Crowded.ALL)


def test_an_address_at_its_share_displaces_only_its_own_links() -> None:
    rules = policy(max_incoming=10, max_per_host=2, evictable_after=2.0)
    elsewhere = link("10.0.0.1", opened_at=0.0)  # older, but another address's
    own = [link("10.0.0.2", opened_at=3.0), link("10.0.0.2", opened_at=4.0)]
    decision = rules.decide("10.0.0.2", [elsewhere, *own], now=10.0)
    assert decision == Displace(own[0], Crowded.HOST)


def test_an_address_at_its_share_is_refused_when_its_own_links_are_young() -> None:
    rules = policy(max_incoming=10, max_per_host=2, evictable_after=2.0)
    elsewhere = link("10.0.0.1", opened_at=0.0)
    own = [link("10.0.0.2", opened_at=9.0), link("10.0.0.2", opened_at=9.5)]
    decision = rules.decide("10.0.0.2", [elsewhere, *own], now=10.0)
    assert decision == Refuse(Crowded.HOST, incoming=3, from_host=2)


def test_a_full_agent_displaces_from_any_address() -> None:
    rules = policy(max_incoming=3, max_per_host=2, evictable_after=2.0)
    held = [link("10.0.0.1", opened_at=5.0), link("10.0.0.2", opened_at=1.0), link("10.0.0.3")]
    assert rules.decide("10.0.0.4", held, now=10.0) == Displace(held[2], Crowded.ALL)


def test_verified_links_are_never_displaced_within_their_senders_share() -> None:
    rules = policy(max_incoming=3, evictable_after=0.0, max_verified_per_peer=4)
    held = [link(opened_at=0.0, verified_by=name) for name in ("alice", "bob", "carol")]
    assert rules.decide("10.0.0.9", held, now=1000.0) == Refuse(
        Crowded.ALL, incoming=3, from_host=0
    )
    unverified = link(opened_at=50.0)
    decision = rules.decide("10.0.0.8", [*held[:2], unverified], now=1000.0)
    assert decision == Displace(unverified, Crowded.ALL)


# -- rule 3: verified links per sender ---------------------------------------------------


def test_a_sender_keeps_only_its_newest_verified_links() -> None:
    rules = policy(max_incoming=3, evictable_after=2.0, max_verified_per_peer=1)
    old = link(opened_at=0.0, verified_by="mallory", verified_at=0.1)
    new = link(opened_at=0.2, verified_by="mallory", verified_at=0.3)
    alice = link(opened_at=0.4, verified_by="alice", verified_at=0.5)
    assert rules.decide("10.0.0.9", [new, alice, old], now=10.0) == Displace(old, Crowded.ALL)


def test_a_senders_newest_links_are_those_verified_last_not_opened_last() -> None:
    rules = policy(max_incoming=2, evictable_after=2.0, max_verified_per_peer=1)
    opened_first = link(opened_at=0.0, verified_by="mallory", verified_at=5.0)
    opened_last = link(opened_at=1.0, verified_by="mallory", verified_at=1.5)
    decision = rules.decide("10.0.0.9", [opened_first, opened_last], now=10.0)
    assert decision == Displace(opened_last, Crowded.ALL)


def test_a_senders_links_verified_at_one_instant_are_kept_by_opening_order() -> None:
    rules = policy(max_incoming=3, evictable_after=0.0, max_verified_per_peer=2)
    held = [link(opened_at=1.0, verified_by="mallory", verified_at=2.0) for _ in range(3)]
    assert rules.decide("10.0.0.9", held, now=2.0) == Displace(held[0], Crowded.ALL)


def test_a_sender_within_its_share_holds_every_link() -> None:
    rules = policy(max_incoming=4, evictable_after=0.0, max_verified_per_peer=4)
    held = [link(opened_at=float(n), verified_by="alice") for n in range(4)]
    assert rules.decide("10.0.0.9", held, now=100.0) == Refuse(Crowded.ALL, incoming=4, from_host=0)
    assert rules.decide("10.0.0.9", held[:3], now=100.0) == Admit()


def test_a_senders_surplus_link_must_still_be_old_enough() -> None:
    rules = policy(max_incoming=2, evictable_after=2.0, max_verified_per_peer=1)
    old = link(opened_at=9.0, verified_by="mallory", verified_at=9.1)
    new = link(opened_at=9.2, verified_by="mallory", verified_at=9.3)
    assert rules.decide("10.0.0.9", [old, new], now=10.0) == Refuse(
        Crowded.ALL, incoming=2, from_host=0
    )
    assert rules.decide("10.0.0.9", [old, new], now=11.0) == Displace(old, Crowded.ALL)


# -- rule 2: unverified links fall due ---------------------------------------------------


def test_an_unverified_link_is_due_exactly_verify_within_after_it_opened() -> None:
    rules = policy(verify_within=10.0)
    silent = link(opened_at=5.0)
    assert rules.overdue([silent], now=14.999) == []
    assert rules.overdue([silent], now=15.0) == [silent]
    assert rules.overdue([silent], now=1000.0) == [silent]


def test_verified_links_never_fall_due() -> None:
    rules = policy(verify_within=10.0, max_verified_per_peer=1)
    peer = link(opened_at=0.0, verified_by="alice", verified_at=9.0)
    surplus = link(opened_at=0.0, verified_by="alice", verified_at=8.0)  # displaceable only
    silent = link(opened_at=0.0)
    assert rules.overdue([peer, surplus, silent], now=100.0) == [silent]


def test_only_the_links_past_their_time_are_due() -> None:
    rules = policy(verify_within=1.0)
    older, younger = link(opened_at=0.0), link(opened_at=0.5)
    assert rules.overdue([younger, older], now=1.2) == [older]
    assert rules.overdue([younger, older], now=1.5) == [younger, older]


def test_the_next_deadline_is_the_first_unverified_links() -> None:
    rules = policy(verify_within=10.0)
    assert rules.next_deadline([]) is None
    assert rules.next_deadline([link(opened_at=0.0, verified_by="alice")]) is None
    held = [link(opened_at=3.0), link(opened_at=1.0, verified_by="alice"), link(opened_at=2.0)]
    assert rules.next_deadline(held) == 12.0
