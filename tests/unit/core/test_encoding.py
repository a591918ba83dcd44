"""The Talos CBOR data model as canonical_dumps and strict_loads enforce it."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from talos.core.encoding import MAX_DEPTH, canonical_dumps, strict_loads
from talos.errors import MalformedFrame

OUTSIDE: list[Any] = [
    1.5,
    [1.5],
    {"a": 1.5},
    {"a": [b"x", {"b": 2.0}]},
    (b"x", 1.5),
    2**64,
    [2**64],
    {"a": -(2**64) - 1},
    {1: b"x"},
    {"a": {2: "x"}},
    [set()],
]


@pytest.mark.parametrize("value", OUTSIDE)
def test_values_outside_the_model_are_refused_at_any_position(value: Any) -> None:
    with pytest.raises(MalformedFrame):
        canonical_dumps(value)
    with pytest.raises(MalformedFrame):
        strict_loads(cbor2.dumps(value, canonical=True), max_size=1 << 10)


def test_only_exact_bytes_are_encoded() -> None:
    with pytest.raises(MalformedFrame):
        canonical_dumps({"a": bytearray(b"x")})


def nested(depth: int) -> Any:
    value: Any = b"leaf"
    for n in range(depth):
        value = [value] if n % 2 else {"k": value}
    return value


def test_nesting_is_bounded_the_same_way_in_both_directions() -> None:
    deepest = nested(MAX_DEPTH)
    assert strict_loads(canonical_dumps(deepest), max_size=1 << 10) == deepest
    with pytest.raises(MalformedFrame, match="nesting"):
        canonical_dumps(nested(MAX_DEPTH + 1))
    with pytest.raises(MalformedFrame, match="nesting"):
        strict_loads(cbor2.dumps(nested(MAX_DEPTH + 1), canonical=True), max_size=1 << 10)


def test_every_model_type_round_trips() -> None:
    value = {"b": b"\x00", "s": "text", "t": True, "f": False, "n": None, "i": -(2**64), "l": [1]}
    assert strict_loads(canonical_dumps(value), max_size=1 << 10) == value


def test_only_small_key_sets_are_remembered_for_their_order() -> None:
    from talos.core import encoding

    small = {f"k{i}": i for i in range(3)}
    large = {f"key{i:05}": i for i in range(200)}  # a peer's payload, encoded again
    assert canonical_dumps(large) == cbor2.dumps(large, canonical=True)
    assert tuple(large) not in encoding._KEY_ORDER
    assert canonical_dumps(small) == cbor2.dumps(small, canonical=True)
    assert tuple(small) in encoding._KEY_ORDER
