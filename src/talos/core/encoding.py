"""Deterministic CBOR for everything Talos signs or persists.

Encoding follows RFC 8949 §4.2 (core deterministic encoding: shortest
lengths, sorted map keys, no indefinite lengths) through ``cbor2`` in
canonical mode. Decoding is strict, because its input is untrusted:

* the input must not exceed ``max_size`` bytes;
* only the data model Talos uses is accepted: unsigned/negative integers,
  byte strings, text strings, arrays, maps with text keys, booleans and null;
  tags, floats, undefined and simple values are refused;
* nesting is limited to :data:`MAX_DEPTH`;
* the input must be exactly the canonical encoding of what it decodes to, so
  every value has one and only one byte representation.

Every failure is a :class:`~talos.errors.MalformedFrame`.
"""

from __future__ import annotations

from typing import Any, Final

import cbor2

from talos.errors import MalformedFrame, UnsupportedVersion

__all__ = [
    "MAX_DEPTH",
    "canonical_dumps",
    "check_versioned_map",
    "strict_loads",
    "strict_versioned_map",
]

#: Deepest nesting of arrays and maps accepted by :func:`strict_loads`.
MAX_DEPTH = 16


def canonical_dumps(value: Any) -> bytes:
    """Encode ``value`` as deterministic CBOR.

    Raises:
        MalformedFrame: ``value`` holds something outside the Talos data model.
    """
    try:
        # Maps put in canonical key order here; with that, cbor2's plain mode writes
        # the canonical bytes (shortest heads, definite lengths) without its slower
        # canonical mode, which encodes and sorts every map's keys on each call.
        return cbor2.dumps(_in_canonical_order(value, 0))
    except UnicodeEncodeError:
        raise MalformedFrame("text is not encodable as UTF-8 (lone surrogate)") from None


def strict_loads(data: bytes, *, max_size: int) -> Any:
    """Decode one canonical CBOR item from untrusted ``data``.

    Raises:
        MalformedFrame: too large, not CBOR, trailing bytes, outside the data
            model, too deep, or not in canonical form.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedFrame("frame must be bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise MalformedFrame(f"frame of {len(data)} bytes exceeds the {max_size}-byte limit")
    if not data:
        raise MalformedFrame("empty frame")
    # The pre-pass proves the bytes canonical and inside the data model, so the
    # decoded value needs no second walk and no re-encoding to compare.
    _check_structure(data)
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MalformedFrame(f"not valid CBOR: {type(exc).__name__}") from None


def strict_versioned_map(
    data: bytes, *, max_size: int, fields: frozenset[str], version: int, what: str
) -> dict[str, Any]:
    """Decode a persisted or received object: a CBOR map with exactly ``fields``.

    The version (key ``"v"``) must be an integer (``true`` is not 1) and is
    checked before the field set, so that a newer format is reported as
    such rather than as garbage.

    Raises:
        MalformedFrame: not canonical CBOR, not a map, no integer version, or
            the wrong keys.
        UnsupportedVersion: an integer version other than ``version``.
    """
    value = strict_loads(data, max_size=max_size)
    return check_versioned_map(value, fields=fields, version=version, what=what)


def check_versioned_map(
    value: Any, *, fields: frozenset[str], version: int, what: str
) -> dict[str, Any]:
    """:func:`strict_versioned_map` for a value already decoded (e.g. nested)."""
    if type(value) is not dict:
        raise MalformedFrame(f"{what} must be a CBOR map")
    found = value.get("v")
    if type(found) is not int:
        raise MalformedFrame(f"{what} has no integer version")
    if found != version:
        raise UnsupportedVersion(f"{what} version {found} is not supported")
    if value.keys() != fields:
        raise MalformedFrame(f"{what} must have exactly the fields {sorted(fields)}")
    return value


#: Types that are always inside the data model (``int`` is not: its range is checked).
_PLAIN_SCALARS: frozenset[type] = frozenset({bytes, str, bool, type(None)})


def _check_model(value: Any, depth: int) -> None:
    """``depth`` counts the containers around ``value``; at most MAX_DEPTH may nest."""
    kind = type(value)
    if kind is bytes or kind is str or kind is bool or value is None:
        return
    if kind is int:
        if not -(2**64) <= value < 2**64:
            raise MalformedFrame("integer out of the 64-bit range")
        return
    if (kind is list or kind is tuple or kind is dict) and depth >= MAX_DEPTH:
        raise MalformedFrame(f"nesting deeper than {MAX_DEPTH}")
    # Scalars inside containers are checked inline (most values are), saving a call each.
    if kind is list or kind is tuple:
        for item in value:
            if type(item) not in _PLAIN_SCALARS:
                _check_model(item, depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise MalformedFrame("map keys must be text strings")
            if type(item) not in _PLAIN_SCALARS:
                _check_model(item, depth + 1)
        return
    raise MalformedFrame(f"{kind.__name__} is outside the Talos CBOR data model")


#: Canonical order of the key sets seen (bounded: keys from a payload can be anything).
_KEY_ORDER: dict[tuple[str, ...], tuple[str, ...]] = {}
_KEY_ORDER_LIMIT: Final = 4096
#: Only small key sets are remembered (Talos's own records): a peer's payload with
#: thousands of keys, encoded again, must not pin its keys in memory.
_KEY_ORDER_MAX_KEYS: Final = 32


def _key_rank(key: str) -> tuple[int, bytes]:
    """RFC 8949 §4.2 order as cbor2 writes it: shorter encoding first, then its bytes."""
    encoded = key.encode()
    return len(encoded), encoded


def _in_canonical_order(value: Any, depth: int) -> Any:
    """``value`` checked like :func:`_check_model`, with every map in canonical key order
    (the same object when it already is)."""
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DEPTH:
            raise MalformedFrame(f"nesting deeper than {MAX_DEPTH}")
        keys = tuple(value)
        order = _KEY_ORDER.get(keys)
        if order is None:
            for key in keys:
                if type(key) is not str:
                    raise MalformedFrame("map keys must be text strings")
            order = tuple(sorted(keys, key=_key_rank))
            if len(keys) <= _KEY_ORDER_MAX_KEYS and len(_KEY_ORDER) < _KEY_ORDER_LIMIT:
                _KEY_ORDER[keys] = order
        items = value.items() if order == keys else ((key, value[key]) for key in order)
        out = {}
        changed = order != keys
        for key, item in items:
            kind = type(item)
            if kind is int:
                if not -(2**64) <= item < 2**64:
                    raise MalformedFrame("integer out of the 64-bit range")
            elif kind not in _PLAIN_SCALARS:
                new = _in_canonical_order(item, depth + 1)
                changed = changed or new is not item
                item = new
            out[key] = item
        return out if changed else value
    if kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            raise MalformedFrame(f"nesting deeper than {MAX_DEPTH}")
        if all(type(item) in _PLAIN_SCALARS for item in value):
            return value
        return [
            item if type(item) in _PLAIN_SCALARS else _in_canonical_order(item, depth + 1)
            for item in value
        ]
    _check_model(value, depth)
    return value


#: The least argument each long head may carry (a smaller one has a shorter head).
_LEAST_ARGUMENT: Final = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}


def _check_structure(data: bytes) -> None:
    """Walk the CBOR heads before decoding: bound the work, keep to the data model and
    prove the bytes canonical, so that decoding them is all that is left to do.

    The decoder never sees a tag (which ``cbor2`` would turn into arbitrary
    Python objects), a float or simple value, an indefinite length, a claimed
    length larger than the remaining input, or excessive nesting. Canonical
    form (RFC 8949 §4.2 as ``cbor2``'s canonical mode writes it) is checked
    on the heads: every argument in its shortest head, and the keys of each
    map text strings in strictly increasing order of their encoding's length,
    then its bytes (so no key twice). Text strings that are not UTF-8 are
    left to the decoder, which refuses them. What passes decodes to a value
    of the data model whose canonical encoding is ``data`` itself.
    """
    pos = 0
    end = len(data)
    # The enclosing containers: (items left, is a map, its last key) of each.
    stack: list[tuple[int, bool, bytes]] = []
    items_left, in_map, last_key = 1, False, b""
    while True:
        if items_left == 0:
            if not stack:
                break
            items_left, in_map, last_key = stack.pop()
            continue
        if pos >= end:
            raise MalformedFrame("truncated CBOR")
        start = pos
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            # Only false, true, null: no floats, no other simple values.
            if initial not in (0xF4, 0xF5, 0xF6):
                raise MalformedFrame("CBOR floats and simple values are not accepted")
            if in_map and not items_left & 1:
                raise MalformedFrame("map keys must be text strings")
            items_left -= 1
            continue
        if info < 24:
            arg = info
        elif info <= 27:
            width = 1 << (info - 24)
            if pos + width > end:
                raise MalformedFrame("truncated CBOR")
            arg = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            if arg < _LEAST_ARGUMENT[info]:
                raise MalformedFrame("not in canonical CBOR form")
        else:
            raise MalformedFrame("indefinite or reserved CBOR length")
        if major == 6:
            raise MalformedFrame("CBOR tags are not accepted")
        is_key = in_map and not items_left & 1
        items_left -= 1
        if is_key and major != 3:
            raise MalformedFrame("map keys must be text strings")
        if major <= 1:
            continue
        if major <= 3:
            if arg > end - pos:
                raise MalformedFrame("CBOR string longer than the frame")
            pos += arg
            if is_key:
                key = data[start:pos]
                if last_key and (
                    len(key) < len(last_key) or (len(key) == len(last_key) and key <= last_key)
                ):
                    raise MalformedFrame("not in canonical CBOR form")
                last_key = key
            continue
        # major 4 (array) or 5 (map)
        count = arg if major == 4 else 2 * arg
        if count > end - pos:
            raise MalformedFrame("CBOR container longer than the frame")
        if len(stack) >= MAX_DEPTH:
            raise MalformedFrame(f"nesting deeper than {MAX_DEPTH}")
        stack.append((items_left, in_map, last_key))
        items_left, in_map, last_key = count, major == 5, b""
    if pos != end:
        raise MalformedFrame("trailing bytes after the CBOR item")
