"""The argument checks of the public calls (talos.client.arguments)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from talos.client.arguments import (
    check_expires_in,
    check_message_id,
    check_peer_id,
    check_retry_count,
    check_timeout,
    check_wait,
)
from talos.core.agent_id import agent_id_from_digest
from talos.errors import InvalidArgument

PEER = agent_id_from_digest(b"\7" * 32)


def test_good_arguments_pass_through() -> None:
    assert check_peer_id(PEER) == PEER
    assert check_timeout(2) == 2.0
    assert check_expires_in(None) is None
    assert check_expires_in(0.5) == 0.5
    assert check_retry_count(0) == 0
    assert check_message_id("ab" * 16) == b"\xab" * 16
    assert check_message_id(b"\1" * 16) == b"\1" * 16


@pytest.mark.parametrize("bad", ["", "bob", "did:talos:", "did:talos:z0OIl", None, 7, PEER + "x"])
def test_peer_ids_must_be_agent_ids(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="is not an agent id"):
        check_peer_id(bad)


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, -math.inf, 1e9, "1", True, None])
def test_timeouts_are_finite_and_positive(bad: Any) -> None:
    with pytest.raises(ValueError, match="timeout must be"):
        check_timeout(bad)


@pytest.mark.parametrize("bad", [0, -3, math.nan, math.inf, 1e12, "5", False])
def test_expiries_are_finite_and_positive(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="expires_in must be"):
        check_expires_in(bad)


@pytest.mark.parametrize("bad", [-1, 1.0, "3", True, None, 10**9])
def test_retry_counts_are_small_non_negative_ints(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="retry_count must be"):
        check_retry_count(bad)


@pytest.mark.parametrize("bad", ["", "zz" * 16, "ab" * 15, "ab" * 17, b"\1" * 15, 5, None])
def test_message_ids_are_send_results_hex_or_bytes(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="message_id must be"):
        check_message_id(bad)


def test_a_receive_may_not_wait_at_all() -> None:
    assert check_wait(0) == 0.0
    assert check_wait(0.5) == 0.5
    for bad in (-1, math.nan, math.inf, True):
        with pytest.raises(InvalidArgument, match="from 0"):
            check_wait(bad)
