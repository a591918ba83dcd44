"""``talos run`` refuses to start on damaged state it can check cheaply (issue 13, item 4).

Real homes, real LMDB files, real ``talos`` processes: a corrupt or foreign
``keylog.cbor`` and a damaged last audit entry or block are a named
``StoreCorrupted`` with exit 3 and the recovery hint, with the same text as
``talos diagnose --storage`` shows, and the damaged log is not appended to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.client import TalosClient
from talos.errors import StoreCorrupted
from talos.storage.home import AgentHome
from talos.storage.lmdb import u64
from talos.testing.cli import CliResult, TalosCli
from talos.testing.damage import flip_stored_bit

CLI = TalosCli()


@pytest.fixture(scope="module")
def base_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agent home that ran once, with a few dozen signed audit entries and blocks."""
    home = tmp_path_factory.mktemp("startup") / "alice"
    CLI.ok(home, "init", "--name", "alice")
    asyncio.run(_start_and_stop(home))
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")
    with AuditLog.open(home / "audit", signer=signer, block_entries=8) as log:
        log.append_many([("MESSAGE_SENT", {"n": n}, None) for n in range(30)])
        log.seal_block()
    return home


@pytest.fixture
def home(base_home: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "alice"
    shutil.copytree(base_home, copy)
    return copy


async def _start_and_stop(home: Path) -> None:
    async with TalosClient.create(home.name, home=home, discovery=[], offline_mode=True):
        pass


def _create_fails(home: Path) -> StoreCorrupted:
    with pytest.raises(StoreCorrupted) as caught:
        asyncio.run(_start_and_stop(home))
    return caught.value


def _run_refused(home: Path) -> CliResult:
    result = CLI.fails(home, 3, "run", "--offline")
    assert "StoreCorrupted" in result.stderr
    return result


def _diagnosed(home: Path, check: str) -> dict[str, object]:
    """The finding ``check`` of ``talos diagnose --storage --json`` (which must fail)."""
    report = json.loads(CLI.fails(home, 1, "diagnose", "--storage", "--json").stdout)
    (finding,) = [row for row in report["checks"]["storage"] if row["subject"] == check]
    assert finding["status"] == "fail"
    return finding


def _last_seq(home: Path) -> int:
    with AuditLog.open(home / "audit", readonly=True) as log:
        return log.size - 1


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_healthy_home_starts(home: Path) -> None:
    asyncio.run(_start_and_stop(home))


def test_a_corrupt_key_log_is_refused_naming_the_file(home: Path) -> None:
    keylog = home / "keylog.cbor"
    raw = bytearray(keylog.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    keylog.write_bytes(bytes(raw))

    error = _create_fails(home)
    assert error.where == str(keylog)
    result = _run_refused(home)
    assert str(keylog) in result.stderr
    assert "hint: `talos recover --backup FILE`" in result.stderr
    finding = _diagnosed(home, "key log")
    assert str(finding["detail"]) in result.stderr
    assert finding["hint"] == "`talos recover --backup FILE`"


def test_a_key_log_of_another_agent_is_refused(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "mallory"
    CLI.ok(other, "init", "--name", "mallory")
    shutil.copyfile(other / "keylog.cbor", home / "keylog.cbor")

    error = _create_fails(home)
    assert error.what == "key log mismatch"
    result = _run_refused(home)
    assert f"public key log {home / 'keylog.cbor'} does not match the key file" in result.stderr
    assert "talos recover --backup FILE" in result.stderr


def test_a_damaged_last_entry_is_refused_as_diagnose_reports_it(home: Path) -> None:
    audit = home / "audit"
    last = _last_seq(home)
    flip_stored_bit(audit, b"entries", u64(last), -1)
    before = _digest(audit / "data.mdb")

    error = _create_fails(home)
    assert error.where == f"seq {last}"
    result = _run_refused(home)
    finding = _diagnosed(home, "audit log")
    detail = str(finding["detail"])
    assert detail == f"damaged: entry, seq {last}: entry bytes do not match the stored leaf hash"
    assert f"{audit / 'data.mdb'} {detail}" in result.stderr
    assert "talos audit restore --backup DIR" in result.stderr
    assert finding["hint"] in result.stderr
    assert _digest(audit / "data.mdb") == before  # nothing appended to the damaged log


def test_a_damaged_last_block_is_refused_as_diagnose_reports_it(home: Path) -> None:
    audit = home / "audit"
    with AuditLog.open(audit, readonly=True) as log:
        height = log.block_count - 1
    flip_stored_bit(audit, b"blocks", u64(height), -1)  # the signature

    assert _create_fails(home).where == f"height {height}"
    result = _run_refused(home)
    detail = str(_diagnosed(home, "audit log")["detail"])
    assert detail.startswith(f"damaged: block, height {height}: signature")
    assert detail in result.stderr
