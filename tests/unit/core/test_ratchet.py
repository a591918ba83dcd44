"""Double Ratchet: round trips, ordering, loss, bounds, duplicates, clone-then-commit, state."""

from __future__ import annotations

import pytest

from talos.core.crypto import DHKey, aead_encrypt, hkdf_sha256, hmac_sha256
from talos.core.encoding import canonical_dumps, strict_loads
from talos.core.ratchet import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    RatchetHeader,
    RatchetLimits,
    Session,
)
from talos.errors import (
    ConfigurationError,
    CryptoError,
    DecryptionFailed,
    DuplicateMessage,
    KeyAgreementFailed,
    MalformedFrame,
    SessionError,
    TooManySkippedKeys,
    UnsupportedVersion,
)
from talos.testing import SeededRng

NOW = 1_700_000_000.0
SMALL = RatchetLimits(max_skip=5, max_stored=8, max_age=60.0)

Message = tuple[bytes, bytes]


def make_pair(
    seed: int = 1, limits: RatchetLimits = DEFAULT_LIMITS
) -> tuple[Session, Session, SeededRng]:
    rng = SeededRng(seed)
    sk, ad, spk = rng.bytes(32), rng.bytes(32), DHKey.generate(rng)
    alice = Session.initiator(sk, ad, spk.public, rng, limits=limits)
    bob = Session.responder(sk, ad, spk, rng, limits=limits)
    return alice, bob, rng


def send(session: Session, text: bytes, now: float = NOW) -> Message:
    return session.encrypt(text, now=now)


def recv(session: Session, message: Message, now: float = NOW) -> bytes:
    return session.decrypt(*message, now=now)


@pytest.fixture
def pair() -> tuple[Session, Session]:
    alice, bob, _ = make_pair()
    return alice, bob


def established(limits: RatchetLimits = SMALL) -> tuple[Session, Session]:
    """A pair that has exchanged one message each way (both have all chains)."""
    alice, bob, _ = make_pair(limits=limits)
    assert recv(bob, send(alice, b"hello")) == b"hello"
    assert recv(alice, send(bob, b"hi")) == b"hi"
    return alice, bob


# -- profile ------------------------------------------------------------------------


def test_first_message_follows_the_profile_exactly():
    rng = SeededRng(42)
    sk, ad, spk = rng.bytes(32), rng.bytes(32), DHKey.generate(rng)
    alice = Session.initiator(sk, ad, spk.public, SeededRng(7))
    header, ciphertext = alice.encrypt(b"profile", now=NOW)

    ratchet = DHKey(SeededRng(7).bytes(32))
    okm = hkdf_sha256(
        ratchet.exchange(spk.public), salt=sk, info=b"talos/ratchet/root/v1", length=64
    )
    chain_key = okm[32:]
    message_key = hmac_sha256(chain_key, b"\x01")
    keys = hkdf_sha256(message_key, salt=bytes(32), info=b"talos/ratchet/message/v1", length=44)
    expected_header = ratchet.public + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
    assert header == expected_header
    assert ciphertext == aead_encrypt(keys[:32], keys[32:], b"profile", ad + expected_header)
    second, _ = alice.encrypt(b"x", now=NOW)
    assert RatchetHeader.from_bytes(second) == RatchetHeader(ratchet.public, 0, 1)
    assert alice.encrypt(b"y", now=NOW)[0] == RatchetHeader(ratchet.public, 0, 2).to_bytes()
    # The next chain key is HMAC(ck, 0x02): message 1 uses HMAC(HMAC(ck, 2), 1).
    mk1 = hmac_sha256(hmac_sha256(chain_key, b"\x02"), b"\x01")
    k1 = hkdf_sha256(mk1, salt=None, info=b"talos/ratchet/message/v1", length=44)
    bob = Session.responder(sk, ad, spk, SeededRng(8))
    recv(bob, (header, ciphertext))
    assert recv(bob, (second, aead_encrypt(k1[:32], k1[32:], b"z", ad + second))) == b"z"


# -- round trips ---------------------------------------------------------------------


def test_round_trips_both_directions(pair):
    alice, bob = pair
    for turn in range(6):
        burst = [send(alice, b"a%d-%d" % (turn, i)) for i in range(turn + 1)]
        assert [recv(bob, m) for m in burst] == [b"a%d-%d" % (turn, i) for i in range(turn + 1)]
        reply = [send(bob, b"b%d-%d" % (turn, i)) for i in range(turn)]
        assert [recv(alice, m) for m in reply] == [b"b%d-%d" % (turn, i) for i in range(turn)]


def test_empty_and_large_plaintexts(pair):
    alice, bob = pair
    assert recv(bob, send(alice, b"")) == b""
    big = bytes(range(256)) * 1024
    assert recv(bob, send(alice, big)) == big


def test_header_carries_pn_and_n(pair):
    alice, bob = pair
    for _ in range(3):
        recv(bob, send(alice, b"x"))
    header = RatchetHeader.from_bytes(send(bob, b"y")[0])
    assert header == RatchetHeader(bob.ratchet_key, 0, 0)
    header = RatchetHeader.from_bytes(send(bob, b"y")[0])
    assert header.message_number == 1
    recv(alice, send(bob, b"z"))
    header = RatchetHeader.from_bytes(send(alice, b"w")[0])
    assert (header.previous_chain_length, header.message_number) == (3, 0)


def test_responder_cannot_send_first(pair):
    _, bob = pair
    with pytest.raises(SessionError):
        bob.encrypt(b"too early", now=NOW)


# -- ordering and loss -------------------------------------------------------------------


def test_out_of_order_within_a_chain(pair):
    alice, bob = pair
    msgs = [send(alice, b"%d" % i) for i in range(6)]
    for i in (3, 0, 5, 1, 4, 2):
        assert recv(bob, msgs[i]) == b"%d" % i
    assert bob.skipped_count == 0


def test_out_of_order_across_ratchet_steps():
    alice, bob = established()
    old = [send(alice, b"old%d" % i) for i in range(3)]
    recv(bob, old[0])
    recv(alice, send(bob, b"turn"))
    new = [send(alice, b"new%d" % i) for i in range(2)]
    assert recv(bob, new[1]) == b"new1"
    assert bob.skipped_count == 3  # old1, old2 and new0
    assert recv(bob, old[2]) == b"old2"
    assert recv(bob, new[0]) == b"new0"
    assert recv(bob, old[1]) == b"old1"
    assert bob.skipped_count == 0


def test_lost_messages_do_not_block_later_ones(pair):
    alice, bob = pair
    for i in range(10):
        message = send(alice, b"%d" % i)
        if i % 3 == 0:
            assert recv(bob, message) == b"%d" % i
    assert bob.skipped_count == 6
    recv(alice, send(bob, b"ack"))
    assert recv(bob, send(alice, b"after")) == b"after"


# -- skipped-key bounds --------------------------------------------------------------------


def test_per_step_skip_bound():
    alice, bob = established()
    msgs = [send(alice, b"%d" % i) for i in range(SMALL.max_skip + 2)]
    before = bob.to_bytes()
    with pytest.raises(TooManySkippedKeys):
        recv(bob, msgs[-1])
    assert bob.to_bytes() == before
    assert recv(bob, msgs[-2]) == b"%d" % (SMALL.max_skip)  # exactly max_skip skipped
    assert bob.skipped_count == SMALL.max_skip


def test_previous_chain_skip_bound():
    alice, bob = established()
    for _ in range(SMALL.max_skip + 1):
        send(alice, b"lost")
    recv(alice, send(bob, b"turn"))
    message = send(alice, b"new chain")  # header PN = max_skip + 2, bob has nr = 1
    before = bob.to_bytes()
    with pytest.raises(TooManySkippedKeys):
        recv(bob, message)
    assert bob.to_bytes() == before


def test_total_stored_bound():
    alice, bob = established()
    first = [send(alice, b"a%d" % i) for i in range(5)]
    recv(bob, first[-1])  # stores 4
    recv(alice, send(bob, b"turn"))
    second = [send(alice, b"b%d" % i) for i in range(6)]
    before = bob.to_bytes()
    with pytest.raises(TooManySkippedKeys):  # 4 + 4 = 8 is fine, 4 + 5 is not
        recv(bob, second[-1])
    assert bob.to_bytes() == before
    assert recv(bob, second[-2]) == b"b4"
    assert bob.skipped_count == 8
    for message in first[:-1] + second[:-2]:
        recv(bob, message)
    assert bob.skipped_count == 0
    assert recv(bob, second[-1]) == b"b5"


def test_skipped_keys_expire_with_now():
    alice, bob = established()
    msgs = [send(alice, b"%d" % i) for i in range(4)]
    recv(bob, msgs[3], now=NOW)
    assert bob.skipped_count == 3
    assert recv(bob, msgs[0], now=NOW + SMALL.max_age) == b"0"  # not older than max_age yet
    later = NOW + SMALL.max_age + 1
    before = bob.to_bytes()
    with pytest.raises(DuplicateMessage):  # its key is gone
        recv(bob, msgs[1], now=later)
    assert bob.to_bytes() == before  # failures never commit, not even the purge
    send(bob, b"purges", now=later)
    assert bob.skipped_count == 0


def test_expiry_purges_on_successful_decrypt():
    alice, bob = established()
    msgs = [send(alice, b"%d" % i) for i in range(3)]
    recv(bob, msgs[2], now=NOW)
    next_message = send(alice, b"next")
    assert recv(bob, next_message, now=NOW + 10 * SMALL.max_age) == b"next"
    assert bob.skipped_count == 0


# -- duplicates ------------------------------------------------------------------------


def test_redelivery_is_a_duplicate(pair):
    alice, bob = pair
    msgs = [send(alice, b"%d" % i) for i in range(3)]
    recv(bob, msgs[2])
    recv(bob, msgs[0])
    recv(alice, send(bob, b"turn"))
    recv(bob, send(alice, b"new chain"))
    for message in (msgs[0], msgs[2]):
        before = bob.to_bytes()
        with pytest.raises(DuplicateMessage):
            recv(bob, message)
        assert bob.to_bytes() == before
    assert recv(bob, msgs[1]) == b"1"
    with pytest.raises(DuplicateMessage):
        recv(bob, msgs[1])


def test_duplicate_in_the_current_chain(pair):
    alice, bob = pair
    message = send(alice, b"once")
    recv(bob, message)
    before = bob.to_bytes()
    with pytest.raises(DuplicateMessage):
        recv(bob, message)
    assert bob.to_bytes() == before


# -- clone-then-commit --------------------------------------------------------------------


def _flips(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        for bit in (0, 3, 7):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            out.append(bytes(flipped))
    return out


@pytest.mark.parametrize("kind", ["in-chain", "new-chain", "skipped"])
def test_tampering_never_changes_state(kind):
    alice, bob = established()
    pending = send(alice, b"pending") if kind == "skipped" else None
    if kind == "new-chain":
        recv(alice, send(bob, b"turn"))
    header, ciphertext = send(alice, b"target")
    if kind == "skipped":
        recv(bob, (header, ciphertext))
        assert pending is not None
        header, ciphertext = pending
    before = bob.to_bytes()
    attempts = [(h, ciphertext) for h in _flips(header)]
    attempts += [(header, c) for c in _flips(ciphertext)]
    attempts += [(header[:-1], ciphertext), (header + b"\0", ciphertext), (b"", ciphertext)]
    attempts += [(header, ciphertext[:-1]), (header, ciphertext[:15]), (header, b"")]
    attempts += [(header, SeededRng(3).bytes(len(ciphertext)))]
    for forged in attempts:
        with pytest.raises((CryptoError, MalformedFrame)):
            bob.decrypt(*forged, now=NOW)
        assert bob.to_bytes() == before
    expected = b"pending" if kind == "skipped" else b"target"
    assert bob.decrypt(header, ciphertext, now=NOW) == expected


def test_forged_ciphertext_is_opaque(pair):
    alice, bob = pair
    recv(bob, send(alice, b"x"))
    header, ciphertext = send(alice, b"secret")
    with pytest.raises(DecryptionFailed) as info:
        bob.decrypt(header, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), now=NOW)
    assert str(info.value) == "ciphertext could not be authenticated"


def test_replayed_message_after_commit_leaves_state(pair):
    alice, bob = pair
    message = send(alice, b"x")
    recv(bob, message)
    snapshot = bob.to_bytes()
    for _ in range(3):
        with pytest.raises(DuplicateMessage):
            recv(bob, message)
    assert bob.to_bytes() == snapshot
    assert recv(bob, send(alice, b"y")) == b"y"


def test_decrypt_uncommitted_leaves_the_session(pair):
    alice, bob = pair
    message = send(alice, b"first")
    before = bob.to_bytes()
    plaintext, successor = bob.decrypt_uncommitted(*message, now=NOW)
    assert plaintext == b"first"
    assert bob.to_bytes() == before
    assert successor.to_bytes() != before
    assert recv(bob, message) == b"first"  # the old one is still valid
    later = send(alice, b"second")
    assert successor.decrypt(*later, now=NOW) == b"second"


def test_low_order_ratchet_keys():
    rng = SeededRng(4)
    with pytest.raises(KeyAgreementFailed):
        Session.initiator(rng.bytes(32), b"", bytes(32), rng)
    alice, bob = established()
    header, ciphertext = send(alice, b"x")
    before = bob.to_bytes()
    with pytest.raises(KeyAgreementFailed):
        bob.decrypt(bytes(32) + header[32:], ciphertext, now=NOW)
    assert bob.to_bytes() == before


# -- persistence ------------------------------------------------------------------------


def test_state_round_trips_mid_conversation():
    alice, bob = established()
    held = [send(alice, b"held%d" % i) for i in range(3)]
    recv(bob, held[2])
    recv(alice, send(bob, b"turn"))
    pending = send(bob, b"pending")
    rng_a, rng_b = SeededRng(11), SeededRng(12)
    alice2 = Session.from_bytes(alice.to_bytes(), rng=rng_a, limits=SMALL)
    bob2 = Session.from_bytes(bob.to_bytes(), rng=rng_b, limits=SMALL)
    assert alice2.to_bytes() == alice.to_bytes()
    assert bob2.to_bytes() == bob.to_bytes()
    assert bob2.skipped_count == 2
    assert recv(bob2, held[0]) == b"held0"
    assert recv(alice2, pending) == b"pending"
    assert recv(bob2, send(alice2, b"on")) == b"on"
    assert recv(alice2, send(bob2, b"and on")) == b"and on"
    assert recv(bob2, held[1]) == b"held1"


def test_state_rejects_garbage_and_unknown_versions():
    alice, _ = established()
    good = alice.to_bytes()
    value = strict_loads(good, max_size=1 << 20)
    with pytest.raises(UnsupportedVersion):
        Session.from_bytes(canonical_dumps(dict(value, v=2)), rng=SeededRng(0))
    broken = [b"", b"\x00", good[:-1], good + b"\x00", canonical_dumps([1])]
    broken += [canonical_dumps(dict(value, rk=b"short")), canonical_dumps(dict(value, ns=-1))]
    broken += [canonical_dumps(dict(value, skipped=[[b"x", 0, b"y", 0]]))]
    broken += [canonical_dumps({k: v for k, v in value.items() if k != "pn"})]
    for data in broken:
        with pytest.raises(MalformedFrame):
            Session.from_bytes(data, rng=SeededRng(0))


def test_session_repr_hides_secrets(pair):
    alice, _ = pair
    text = repr(alice)
    assert "ns=0" in text
    assert alice._rk.hex() not in text


def test_header_parsing():
    assert HEADER_SIZE == 40
    with pytest.raises(MalformedFrame):
        RatchetHeader.from_bytes(bytes(39))
    header = RatchetHeader(bytes(range(32)), 7, 2**32 - 1)
    assert RatchetHeader.from_bytes(header.to_bytes()) == header


@pytest.mark.parametrize(
    "limits", [{"max_skip": 0}, {"max_stored": -1}, {"max_age": 0}, {"max_skip": "a"}]
)
def test_limits_must_be_positive(limits):
    with pytest.raises(ConfigurationError, match="positive"):
        RatchetLimits(**limits)
