"""Property tests for capability patterns and attenuation.

Soundness: whatever a child pattern (or a delegated token) allows, its parent
allows too, for every request. Exactness for single patterns: when ``covers``
says no, some request the child allows is refused by the parent.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.capability import covers, delegate, issue, matches
from talos.core.identity import Identity
from talos.errors import LocalProtocolError
from talos.testing import FakeClock, SeededRng

PROFILE = settings(max_examples=400, deadline=None)
NOW = 1_700_000_000.0
# A tiny alphabet so prefixes and collisions are common.
WORDS = st.text(alphabet="ab/", min_size=1, max_size=5)
PATTERNS = WORDS | WORDS.map(lambda w: w + "*") | st.just("*")
REQUESTS = st.text(alphabet="ab/*", max_size=7)

_rng, _clock = SeededRng(21), FakeClock(NOW)
A, B, C = (Identity.create(n, rng=_rng, clock=_clock) for n in "abc")


@PROFILE
@given(parent=PATTERNS, child=PATTERNS, request=REQUESTS)
def test_covers_is_sound(parent: str, child: str, request: str) -> None:
    if covers(parent, child) and matches(child, request):
        assert matches(parent, request)


@PROFILE
@given(parent=PATTERNS, child=PATTERNS)
def test_covers_is_exact_for_single_patterns(parent: str, child: str) -> None:
    if covers(parent, child):
        return
    stem = child.removesuffix("*")
    witnesses = [stem] if not child.endswith("*") else [stem, stem + "~", stem + "a~", stem + "b~"]
    allowed = [w for w in witnesses if matches(child, w)]
    assert any(not matches(parent, w) for w in allowed)


@PROFILE
@given(pattern=PATTERNS)
def test_covers_is_reflexive(pattern: str) -> None:
    assert covers(pattern, pattern)


@PROFILE
@given(
    parent_actions=st.frozensets(PATTERNS, min_size=1, max_size=3),
    child_actions=st.frozensets(PATTERNS, min_size=1, max_size=3),
    requests=st.lists(REQUESTS, min_size=1, max_size=5),
)
def test_delegation_never_widens(
    parent_actions: frozenset[str], child_actions: frozenset[str], requests: list[str]
) -> None:
    root = issue(
        A.signing_key,
        issuer=A.agent_id,
        key_sequence=0,
        subject=B.agent_id,
        audience=C.agent_id,
        actions=parent_actions,
        resources=["*"],
        expires=NOW + 60,
        now=NOW,
        rng=_rng,
        delegations=1,
    )
    try:
        child = delegate(
            root,
            B.signing_key,
            key_sequence=0,
            subject=C.agent_id,
            now=NOW,
            rng=_rng,
            actions=child_actions,
        )
    except LocalProtocolError:
        return
    for request in requests:
        if any(matches(p, request) for p in child.actions):
            assert any(matches(p, request) for p in root.actions)
