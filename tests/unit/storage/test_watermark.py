"""The signed watermark: its format, its signature across rotations, and that it only grows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from talos.core.audit.merkle import EMPTY_ROOT
from talos.core.identity import Identity
from talos.errors import StateLost, StoreCorrupted
from talos.storage.home import AgentHome
from talos.storage.watermark import (
    WATERMARK_FILE,
    WATERMARK_NEXT_FILE,
    Marks,
    Watermark,
    WatermarkKeeper,
    load_watermark,
    prepare_rotation,
    resign_for_rotation,
    start_watermark,
)
from talos.testing import FakeClock, SeededRng

MARKS = Marks(keys=1, audit_size=64, audit_root=b"\x07" * 32, audit_blocks=3, capabilities=9)


def test_a_written_watermark_reads_back_verified(home: AgentHome, identity: Identity) -> None:
    WatermarkKeeper(home, identity, MARKS).write(MARKS)
    path = home.path / WATERMARK_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_watermark(home, identity.keylog) == Watermark(identity.agent_id, 0, MARKS)


def test_no_file_is_no_watermark(home: AgentHome, identity: Identity) -> None:
    assert load_watermark(home, identity.keylog) is None


def test_the_first_watermark_is_zero(home: AgentHome, identity: Identity) -> None:
    start_watermark(home, identity)
    loaded = load_watermark(home, identity.keylog)
    assert loaded is not None
    assert loaded.marks == Marks(1, 0, EMPTY_ROOT, 0, 0)


def test_it_still_verifies_after_a_rotation(home: AgentHome, identity: Identity) -> None:
    WatermarkKeeper(home, identity, MARKS).write(MARKS)
    rotated = identity.rotate(rng=SeededRng(3), clock=FakeClock())
    old = load_watermark(home, rotated.keylog)
    assert old is not None
    assert old.key_seq == 0
    keeper = WatermarkKeeper(home, rotated, MARKS)
    keeper.advance(replace(MARKS, keys=2))
    new = load_watermark(home, rotated.keylog)
    assert new is not None
    assert new.key_seq == 1
    assert new.marks.keys == 2
    # Signed by key event 1, which the old log does not have: the key log was lost.
    with pytest.raises(StateLost):
        load_watermark(home, identity.keylog)


def test_one_signed_by_a_revoked_key_is_refused(home: AgentHome, identity: Identity) -> None:
    WatermarkKeeper(home, identity, MARKS).write(MARKS)
    rotated = identity.rotate(rng=SeededRng(3), clock=FakeClock(), emergency=True, revoke_old=True)
    with pytest.raises(StoreCorrupted, match="signed with key 0, which the emergency rotation"):
        load_watermark(home, rotated.keylog)
    # A routine rotation revokes nothing: the old signature still vouches.
    routine = identity.rotate(rng=SeededRng(3), clock=FakeClock())
    assert load_watermark(home, routine.keylog) is not None


def test_a_stopped_rotation_re_signs_it_with_the_new_key(
    home: AgentHome, identity: Identity
) -> None:
    WatermarkKeeper(home, identity, MARKS).write(MARKS)
    before = load_watermark(home, identity.keylog)
    rotated = identity.rotate(rng=SeededRng(3), clock=FakeClock(), emergency=True, revoke_old=True)
    prepare_rotation(home, before, rotated)
    # The key file is not written yet: the old log does not have the new key, and
    # the prepared watermark does not count.
    assert load_watermark(home, identity.keylog) == before
    # Crash after the key file: the main file is under the revoked key, the
    # prepared one under the new key stands in for it.
    prepared = load_watermark(home, rotated.keylog)
    assert prepared is not None
    assert (prepared.key_seq, prepared.marks) == (1, replace(MARKS, keys=2))
    resign_for_rotation(home, before, rotated)
    assert not (home.path / WATERMARK_NEXT_FILE).exists()
    assert load_watermark(home, rotated.keylog) == prepared


def test_a_prepared_watermark_never_lowers_marks_the_main_file_advanced_to(
    home: AgentHome, identity: Identity
) -> None:
    keeper = WatermarkKeeper(home, identity, MARKS)
    keeper.write(MARKS)
    before = load_watermark(home, identity.keylog)
    rotated = identity.rotate(rng=SeededRng(3), clock=FakeClock())
    prepare_rotation(home, before, rotated)
    # The running agent seals one more block under the old key before the
    # rotation's key file commits, then the process dies.
    later = replace(MARKS, audit_size=80, audit_root=b"\x08" * 32, audit_blocks=4, capabilities=11)
    keeper.advance(later)
    loaded = load_watermark(home, rotated.keylog)
    assert loaded is not None
    assert loaded.key_seq == 1
    assert loaded.marks == replace(later, keys=2)


def test_a_prepared_watermark_that_does_not_verify_is_ignored(
    home: AgentHome, identity: Identity
) -> None:
    WatermarkKeeper(home, identity, MARKS).write(MARKS)
    other = Identity.create("mallory", rng=SeededRng(9), clock=FakeClock())
    forged = Watermark(identity.agent_id, 0, replace(MARKS, audit_size=1))
    (home.path / WATERMARK_NEXT_FILE).write_bytes(forged.to_bytes(other))
    assert load_watermark(home, identity.keylog) == Watermark(identity.agent_id, 0, MARKS)


def test_a_keeper_signs_with_the_identity_current_at_each_write(
    home: AgentHome, identity: Identity
) -> None:
    current = [identity]
    keeper = WatermarkKeeper(home, lambda: current[0], MARKS)
    keeper.write(MARKS)
    current[0] = identity.rotate(
        rng=SeededRng(3), clock=FakeClock(), emergency=True, revoke_old=True
    )
    keeper.key_log_grew(2)
    loaded = load_watermark(home, current[0].keylog)
    assert loaded is not None
    assert loaded.key_seq == 1


@pytest.mark.parametrize("offset", [5, -1, -40])
def test_every_flipped_byte_is_corruption(home: AgentHome, identity: Identity, offset: int) -> None:
    WatermarkKeeper(home, identity, MARKS).write(MARKS)
    path = home.path / WATERMARK_FILE
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreCorrupted) as caught:
        load_watermark(home, identity.keylog)
    assert caught.value.where == str(path)
    assert not isinstance(caught.value, StateLost)


def test_another_agents_watermark_is_corruption(home: AgentHome, identity: Identity) -> None:
    other = Identity.create("mallory", rng=SeededRng(9), clock=FakeClock())
    (home.path / WATERMARK_FILE).write_bytes(Watermark(other.agent_id, 0, MARKS).to_bytes(other))
    with pytest.raises(StoreCorrupted, match="another agent"):
        load_watermark(home, identity.keylog)


def test_the_keeper_never_goes_backwards(home: AgentHome, identity: Identity) -> None:
    keeper = WatermarkKeeper(home, identity, MARKS)
    keeper.write(MARKS)
    keeper.capabilities_written(3)  # an older generation, told late
    keeper.advance(replace(MARKS, audit_size=10, audit_blocks=1))
    loaded = load_watermark(home, identity.keylog)
    assert loaded is not None
    assert loaded.marks == MARKS
    keeper.capabilities_written(10)
    loaded = load_watermark(home, identity.keylog)
    assert loaded is not None
    assert loaded.marks == replace(MARKS, capabilities=10)


def test_a_failed_write_is_logged_not_raised(
    home: AgentHome, identity: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = WatermarkKeeper(home, identity, MARKS)
    (home.path / WATERMARK_FILE).mkdir()  # nothing can be renamed over a directory
    keeper.capabilities_written(10)
    events = [getattr(record, "event", None) for record in caplog.records]
    assert "watermark_not_written" in events
    assert keeper.marks == MARKS
