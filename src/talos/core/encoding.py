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

from typing import Any

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
    _check_model(value, 0)
    try:
        return cbor2.dumps(value, canonical=True)
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
    _check_structure(data)
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MalformedFrame(f"not valid CBOR: {type(exc).__name__}") from None
    _check_model(value, 0)
    if cbor2.dumps(value, canonical=True) != data:
        raise MalformedFrame("not in canonical CBOR form")
    return value


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


def _check_structure(data: bytes) -> None:
    """Walk the CBOR heads before decoding, bounding work and refusing tags/floats.

    This cheap pre-pass ensures the decoder never sees a tag (which ``cbor2``
    would turn into arbitrary Python objects), an indefinite length, a
    claimed length larger than the remaining input, or excessive nesting.
    """
    pos = 0
    end = len(data)
    # Stack of remaining item counts for the open containers.
    pending: list[int] = []
    items_left = 1
    while True:
        if items_left == 0:
            if not pending:
                break
            items_left = pending.pop()
            continue
        if pos >= end:
            raise MalformedFrame("truncated CBOR")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            arg = info
        elif info <= 27:
            width = 1 << (info - 24)
            if pos + width > end:
                raise MalformedFrame("truncated CBOR")
            arg = int.from_bytes(data[pos : pos + width], "big")
            pos += width
        else:
            raise MalformedFrame("indefinite or reserved CBOR length")
        items_left -= 1
        if major in (0, 1):
            continue
        if major in (2, 3):
            if arg > end - pos:
                raise MalformedFrame("CBOR string longer than the frame")
            pos += arg
            continue
        if major in (4, 5):
            count = arg if major == 4 else 2 * arg
            if count > end - pos:
                raise MalformedFrame("CBOR container longer than the frame")
            if len(pending) >= MAX_DEPTH:
                raise MalformedFrame(f"nesting deeper than {MAX_DEPTH}")
            pending.append(items_left)
            items_left = count
            continue
        if major == 6:
            raise MalformedFrame("CBOR tags are not accepted")
        # major 7: only false, true, null
        if initial not in (0xF4, 0xF5, 0xF6):
            raise MalformedFrame("CBOR floats and simple values are not accepted")
    if pos != end:
        raise MalformedFrame("trailing bytes after the CBOR item")
