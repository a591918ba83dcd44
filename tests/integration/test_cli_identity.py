"""The identity CLI as a user runs it: real processes, a real home directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.testing.cli import CliResult, TalosCli, clean_env


class Talos:
    """Runs ``python -m talos`` against one home (``TALOS_HOME``), without a terminal."""

    def __init__(self, home: Path, **env: str) -> None:
        self.env = clean_env({"TALOS_HOME": str(home), **env})
        self.cli = TalosCli(self.env)

    def __call__(self, *args: str, **env: str) -> CliResult:
        return self.cli.run(None, *args, extra_env=env)

    def ok(self, *args: str, **env: str) -> str:
        return self.cli.ok(None, *args, extra_env=env)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def talos(home: Path) -> Talos:
    return Talos(home)


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    path = tmp_path / "backup-pass"
    path.write_text("correct horse battery staple\n")
    return path


def _whoami(talos: Talos) -> dict[str, object]:
    result: dict[str, object] = json.loads(talos.ok("whoami", "--json"))
    return result


def test_backup_corrupt_recover_round_trip(talos: Talos, home: Path, passfile: Path) -> None:
    agent_id = talos.ok("init", "--name", "alice").strip()
    assert agent_id.startswith("did:talos:z")
    assert _whoami(talos)["agent_id"] == agent_id
    backup = home.parent / "alice.bak"
    talos.ok("backup", "--out", str(backup), "--passphrase-file", str(passfile))

    key_file = home / "identity.key"
    data = bytearray(key_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    key_file.write_bytes(bytes(data))

    broken = talos("whoami")
    assert broken.returncode == 3
    assert str(key_file) in broken.stderr
    assert "talos recover --backup" in broken.stderr
    assert "Traceback" not in broken.stderr + broken.stdout

    recovered = talos.ok("recover", "--backup", str(backup), "--passphrase-file", str(passfile))
    assert recovered.strip() == agent_id
    assert _whoami(talos)["agent_id"] == agent_id
    archived = list((home / "archive").glob("*/identity.key"))
    assert [p.read_bytes() for p in archived] == [bytes(data)]


def test_recover_with_wrong_passphrase_overwrites_nothing(
    talos: Talos, home: Path, passfile: Path, tmp_path: Path
) -> None:
    talos.ok("init", "--name", "alice")
    backup = tmp_path / "alice.bak"
    talos.ok("backup", "--out", str(backup), "--passphrase-file", str(passfile))
    before = (home / "identity.key").read_bytes()
    wrong = tmp_path / "wrong"
    wrong.write_text("not it")
    result = talos("recover", "--backup", str(backup), "--passphrase-file", str(wrong))
    assert result.returncode == 5
    assert "wrong passphrase" in result.stderr
    assert (home / "identity.key").read_bytes() == before


def test_damaged_backup_is_refused(talos: Talos, passfile: Path, tmp_path: Path) -> None:
    talos.ok("init", "--name", "alice")
    backup = tmp_path / "alice.bak"
    talos.ok("backup", "--out", str(backup), "--passphrase-file", str(passfile))
    backup.write_bytes(backup.read_bytes()[:-5])
    result = talos("recover", "--backup", str(backup), "--passphrase-file", str(passfile))
    assert result.returncode == 5
    assert "damaged" in result.stderr


def test_recover_refuses_to_replace_a_different_intact_identity(
    tmp_path: Path, passfile: Path
) -> None:
    alice, bob = Talos(tmp_path / "alice"), Talos(tmp_path / "bob")
    alice.ok("init", "--name", "alice")
    bob_id = bob.ok("init", "--name", "bob").strip()
    backup = tmp_path / "alice.bak"
    alice.ok("backup", "--out", str(backup), "--passphrase-file", str(passfile))
    result = bob("recover", "--backup", str(backup), "--passphrase-file", str(passfile))
    assert result.returncode == 4
    assert _whoami(bob)["agent_id"] == bob_id


def test_init_refuses_overwrite_and_new_identity_archives(talos: Talos, home: Path) -> None:
    first = talos.ok("init", "--name", "alice").strip()
    again = talos("init", "--name", "alice")
    assert again.returncode == 4
    assert "--new-identity" in again.stderr
    assert _whoami(talos)["agent_id"] == first

    old_key = (home / "identity.key").read_bytes()
    result = talos("init", "--name", "alice2", "--new-identity")
    assert result.returncode == 0, result.stderr
    second = result.stdout.strip()
    assert second != first
    assert "capabilities" in result.stderr
    assert [p.read_bytes() for p in (home / "archive").glob("*/identity.key")] == [old_key]
    assert _whoami(talos)["agent_id"] == second


def test_rotate_keeps_id_and_advances_sequence(talos: Talos) -> None:
    agent_id = talos.ok("init", "--name", "alice").strip()
    before = _whoami(talos)
    talos.ok("rotate")
    after = _whoami(talos)
    assert after["agent_id"] == agent_id
    assert after["sequence"] == 1
    assert after["fingerprint"] != before["fingerprint"]
    with AuditLog.open(Path(talos.env["TALOS_HOME"]) / "audit", readonly=True) as log:
        (entry,) = log.query(kind="KEY_ROTATED")
    assert entry.data == {
        "sequence": 1,
        "fingerprint": after["fingerprint"],
        "reason": "",
        "emergency": False,
        "revoke_old": False,
    }


def test_passphrase_protected_key_file(talos: Talos, home: Path, tmp_path: Path) -> None:
    keypass = tmp_path / "keypass"
    keypass.write_text("key secret")
    agent_id = talos.ok("init", "--name", "alice", "--key-passphrase-file", str(keypass)).strip()
    assert not (home / "identity.localkey").exists()
    locked = talos("whoami")
    assert locked.returncode == 5
    assert "TALOS_KEY_PASSPHRASE" in locked.stderr
    assert "key secret" not in locked.stderr
    shown = json.loads(talos.ok("whoami", "--json", TALOS_KEY_PASSPHRASE="key secret"))
    assert shown["agent_id"] == agent_id
    wrong = talos("whoami", TALOS_KEY_PASSPHRASE="nope")
    assert wrong.returncode == 5


def test_whoami_without_identity(talos: Talos) -> None:
    result = talos("whoami")
    assert result.returncode == 4
    assert "talos init" in result.stderr


def test_recover_refuses_to_roll_back_a_rotated_identity(
    talos: Talos, passfile: Path, tmp_path: Path
) -> None:
    talos.ok("init", "--name", "alice")
    backup = tmp_path / "alice.bak"
    talos.ok("backup", "--out", str(backup), "--passphrase-file", str(passfile))
    talos.ok("rotate")
    result = talos("recover", "--backup", str(backup), "--passphrase-file", str(passfile))
    assert result.returncode == 4
    assert "newer" in result.stderr
    assert _whoami(talos)["sequence"] == 1
    forced = talos(
        "recover", "--backup", str(backup), "--passphrase-file", str(passfile), "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert _whoami(talos)["sequence"] == 0
