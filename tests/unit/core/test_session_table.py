"""The session table (talos.core.sessions): committed, awaiting confirmation, staged."""

from __future__ import annotations

import pytest

from talos.core.crypto import DHKey
from talos.core.ratchet import Session
from talos.core.sessions import SessionEntry, SessionTable, decode_record, encode_record
from talos.errors import MalformedFrame, UnsupportedVersion
from talos.testing import SeededRng


def _session(seed: int) -> Session:
    rng = SeededRng(seed)
    their = DHKey.generate(rng)
    return Session.initiator(b"\x01" * 32, b"ad", their.public, rng)


def test_a_session_opened_here_awaits_confirmation_of_its_own_handshake() -> None:
    table = SessionTable()
    table.commit("bob", SessionEntry(_session(1), b"handshake-1"))
    assert table.awaiting_confirmation("bob")
    # The fast path may send with it: every message repeats the handshake.
    assert table.for_fast_send("bob") == SessionEntry(
        table.committed("bob").session, b"handshake-1"
    )
    assert table.confirmable("bob", {b"an-older-handshake", None}) is None
    confirmed = table.confirmable("bob", {b"handshake-1"})
    assert confirmed is not None
    assert confirmed.confirmed
    assert table.awaiting_confirmation("bob")  # unchanged until the owner commits it
    table.commit("bob", confirmed)
    assert not table.awaiting_confirmation("bob")
    assert table.for_fast_send("bob") == confirmed


def test_staged_sessions_chain_decryption_but_are_not_sent_with() -> None:
    table = SessionTable()
    committed, staged = _session(1), _session(2)
    table.commit("bob", SessionEntry(committed))
    assert table.staged("bob") is None
    table.stage("bob", staged)
    assert table.staged("bob") is staged
    assert table.committed("bob") == SessionEntry(committed)
    assert table.for_fast_send("bob") is None
    assert table.take_staged() == {"bob": staged}
    assert table.staged("bob") is None
    assert table.committed("bob") == SessionEntry(committed)


def test_discarded_and_dropped_sessions_are_gone() -> None:
    table = SessionTable()
    table.commit("bob", SessionEntry(_session(1)))
    table.stage("bob", _session(2))
    table.discard_staged()
    assert table.staged("bob") is None
    table.stage("bob", _session(3))
    table.drop("bob")
    assert table.committed("bob") is None
    assert table.staged("bob") is None


def test_records_round_trip_and_keep_the_handshake() -> None:
    entry = SessionEntry(_session(1), b"header")
    back = decode_record(encode_record(entry), SeededRng(9))
    assert back.handshake == b"header"
    assert back.session.to_bytes() == entry.session.to_bytes()
    plain = decode_record(encode_record(SessionEntry(_session(1))), SeededRng(9))
    assert plain.confirmed


@pytest.mark.parametrize("data", [b"", b"\xa0", b"\xa3avb\xf6asa\x00axa\x00"])
def test_damaged_records_are_refused_with_documented_errors(data: bytes) -> None:
    with pytest.raises((MalformedFrame, UnsupportedVersion)):
        decode_record(data, SeededRng(1))
