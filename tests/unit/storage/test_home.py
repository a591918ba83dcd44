"""The agent home on a real filesystem: atomic writes, corruption, archives, backups."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from talos.core.crypto import Argon2Params
from talos.core.identity import Identity
from talos.errors import (
    BackupInvalid,
    ConfigurationError,
    IdentityNotFound,
    KeyFileCorrupted,
    StoreCorrupted,
    WrongPassphrase,
)
from talos.storage.home import AgentHome, atomic_write
from talos.testing import FakeClock, SeededRng

FAST = Argon2Params(time_cost=1, memory_kib=64, parallelism=1)


@pytest.fixture
def identity(rng: SeededRng, clock: FakeClock) -> Identity:
    return Identity.create("alice", rng=rng, clock=clock)


@pytest.fixture
def home(tmp_path: Path) -> AgentHome:
    return AgentHome(tmp_path / "home")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_local_key_mode(home: AgentHome, identity: Identity, rng: SeededRng) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    assert home.load_identity(passphrase=None).agent_id == identity.agent_id
    assert stat.S_IMODE(home.local_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.identity_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.path.stat().st_mode) == 0o700
    assert not home.needs_passphrase()


def test_local_key_is_reused_across_saves(
    home: AgentHome, identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    key = home.local_key_path.read_bytes()
    home.save_identity(identity.rotate(rng=rng, clock=clock), rng=rng, passphrase=None)
    assert home.local_key_path.read_bytes() == key
    assert home.load_identity(passphrase=None).sequence == 1


def test_passphrase_mode(home: AgentHome, identity: Identity, rng: SeededRng) -> None:
    home.save_identity(identity, rng=rng, passphrase=b"pw", params=FAST)
    assert home.needs_passphrase()
    assert not home.local_key_path.exists()
    assert home.load_identity(passphrase=b"pw").agent_id == identity.agent_id
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        home.load_identity(passphrase=b"nope")
    with pytest.raises(WrongPassphrase, match="protected by a passphrase"):
        home.load_identity(passphrase=None)


def test_missing_identity(home: AgentHome) -> None:
    with pytest.raises(IdentityNotFound):
        home.load_identity(passphrase=None)


@pytest.mark.parametrize("offset", [0, 7, 9, 40, 100, -40, -1])
def test_corrupted_key_file_names_the_file(
    home: AgentHome, identity: Identity, rng: SeededRng, offset: int
) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    _flip(home.identity_path, offset)
    with pytest.raises(KeyFileCorrupted) as info:
        home.load_identity(passphrase=None)
    assert info.value.where == str(home.identity_path)
    assert "talos recover --backup" in info.value.diagnostics()


def test_truncated_key_file(home: AgentHome, identity: Identity, rng: SeededRng) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    home.identity_path.write_bytes(home.identity_path.read_bytes()[:50])
    with pytest.raises(KeyFileCorrupted):
        home.load_identity(passphrase=None)


def test_corrupted_local_key(home: AgentHome, identity: Identity, rng: SeededRng) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    _flip(home.local_key_path, 12)
    with pytest.raises(KeyFileCorrupted) as info:
        home.load_identity(passphrase=None)
    assert info.value.where == str(home.local_key_path)


def test_local_key_readable_by_others_is_refused(
    home: AgentHome, identity: Identity, rng: SeededRng
) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    os.chmod(home.local_key_path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        home.load_identity(passphrase=None)


def test_archive_keeps_old_files(
    home: AgentHome, identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    before = home.identity_path.read_bytes()
    target = home.archive_identity(clock=clock)
    assert not home.has_identity()
    assert (target / "identity.key").read_bytes() == before
    assert (target / "identity.localkey").exists()


def test_backup_round_trip_and_failures(tmp_path: Path, identity: Identity, rng: SeededRng) -> None:
    out = tmp_path / "backup.enc"
    AgentHome.write_backup(out, identity, passphrase=b"pw", rng=rng, params=FAST)
    restored = AgentHome.read_backup(out, passphrase=b"pw")
    assert restored.agent_id == identity.agent_id
    assert restored.next_signing_key.public_key == identity.next_signing_key.public_key
    with pytest.raises(BackupInvalid, match="wrong passphrase"):
        AgentHome.read_backup(out, passphrase=b"bad")
    _flip(out, 60)
    with pytest.raises(BackupInvalid, match="damaged"):
        AgentHome.read_backup(out, passphrase=b"pw")
    with pytest.raises(BackupInvalid, match="does not exist"):
        AgentHome.read_backup(tmp_path / "missing", passphrase=b"pw")


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("offset", [9, 20, -1])
def test_damaged_passphrase_key_file_is_reported_as_itself(
    home: AgentHome, identity: Identity, rng: SeededRng, offset: int
) -> None:
    """Damage must not be mistaken for a missing local key or a wrong passphrase."""
    home.save_identity(identity, rng=rng, passphrase=b"pw", params=FAST)
    _flip(home.identity_path, offset)
    assert not home.needs_passphrase()
    with pytest.raises(KeyFileCorrupted) as info:
        home.load_identity(passphrase=b"pw")
    assert info.value.where == str(home.identity_path)


def test_public_keylog_follows_the_identity(
    home: AgentHome, identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    assert home.load_public_keylog() is None
    home.save_identity(identity, rng=rng, passphrase=b"pw", params=FAST)
    log = home.load_public_keylog()
    assert log is not None
    assert log.agent_id == identity.agent_id
    rotated = identity.rotate(rng=rng, clock=clock)
    home.save_identity(rotated, rng=rng, passphrase=b"pw", params=FAST)
    again = home.load_public_keylog()
    assert again is not None
    assert again.state.sequence == 1
    home.keylog_path.write_bytes(b"\xa0")
    with pytest.raises(StoreCorrupted):
        home.load_public_keylog()


def test_a_public_key_log_behind_the_key_file_is_completed(
    home: AgentHome, identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    """A crash between the key file and the public log (written in that order)."""
    home.save_identity(identity, rng=rng, passphrase=None)
    behind = home.keylog_path.read_bytes()
    rotated = identity.rotate(rng=rng, clock=clock)
    home.save_identity(rotated, rng=rng, passphrase=None)
    home.keylog_path.write_bytes(behind)
    home.check_public_keylog(rotated.keylog)
    assert home.keylog_path.read_bytes() == rotated.keylog.to_bytes()
    home.keylog_path.unlink()  # none at all: lost state, for the start-up guard to decide
    home.check_public_keylog(rotated.keylog)
    assert not home.keylog_path.exists()


def test_a_public_key_log_ahead_of_the_key_file_is_refused(
    home: AgentHome, identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    """It names a key whose secret this home does not hold: never repaired."""
    home.save_identity(identity.rotate(rng=rng, clock=clock), rng=rng, passphrase=None)
    ahead = home.keylog_path.read_bytes()
    with pytest.raises(StoreCorrupted, match="does not match the key file") as caught:
        home.check_public_keylog(identity.keylog)
    assert "talos recover" in caught.value.hint
    assert home.keylog_path.read_bytes() == ahead


def test_the_key_file_is_written_before_the_public_log(
    home: AgentHome,
    identity: Identity,
    rng: SeededRng,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    written: list[str] = []
    real = atomic_write

    def recording(path: Path, data: bytes, *, mode: int = 0o600) -> None:
        written.append(path.name)
        real(path, data, mode=mode)

    monkeypatch.setattr("talos.storage.home.atomic_write", recording)
    home.save_identity(identity.rotate(rng=rng, clock=clock), rng=rng, passphrase=None)
    assert written == ["identity.key", "keylog.cbor"]


def test_archiving_everything_moves_state_and_capabilities(
    home: AgentHome, identity: Identity, rng: SeededRng, clock: FakeClock
) -> None:
    home.save_identity(identity, rng=rng, passphrase=None)
    for folder in ("audit", "capabilities"):
        (home.path / folder).mkdir()
        (home.path / folder / "data.mdb").write_bytes(b"x")
    target = home.archive_identity(clock=clock, everything=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "audit", "capabilities", "identity.key", "identity.localkey", "keylog.cbor",
    ]  # fmt: skip
    assert (target / "audit" / "data.mdb").read_bytes() == b"x"
    assert not home.has_identity()
    assert not (home.path / "audit").exists()
