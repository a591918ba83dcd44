"""Properties of the Double Ratchet under arbitrary interleaving, reordering, loss and replay."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from talos.core.crypto import DHKey
from talos.core.ratchet import Session
from talos.errors import (
    CryptoError,
    DecryptionFailed,
    DuplicateMessage,
    MalformedFrame,
)
from talos.testing import SeededRng

NOW = 1_700_000_000.0
PARTIES = ("alice", "bob")

# One step of a scenario: (action, party, selector). "send" makes `party` send;
# "deliver"/"drop" take in-flight message number `selector` addressed to `party`;
# "replay" redelivers an already delivered message to `party`; "persist" reloads
# `party`'s session from its serialized state.
ops = st.lists(
    st.tuples(
        st.sampled_from(["send", "send", "deliver", "deliver", "drop", "replay", "persist"]),
        st.sampled_from(PARTIES),
        st.integers(min_value=0, max_value=1_000),
    ),
    max_size=80,
)


@dataclass
class Party:
    session: Session
    rng: SeededRng
    received_any: bool = False
    inbox: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)
    delivered: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)


def make_parties(seed: int) -> dict[str, Party]:
    rng = SeededRng(seed)
    sk, ad, spk = rng.bytes(32), rng.bytes(32), DHKey.generate(rng)
    alice_rng, bob_rng = SeededRng(seed + 1), SeededRng(seed + 2)
    return {
        "alice": Party(Session.initiator(sk, ad, spk.public, alice_rng), alice_rng, True),
        "bob": Party(Session.responder(sk, ad, spk, bob_rng), bob_rng),
    }


def other(name: str) -> str:
    return "bob" if name == "alice" else "alice"


def step(parties: dict[str, Party], action: str, name: str, pick: int, counter: int) -> None:
    me = parties[name]
    if action == "send":
        if not me.received_any:
            return  # the responder cannot send before the first message arrives
        plaintext = b"%s-%d" % (name.encode(), counter)
        header, ciphertext = me.session.encrypt(plaintext, now=NOW)
        parties[other(name)].inbox.append((header, ciphertext, plaintext))
    elif action in ("deliver", "drop") and me.inbox:
        header, ciphertext, plaintext = me.inbox.pop(pick % len(me.inbox))
        if action == "deliver":
            assert me.session.decrypt(header, ciphertext, now=NOW) == plaintext
            me.received_any = True
            me.delivered.append((header, ciphertext, plaintext))
    elif action == "replay" and me.delivered:
        header, ciphertext, _ = me.delivered[pick % len(me.delivered)]
        check_replay(me.session, header, ciphertext)
    elif action == "persist":
        me.session = Session.from_bytes(me.session.to_bytes(), rng=me.rng)


def check_replay(session: Session, header: bytes, ciphertext: bytes) -> None:
    before = session.to_bytes()
    known_chain = header[:32] == session._dhr or header[:32] in session._retired
    try:
        session.decrypt(header, ciphertext, now=NOW)
    except DuplicateMessage:
        pass
    except DecryptionFailed:
        # Only a chain retired so long ago that its key was forgotten may do this.
        assert not known_chain
    else:
        raise AssertionError("a replayed message decrypted twice")
    assert session.to_bytes() == before


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(min_value=0, max_value=2**16))
def test_every_delivered_message_decrypts_exactly_once(steps, seed):
    parties = make_parties(seed)
    for counter, (action, name, pick) in enumerate(steps):
        step(parties, action, name, pick, counter)
    # Whatever is still in flight decrypts too, in any order, and only once.
    for name in PARTIES:
        me = parties[name]
        while me.inbox:
            step(parties, "deliver", name, len(me.inbox) // 2, 0)
        for header, ciphertext, _ in me.delivered:
            check_replay(me.session, header, ciphertext)


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(st.binary(min_size=40, max_size=40), st.binary(max_size=48)),
    st.binary(min_size=0, max_size=64),
    st.integers(min_value=0, max_value=4),
)
def test_arbitrary_input_raises_only_documented_errors(header, ciphertext, warmup):
    parties = make_parties(7)
    for i in range(warmup):
        step(parties, "send", "alice", 0, i)
        step(parties, "deliver", "bob", 0, i)
    bob = parties["bob"].session
    before = bob.to_bytes()
    try:
        bob.decrypt(header, ciphertext, now=NOW)
    except (CryptoError, MalformedFrame):
        pass
    assert bob.to_bytes() == before
