"""Fuzz the capability and revocation-list decoders: only documented exceptions escape.

Targets: :meth:`Capability.from_text`, :meth:`Capability.from_bytes` and
:meth:`RevocationList.from_bytes`, on random input and on mutations of valid
encodings (a delegation chain, a list with entries). "Input rejected" means
:class:`MalformedFrame` or :class:`UnsupportedVersion`; whatever is accepted
must re-encode to exactly the input (one encoding per value), and a mutated
token that still decodes must fail verification with a VerificationError.
"""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from talos.core.capability import (
    TEXT_PREFIX,
    Capability,
    CapabilityPolicy,
    delegate,
    issue,
    verify,
)
from talos.core.encoding import canonical_dumps
from talos.core.identity import Identity
from talos.core.revocation import IssuerKeys, RevocationList, RevocationState
from talos.errors import MalformedFrame, UnsupportedVersion, VerificationError
from talos.testing import FakeClock, SeededRng

REJECTED = (MalformedFrame, UnsupportedVersion)
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0

_rng, _clock = SeededRng(11), FakeClock(NOW)
A, B, C, V = (Identity.create(n, rng=_rng, clock=_clock) for n in "abcv")
KEYS = IssuerKeys([A.keylog, B.keylog, C.keylog])
ROOT = issue(
    A.signing_key,
    issuer=A.agent_id,
    key_sequence=0,
    subject=B.agent_id,
    audience=V.agent_id,
    actions=["message.send", "tool.*"],
    resources=["inbox/*"],
    expires=NOW + 3600,
    now=NOW,
    rng=_rng,
    delegations=1,
)
CHILD = delegate(
    ROOT, B.signing_key, key_sequence=0, subject=C.agent_id, now=NOW, rng=_rng, actions=["tool.x"]
)
LIST = (
    RevocationList.create(A.agent_id, now=NOW)
    .revise(now=NOW, token_ids=[b"\x01" * 16, b"\x02" * 16], issued_before=NOW, key_sequences=[4])
    .signed_by(A.signing_key, 0)
)
TOKEN_SEEDS = [ROOT.to_bytes(), CHILD.to_bytes()]
LIST_SEEDS = [LIST.to_bytes()]
STATE = RevocationState()
for _agent in (A, B, C):
    STATE.mark_synced(_agent.agent_id, NOW)
POLICY = CapabilityPolicy(audience=V.agent_id)


def _token_bytes(data: bytes) -> None:
    try:
        token = Capability.from_bytes(data)
    except REJECTED:
        return
    assert token.to_bytes() == data
    if data in TOKEN_SEEDS:
        return
    try:
        verify(
            token,
            action="tool.x",
            resource="inbox/1",
            now=NOW,
            revocations=STATE,
            policy=POLICY,
            keys=KEYS,
        )
    except VerificationError:
        return
    raise AssertionError("a mutated token verified")


def _token_text(text: str) -> None:
    try:
        token = Capability.from_text(text)
    except REJECTED:
        return
    assert token.to_text() == text


def _list_bytes(data: bytes) -> None:
    try:
        lst = RevocationList.from_bytes(data)
    except REJECTED:
        return
    assert lst.to_bytes() == data


def _text_of(data: bytes) -> str:
    return TEXT_PREFIX + base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid encoding with a few bit flips, byte changes, cuts, insertions or deletions."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(data=st.binary(max_size=512))
@example(data=b"")
@example(data=b"\xa0")
@example(data=canonical_dumps({"v": 2}))
def test_arbitrary_bytes(data: bytes) -> None:
    _token_bytes(data)
    _list_bytes(data)
    _token_text(_text_of(data))


@FUZZ
@given(text=st.text(max_size=200))
@example(text="tcap1.")
@example(text="tcap9.oA")
@example(text="tcap1.=")
@example(text="tcap1.\u00e9")
@example(text="tcap01.oA")
def test_arbitrary_text(text: str) -> None:
    _token_text(text)
    _token_text(TEXT_PREFIX + text)


@FUZZ
@given(data=mutated(TOKEN_SEEDS))
def test_mutated_tokens(data: bytes) -> None:
    _token_bytes(data)
    _token_text(_text_of(data))


@FUZZ
@given(
    text=st.sampled_from([ROOT.to_text(), CHILD.to_text()]),
    pos=st.integers(0),
    char=st.characters(),
)
def test_mutated_token_text(text: str, pos: int, char: str) -> None:
    pos %= len(text)
    _token_text(text[:pos] + char + text[pos + 1 :])
    _token_text(text[:pos])


@FUZZ
@given(data=mutated(LIST_SEEDS + TOKEN_SEEDS))
def test_mutated_lists(data: bytes) -> None:
    _list_bytes(data)


FIELD_VALUES: Any = (
    st.integers(-(2**65), 2**65)
    | st.binary(max_size=20)
    | st.text(max_size=10)
    | st.none()
    | st.booleans()
    | st.lists(st.text(max_size=5) | st.binary(max_size=17) | st.integers(-1, 5), max_size=3)
)


@FUZZ
@given(key=st.sampled_from(sorted(CHILD.to_dict())), value=FIELD_VALUES)
def test_structured_field_changes(key: str, value: Any) -> None:
    for raw in (CHILD.to_dict(), {**LIST.body(), "sig": LIST.signature}):
        try:
            data = canonical_dumps({**raw, key: value})
        except MalformedFrame:
            continue
        _token_bytes(data)
        _list_bytes(data)
