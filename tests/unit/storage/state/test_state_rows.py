"""Row plumbing shared by the agent state's parts (talos.storage.state.rows), without LMDB."""

from __future__ import annotations

import pytest

from talos.core.encoding import canonical_dumps
from talos.core.replay import MAX_ID_SIZE
from talos.errors import LocalProtocolError, StoreCorrupted
from talos.storage.state.rows import (
    FORMAT_VERSION,
    U64,
    as_bytes,
    corrupt,
    decode_row,
    message_id,
    peer_key,
    seq_name,
    text,
)


def test_peer_key_is_the_utf8_of_a_printable_id() -> None:
    assert peer_key("did:talos:zé") == "did:talos:zé".encode()
    assert peer_key("a" * 255) == b"a" * 255
    for bad in ["", "a\nb", "a" * 256, "é" * 128, b"bytes"]:
        with pytest.raises(LocalProtocolError):
            peer_key(bad)  # type: ignore[arg-type]


def test_message_id_bounds() -> None:
    assert message_id(b"x") == b"x"
    assert message_id(b"x" * MAX_ID_SIZE) == b"x" * MAX_ID_SIZE
    for bad in [b"", b"x" * (MAX_ID_SIZE + 1), bytearray(b"x"), "x"]:
        with pytest.raises(LocalProtocolError):
            message_id(bad)  # type: ignore[arg-type]


def test_as_bytes_copies_bytes_like_only() -> None:
    assert as_bytes("data", bytearray(b"ab")) == b"ab"
    assert type(as_bytes("data", memoryview(b"ab"))) is bytes
    with pytest.raises(LocalProtocolError, match="data must be bytes"):
        as_bytes("data", "ab")  # type: ignore[arg-type]


def test_decode_row_is_strict_and_names_the_row() -> None:
    fields = frozenset({"v", "a"})
    assert decode_row("inbox", "3", canonical_dumps({"v": FORMAT_VERSION, "a": 1}), fields) == {
        "v": FORMAT_VERSION,
        "a": 1,
    }
    for raw in [
        b"\xff",
        canonical_dumps({"v": FORMAT_VERSION}),
        canonical_dumps({"v": FORMAT_VERSION, "a": 1, "b": 2}),
        canonical_dumps({"v": FORMAT_VERSION + 1, "a": 1}),
    ]:
        with pytest.raises(StoreCorrupted, match="database 'inbox', key 3"):
            decode_row("inbox", "3", raw, fields)


def test_error_names() -> None:
    assert seq_name(U64.pack(42)) == "42"
    assert seq_name(b"\x01\x02") == "0102"
    error = corrupt("peers", "k", "why")
    assert error.where == "agent state peers k"
    assert error.what == "why"
    assert text("sessions", b"bob") == "bob"
    with pytest.raises(StoreCorrupted, match="key is not UTF-8"):
        text("sessions", b"\xff")
