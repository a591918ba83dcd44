"""Canonical CBOR without cbor2's canonical mode: strict_loads proves canonical form on the
heads (it accepts exactly what decoding, checking the data model and re-encoding to compare
would accept), and canonical_dumps orders map keys itself and writes in plain mode (the
same bytes as the canonical mode)."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.encoding import MAX_DEPTH, _check_model, canonical_dumps, strict_loads
from talos.errors import MalformedFrame

REFUSED = object()

scalars = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.binary(max_size=300),
    st.text(max_size=40),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=30), inner, max_size=6),
    ),
    max_leaves=25,
)
canonical = values.map(lambda value: cbor2.dumps(value, canonical=True))


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise ValueError("tag")


def reference(data: bytes) -> Any:
    """The definition: decodes, holds only the data model, and re-encodes to ``data``."""
    try:
        value = cbor2.loads(data, tag_hook=_refuse_tag)
        _check_model(value, 0)
        if cbor2.dumps(value, canonical=True) != data:
            return REFUSED
    except (Exception, RecursionError):
        return REFUSED
    return value


def outcome(data: bytes) -> Any:
    try:
        return strict_loads(data, max_size=1 << 20)
    except MalformedFrame:
        return REFUSED


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A canonical encoding with a byte changed, inserted or dropped, a head widened,
    or its map keys in insertion order."""
    data = bytearray(draw(canonical))
    how = draw(st.sampled_from(["set", "insert", "drop", "cut", "append", "reencode", "widen"]))
    at = draw(st.integers(min_value=0, max_value=len(data) - 1))
    if how == "set":
        data[at] = draw(st.integers(0, 255))
    elif how == "insert":
        data.insert(at, draw(st.integers(0, 255)))
    elif how == "drop":
        del data[at]
    elif how == "cut":
        del data[at:]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=3))
    elif how == "widen":  # the head of the item (or of a map's first key) one size longer
        at = min(at, 1)
        if data[at] & 0x1F < 24 and data[at] >> 5 != 7:
            data[at : at + 1] = bytes([data[at] & 0xE0 | 24, data[at] & 0x1F])
    else:  # the same value in insertion order, not canonical order
        return bytes(cbor2.dumps(draw(values)))
    return bytes(data)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(canonical, mutated(), st.binary(max_size=40)))
def test_accepts_exactly_what_decode_check_and_reencode_accept(data: bytes) -> None:
    expected = reference(data)
    got = outcome(data)
    if expected is REFUSED:
        assert got is REFUSED, data.hex()
    else:
        assert got is not REFUSED, data.hex()
        assert got == expected


@pytest.mark.parametrize(
    ("hex_data", "reason"),
    [
        ("1817", "canonical"),  # 23 in a one-byte argument
        ("190017", "canonical"),  # 23 in a two-byte argument
        ("5800", "canonical"),  # an empty byte string with a long head
        ("a2616201616101", "canonical"),  # keys out of order: "b" before "a"
        ("a2616101616102", "canonical"),  # the same key twice
        ("a261620162616102", None),  # "b" before "aa": shorter encodings first
        ("a2626161016162", "canonical"),  # "aa" before "b"
        ("a10101", "text strings"),  # an integer key
        ("a1f501", "text strings"),  # a boolean key
        ("f97e00", "floats"),  # a half-precision NaN
        ("c11a00000000", "tags"),
    ],
)
def test_non_canonical_heads_and_keys_are_refused(hex_data: str, reason: str | None) -> None:
    data = bytes.fromhex(hex_data)
    if reason is None:
        assert strict_loads(data, max_size=64) == cbor2.loads(data)
    else:
        with pytest.raises(MalformedFrame, match=reason):
            strict_loads(data, max_size=64)


def test_depth_is_bounded_inside_maps_too() -> None:
    value: Any = 1
    for _ in range(MAX_DEPTH + 1):
        value = {"k": value}
    with pytest.raises(MalformedFrame, match="nesting"):
        strict_loads(cbor2.dumps(value, canonical=True), max_size=1 << 10)


@settings(max_examples=1000, deadline=None)
@given(values, st.booleans())
def test_encodes_what_the_canonical_mode_encodes(value: Any, as_tuples: bool) -> None:
    if as_tuples and isinstance(value, list):
        value = tuple(value)
    assert canonical_dumps(value) == cbor2.dumps(value, canonical=True)


def test_key_order_is_by_encoded_length_then_bytes_and_maps_are_not_changed() -> None:
    value = {"é": 1, "bb": 2, "a": {"zz": [{"y": 1, "x": 2}], "c": 3}, "b": 4}
    before = repr(value)
    data = canonical_dumps(value)
    assert data == cbor2.dumps(value, canonical=True)
    assert list(cbor2.loads(data)) == ["a", "b", "bb", "é"]
    assert repr(value) == before


def test_a_lone_surrogate_key_is_refused() -> None:
    with pytest.raises(MalformedFrame, match="surrogate"):
        canonical_dumps({"\ud800": 1})
