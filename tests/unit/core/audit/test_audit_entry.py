"""Audit entries: the one canonical encoding, strict decoding and the metadata-only bounds."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.audit.entry import (
    MAX_BYTES_FIELD,
    MAX_ENTRY_SIZE,
    MAX_TEXT_FIELD,
    AuditEntry,
    AuditKind,
    check_kind,
    check_peer,
    encode_data,
    encode_entry,
)
from talos.core.audit.merkle import leaf_hash
from talos.core.encoding import canonical_dumps
from talos.errors import LocalProtocolError, MalformedFrame, UnsupportedVersion

DATA = {"message_id": b"m" * 16, "hash": b"h" * 32, "size": 123}

#: Entry format v1, pinned: changing these bytes breaks every stored log.
GOLDEN = bytes.fromhex(
    "a66164a3646861736858206868686868686868686868686868686868686868686868686868686868"
    "6868686473697a65187b6a6d6573736167655f6964506d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d616b"
    "6c4d4553534147455f53454e54617063626f6261730561741b0000018bcfe56800617601"
)


def _entry(**changes: Any) -> AuditEntry:
    fields: dict[str, Any] = {
        "seq": 5,
        "time_ms": 1_700_000_000_000,
        "kind": AuditKind.MESSAGE_SENT,
        "peer": "bob",
        "data": DATA,
    }
    fields.update(changes)
    return AuditEntry(**fields)


def _as_map(entry: AuditEntry) -> dict[str, Any]:
    return {
        "v": 1,
        "s": entry.seq,
        "t": entry.time_ms,
        "k": entry.kind,
        "p": entry.peer,
        "d": dict(entry.data),
    }


def test_golden_v1_bytes() -> None:
    entry = _entry()
    assert entry.to_bytes() == GOLDEN
    assert AuditEntry.from_bytes(GOLDEN) == entry


def test_round_trip_and_leaf_hash() -> None:
    entry = _entry(peer=None, data={})
    raw = entry.to_bytes()
    assert AuditEntry.from_bytes(raw) == entry
    assert entry.leaf_hash() == leaf_hash(raw)


def test_kind_is_a_plain_string_and_custom_kinds_are_allowed() -> None:
    entry = _entry(kind="APP_SPECIFIC_EVENT_2")
    assert type(entry.kind) is str
    assert type(_entry().kind) is str
    assert check_kind(AuditKind.KEY_ROTATED) == "KEY_ROTATED"


@pytest.mark.parametrize("kind", ["", "lower", "1ABC", "A-B", "A" * 65, None, 3])
def test_bad_kinds_refused(kind: Any) -> None:
    with pytest.raises(LocalProtocolError):
        check_kind(kind)


@pytest.mark.parametrize("peer", ["", "x" * 257, "a\nb", "\ud800", 7])
def test_bad_peers_refused(peer: Any) -> None:
    with pytest.raises(LocalProtocolError):
        check_peer(peer)


@pytest.mark.parametrize(
    "data",
    [
        {"payload": b"p" * (MAX_BYTES_FIELD + 1)},
        {"text": "t" * (MAX_TEXT_FIELD + 1)},
        {"f": 1.5},
        {"big": 2**64},
        {1: "non-text key"},
        {"deep": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]},
        {"surrogate": "\ud800"},
        {"set": {1, 2}},
    ],
)
def test_data_outside_bounds_or_model_refused(data: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_data(data)


def test_data_must_be_a_mapping() -> None:
    with pytest.raises(LocalProtocolError):
        encode_data([1, 2])  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        _entry(data=[1])


def test_whole_entry_size_is_bounded() -> None:
    many = {f"k{i:03}": b"h" * 32 for i in range(120)}
    with pytest.raises(LocalProtocolError, match="limit"):
        encode_entry(0, 0, "MESSAGE_SENT", None, encode_data(many))


@pytest.mark.parametrize("field", ["seq", "time_ms"])
@pytest.mark.parametrize("value", [-1, 2**64, True, "1"])
def test_seq_and_time_are_uint64(field: str, value: Any) -> None:
    with pytest.raises(LocalProtocolError):
        _entry(**{field: value})


def test_unknown_version_is_unsupported() -> None:
    raw = {**_as_map(_entry()), "v": 2}
    with pytest.raises(UnsupportedVersion):
        AuditEntry.from_bytes(canonical_dumps(raw))


@pytest.mark.parametrize(
    "change",
    [
        {"x": 1},
        {"v": "1"},
        {"d": [1]},
        {"k": "lower"},
        {"s": -1},
        {"p": ""},
        {"d": {"payload": b"x" * 100}},
    ],
)
def test_invalid_fields_are_malformed(change: dict[str, Any]) -> None:
    raw = {**_as_map(_entry()), **change}
    with pytest.raises(MalformedFrame):
        AuditEntry.from_bytes(canonical_dumps(raw))


def test_non_canonical_and_oversized_input_refused() -> None:
    raw = _as_map(_entry())
    with pytest.raises(MalformedFrame):
        AuditEntry.from_bytes(cbor2.dumps(dict(reversed(list(raw.items())))))
    with pytest.raises(MalformedFrame):
        AuditEntry.from_bytes(b"\x00" * (MAX_ENTRY_SIZE + 1))


_scalars = (
    st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=MAX_BYTES_FIELD)
    | st.text(max_size=40)
    | st.booleans()
    | st.none()
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    data=st.dictionaries(st.text(max_size=10), _values, max_size=6),
    seq=st.integers(min_value=0, max_value=2**64 - 1),
    time_ms=st.integers(min_value=0, max_value=2**64 - 1),
    peer=st.none() | st.text(min_size=1, max_size=20).filter(str.isprintable),
)
def test_hand_encoding_equals_canonical_cbor(
    data: dict[str, Any], seq: int, time_ms: int, peer: str | None
) -> None:
    try:
        entry = AuditEntry(seq, time_ms, "MESSAGE_RECEIVED", peer, data)
        raw = entry.to_bytes()
    except LocalProtocolError:
        return  # a lone surrogate or an oversized entry; refusal is the contract
    assert raw == canonical_dumps(_as_map(entry))
    assert AuditEntry.from_bytes(raw) == entry
