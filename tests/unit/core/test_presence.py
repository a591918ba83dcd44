"""PRESENCE bodies: strict decoding, and the verdict on a proof."""

from __future__ import annotations

import pytest

from talos.core import presence
from talos.core.encoding import canonical_dumps
from talos.errors import MalformedFrame, UnsupportedVersion

NONCE, INSTANCE = b"n" * presence.NONCE_SIZE, b"i" * presence.INSTANCE_SIZE


def test_bodies_round_trip() -> None:
    for body in (presence.Challenge(NONCE), presence.Proof(NONCE, INSTANCE, 1_700_000_000_000)):
        kind = presence.kind_of(body)
        assert presence.decode_body(kind, presence.encode_body(body)) == body


@pytest.mark.parametrize(
    "raw",
    [
        {"v": 1, "n": b"short"},
        {"v": 1, "n": NONCE, "extra": 1},
        {"v": 1},
        {"v": True, "n": NONCE},
        [1, NONCE],
    ],
)
def test_malformed_challenges_are_refused(raw: object) -> None:
    with pytest.raises(MalformedFrame):
        presence.decode_body(presence.PresenceKind.CHALLENGE, canonical_dumps(raw))


def test_a_newer_body_version_is_reported_as_such() -> None:
    with pytest.raises(UnsupportedVersion):
        presence.decode_body(presence.PresenceKind.CHALLENGE, canonical_dumps({"v": 2, "n": NONCE}))


def test_a_proof_with_a_negative_time_is_malformed() -> None:
    data = canonical_dumps({"v": 1, "n": NONCE, "i": INSTANCE, "ts": -1})
    with pytest.raises(MalformedFrame):
        presence.decode_body(presence.PresenceKind.PROOF, data)


def check(proof: presence.Proof, *, nonce: bytes = NONCE, instance: bytes = INSTANCE,
          time_ms: int = 1000, now_ms: int = 1000) -> None:  # fmt: skip
    presence.check_proof(
        proof, nonce=nonce, envelope_instance=instance, envelope_time_ms=time_ms, now_ms=now_ms
    )


def test_a_proof_answers_this_challenge_from_its_envelope_and_now() -> None:
    proof = presence.Proof(NONCE, INSTANCE, 1000)
    check(proof)
    check(proof, now_ms=1000 + presence.MAX_PROOF_SKEW_MS)
    with pytest.raises(MalformedFrame, match="another challenge"):
        check(proof, nonce=b"x" * presence.NONCE_SIZE)
    with pytest.raises(MalformedFrame, match="envelope"):
        check(proof, instance=b"j" * presence.INSTANCE_SIZE)
    with pytest.raises(MalformedFrame, match="envelope"):
        check(proof, time_ms=999)
    with pytest.raises(MalformedFrame, match="off"):
        check(proof, now_ms=1001 + presence.MAX_PROOF_SKEW_MS)


def test_a_challenge_names_the_endpoint_dialled_and_an_older_one_still_decodes() -> None:
    named = presence.Challenge(NONCE, "ws://127.0.0.1:4242")
    data = presence.encode_body(named)
    assert presence.decode_body(presence.PresenceKind.CHALLENGE, data) == named
    older = canonical_dumps({"v": 1, "n": NONCE})  # before the endpoint was added
    assert presence.decode_body(presence.PresenceKind.CHALLENGE, older) == presence.Challenge(NONCE)


@pytest.mark.parametrize("endpoint", ["", "x" * (presence.MAX_ENDPOINT + 1), b"ws://a:1", 7])
def test_a_challenge_naming_a_bad_endpoint_is_malformed(endpoint: object) -> None:
    data = canonical_dumps({"v": 1, "n": NONCE, "e": endpoint})
    with pytest.raises(MalformedFrame, match="endpoint"):
        presence.decode_body(presence.PresenceKind.CHALLENGE, data)


def test_only_a_challenge_may_name_an_endpoint() -> None:
    data = canonical_dumps({"v": 1, "n": NONCE, "i": INSTANCE, "ts": 1, "e": "ws://a:1"})
    with pytest.raises(MalformedFrame):
        presence.decode_body(presence.PresenceKind.PROOF, data)
