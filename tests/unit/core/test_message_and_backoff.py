"""Application payload wrapping and the retry schedule."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.backoff import Backoff
from talos.core.message import MAX_PAYLOAD_SIZE, decode_payload, encode_payload
from talos.errors import ConfigurationError, LocalProtocolError, MalformedFrame, UnsupportedVersion
from talos.testing import SeededRng

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("data", [b"\x00bytes", "text", {"a": [1, 2, None]}, [1, "x"], 7, None])
def test_round_trip_keeps_the_type(data: Any) -> None:
    assert decode_payload(encode_payload(data)) == data
    assert type(decode_payload(encode_payload(data))) is type(data)


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_json_values_round_trip(data: Any) -> None:
    assert decode_payload(encode_payload(data)) == data


def test_unencodable_and_oversized() -> None:
    with pytest.raises(LocalProtocolError):
        encode_payload({1, 2})
    with pytest.raises(LocalProtocolError):
        encode_payload(float("nan"))
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode_payload(b"x" * MAX_PAYLOAD_SIZE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decoder_only_raises_documented_errors(raw: bytes) -> None:
    try:
        decode_payload(raw)
    except (MalformedFrame, UnsupportedVersion):
        pass


@pytest.mark.parametrize(
    "text",
    ["NaN", "[Infinity]", '{"x": -Infinity}', "1e999", "[-1e400]", "[" * 100_000 + "]" * 100_000],
)
def test_a_peers_json_is_held_to_what_send_encodes(text: str) -> None:
    """No NaN or infinity (a reply's JSON text could not carry them) and no nesting
    that exhausts the parser: refused as malformed, never another exception."""
    from talos.core.encoding import canonical_dumps

    with pytest.raises(MalformedFrame, match="JSON"):
        decode_payload(canonical_dumps({"v": 1, "k": "j", "d": text}))


def test_finite_floats_still_decode() -> None:
    assert decode_payload(encode_payload([1.5, -2e300, 0.0])) == [1.5, -2e300, 0.0]


def test_backoff_grows_jitters_and_caps() -> None:
    schedule = Backoff(base=0.5, cap=30.0)
    rng = SeededRng(3)
    delays = [schedule.delay(n, rng) for n in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(30.0, 0.5 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered
    assert schedule.delay(10**6, rng) <= 30.0


def test_backoff_validation() -> None:
    with pytest.raises(ConfigurationError):
        Backoff(base=0, cap=1)
    with pytest.raises(ConfigurationError):
        Backoff(base=5, cap=1)


def test_json_nesting_is_bounded_whatever_the_recursion_limit() -> None:
    """A library may raise the recursion limit process-wide (py_ecc does): deep JSON
    must still be refused by counting, before the parser could overflow the C stack."""
    import sys

    from talos.core.encoding import canonical_dumps
    from talos.core.message import MAX_JSON_DEPTH, json_depth_within

    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    edge = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        with pytest.raises(MalformedFrame, match="nests deeper"):
            decode_payload(canonical_dumps({"v": 1, "k": "j", "d": deep}))
    finally:
        sys.setrecursionlimit(before)
    assert decode_payload(encode_payload(json.loads(edge))) == json.loads(edge)
    with pytest.raises(LocalProtocolError, match="nests deeper"):
        encode_payload(json.loads(deep))
    # Brackets inside strings and escaped quotes do not count.
    quoted = json.dumps(["[" * 500, '\\"[[[', {"k": "{" * 300}])
    assert json_depth_within(quoted, 3)
    assert not json_depth_within(quoted, 1)


def test_data_too_deep_for_the_encoder_is_a_documented_error() -> None:
    data: list[object] = []
    for _ in range(100_000):
        data = [data]
    with pytest.raises(LocalProtocolError):
        encode_payload(data)
