"""The registry's first-contact answer (talos.core.contact): shape, nulls, bounds, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.contact import CONTACT_VERSION, MAX_CONTACT_SIZE, Contact
from talos.core.encoding import canonical_dumps
from talos.errors import MalformedFrame, UnsupportedVersion


def test_round_trip_with_and_without_optional_parts() -> None:
    full = Contact(log=b"log", bundle=b"bundle", record=b"record")
    assert Contact.from_bytes(full.to_bytes()) == full
    bare = Contact(log=b"log", bundle=None, record=None)
    assert Contact.from_bytes(bare.to_bytes()) == bare


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"log": None}, "'log' must be non-empty bytes"),
        ({"log": b""}, "'log' must be non-empty bytes"),
        ({"bundle": b""}, "'bundle' must be non-empty bytes or null"),
        ({"record": "text"}, "'record' must be non-empty bytes or null"),
        ({"extra": b"x"}, "exactly the fields"),
    ],
)
def test_bad_fields_are_refused(changes: dict[str, object], says: str) -> None:
    raw: dict[str, object] = {"v": CONTACT_VERSION, "log": b"l", "bundle": None, "record": None}
    raw.update(changes)
    with pytest.raises(MalformedFrame, match=says):
        Contact.from_bytes(canonical_dumps(raw))


def test_newer_version_and_oversize_are_refused() -> None:
    newer = {"v": CONTACT_VERSION + 1, "log": b"l", "bundle": None, "record": None}
    with pytest.raises(UnsupportedVersion):
        Contact.from_bytes(canonical_dumps(newer))
    huge = Contact(log=b"x" * MAX_CONTACT_SIZE, bundle=None, record=None).to_bytes()
    with pytest.raises(MalformedFrame):
        Contact.from_bytes(huge)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 200), st.integers(0, 255))
def test_decoder_fuzz(noise: bytes, position: int, flip: int) -> None:
    valid = bytearray(Contact(log=b"l" * 40, bundle=b"b" * 30, record=None).to_bytes())
    valid[position % len(valid)] ^= flip
    for data in (noise, bytes(valid)):
        try:
            Contact.from_bytes(data)
        except (MalformedFrame, UnsupportedVersion):
            pass
