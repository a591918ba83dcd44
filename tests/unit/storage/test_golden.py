"""Files written by format version 1 must load forever.

The golden files under ``tests/golden`` were written once by this version of
Talos from a seeded random source; they are never regenerated.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from talos.storage.home import AgentHome

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
AGENT_ID = "did:talos:zGGF6ewAMoNkLy3Ubwiju4MU3WNt2E5fvPP8jyG4Gjcac"
FINGERPRINT = "9f7d:f941:2aca:d698:8f7f:a4f8:634f:5528"


def test_key_file_v1_loads(tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(GOLDEN / "home-v1", home)
    (home / "identity.localkey").chmod(0o600)  # git does not keep file modes
    identity = AgentHome(home).load_identity(passphrase=None)
    assert identity.agent_id == AGENT_ID
    assert identity.sequence == 1
    assert identity.fingerprint == FINGERPRINT


def test_backup_v1_loads() -> None:
    identity = AgentHome.read_backup(GOLDEN / "backup-v1.enc", passphrase=b"golden passphrase")
    assert identity.agent_id == AGENT_ID
    assert identity.sequence == 1
