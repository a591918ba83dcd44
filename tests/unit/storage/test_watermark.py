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
    Marks,
    Watermark,
    WatermarkKeeper,
    load_watermark,
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
