"""`talos audit rebuild` in real processes on real, damaged LMDB files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lmdb
import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.rebuild import write_log
from talos.core.audit.checkpoint import InclusionProof
from talos.storage.environment import Environment
from talos.storage.home import AgentHome
from talos.storage.lmdb import u64
from talos.storage.lock import LOCK_NAME  # the command held the home: not a change
from talos.storage.watermark import WatermarkKeeper, load_watermark, marks_of
from talos.testing import FakeClock
from talos.testing.cli import TalosCli
from talos.testing.damage import flip_stored_bit
from talos.testing.processes import launched

ENTRIES = 300
BLOCK_ENTRIES = 64
START = 1_700_000_000.0

CLI = TalosCli()
ok, fails = CLI.ok, CLI.fails


def _home(tmp_path: Path) -> tuple[Path, LogSigner]:
    """A home whose signed 300-entry log the watermark records (as a running agent leaves it)."""
    home = tmp_path / "home"
    agent_id = ok(home, "init", "--name", "alice").strip()
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, name=agent_id, origin=f"{agent_id}/audit")
    clock = FakeClock(START)
    with AuditLog.open(
        AgentHome(home).audit_path,
        signer=signer,
        clock=clock,
        block_entries=BLOCK_ENTRIES,
        block_seconds=1e6,
    ) as log:
        for i in range(ENTRIES):
            log.append("MESSAGE_SENT", {"n": i}, peer=f"peer{i % 4}")
            clock.advance(1)
        log.seal_block()
        marks = marks_of(log, 0, len(identity.keylog.events))
    WatermarkKeeper(AgentHome(home), identity, marks).write(marks)
    return home, signer


def _drop(path: Path, *names: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            for name in names:
                txn.drop(env.open_db(name, txn=txn), delete=False)
    finally:
        env.close()


def _aside(out: str, word: str) -> Path:
    return Path(out.split(f"{word} log kept at ", 1)[1].splitlines()[0].strip())


def test_an_intact_log_is_left_alone(tmp_path: Path) -> None:
    home, _ = _home(tmp_path)
    before = sorted(p.name for p in home.iterdir() if p.name != LOCK_NAME)
    out = ok(home, "audit", "rebuild")
    assert f"audit chain intact: {ENTRIES + 0} entries; nothing to rebuild" in out
    assert sorted(p.name for p in home.iterdir() if p.name != LOCK_NAME) == before


def test_deleted_derived_tables_are_derived_again_and_nothing_is_lost(tmp_path: Path) -> None:
    home, _ = _home(tmp_path)
    proof_file = tmp_path / "proof.json"
    ok(home, "audit", "prove", "77", "--out", str(proof_file))
    with AuditLog.open(home / "audit", readonly=True) as log:
        root = log.root()
    _drop(home / "audit", b"nodes", b"index", b"blocks", b"meta")
    fails(home, 3, "audit", "verify-chain")
    result = CLI.run(home, "audit", "rebuild")
    assert result.returncode == 0, result.stderr
    assert f"rebuilt {ENTRIES} intact entries" in result.stdout
    assert "agent state kept" in result.stdout
    assert "lost:" not in result.stderr
    damaged = _aside(result.stdout, "previous")
    assert (damaged / "data.mdb").is_file()
    ok(home, "audit", "verify-chain")
    with AuditLog.open(home / "audit", readonly=True) as log:
        assert log.root_at(ENTRIES) == root
        entry = log.entry(ENTRIES)
        assert entry.kind == "AUDIT_REBUILT"
        assert (entry.data["intact"], entry.data["lost"]) == (ENTRIES, 0)
        assert len(log.query(peer="peer1")) == ENTRIES // 4
    ok(home, "audit", "verify-proof", "--proof", str(proof_file), "--root", root.hex())
    # The rebuilt log proves the same inclusion it proved before the damage.
    proof, _ = InclusionProof.from_json_dict(json.loads(proof_file.read_text()))
    with AuditLog.open(home / "audit", readonly=True) as log:
        assert log.prove_inclusion(77, size=ENTRIES) == proof


def test_a_flipped_entry_ends_the_log_and_the_rest_is_reported_lost(tmp_path: Path) -> None:
    home, signer = _home(tmp_path)
    with AuditLog.open(home / "audit", readonly=True) as log:
        early = log.prove_inclusion(50, size=128)
        early_root = log.root_at(128)
    flip_stored_bit(home / "audit", b"entries", u64(200), 40)
    result = CLI.run(home, "audit", "rebuild")
    assert result.returncode == 0, result.stderr
    assert "damaged: entry, seq 200" in result.stdout
    assert "rebuilt 200 intact entries" in result.stdout
    assert "blocks kept 3, dropped 2" in result.stdout
    assert "lost: 100 entries from position 200" in result.stderr
    ok(home, "audit", "verify-chain")  # the watermark follows the recorded loss
    identity = AgentHome(home).load_identity(passphrase=None)
    watermark = load_watermark(AgentHome(home), identity.keylog)
    assert watermark is not None
    assert watermark.marks.audit_size == 201
    with AuditLog.open(home / "audit", clock=FakeClock(START + 1e4), signer=signer) as log:
        entry = log.entry(200)
        assert entry.kind == "AUDIT_REBUILT"
        assert (entry.data["first_bad"], entry.data["lost"]) == (200, 100)
        assert entry.data["recorded_size"] == ENTRIES
        early.verify(log.root_at(128))
        assert log.root_at(128) == early_root
        log.append("MESSAGE_SENT", {"n": 1000})  # new appends extend the rebuilt log
        log.seal_block()
    ok(home, "audit", "verify-chain")


def test_a_truncated_data_file_gives_up_the_entries_its_pages_still_hold(tmp_path: Path) -> None:
    home, _ = _home(tmp_path)
    with AuditLog.open(home / "audit", readonly=True) as log:
        roots = {size: log.root_at(size) for size in range(1, ENTRIES + 1)}
    data = home / "audit" / "data.mdb"
    os.truncate(data, data.stat().st_size * 2 // 3)
    truncated = data.read_bytes()
    result = CLI.run(home, "audit", "rebuild")
    assert result.returncode == 0, result.stderr
    assert "damaged: file" in result.stdout
    assert "read from the pages the damaged data file still holds" in result.stdout
    assert "no agent state was kept (it could not be read)" in result.stderr
    ok(home, "audit", "verify-chain")
    with AuditLog.open(home / "audit", readonly=True) as log:
        entry = log.entry(log.size - 1)
        assert entry.kind == "AUDIT_REBUILT"
        intact = entry.data["intact"]
        assert 0 < intact <= ENTRIES
        assert entry.data["salvaged"] is True
        assert entry.data["lost"] == ENTRIES - intact
        assert log.root_at(intact) == roots[intact]
    assert (_aside(result.stdout, "previous") / "data.mdb").read_bytes() == truncated


def test_a_data_file_that_is_not_lmdb_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    home, _ = _home(tmp_path)
    data = home / "audit" / "data.mdb"
    data.write_bytes(b"\x00" * 3 * 4096)
    before = sorted(p.name for p in home.iterdir() if p.name != LOCK_NAME)
    result = fails(home, 3, "audit", "rebuild")
    assert "rebuild --from-peers" in result.stderr
    assert "nothing was changed" in result.stderr
    assert sorted(p.name for p in home.iterdir() if p.name != LOCK_NAME) == before
    assert data.read_bytes() == b"\x00" * 3 * 4096


@pytest.mark.parametrize("args", [["--log", "nowhere"], ["--bogus"]])
def test_bad_input_is_a_clear_error(tmp_path: Path, args: list[str]) -> None:
    home, _ = _home(tmp_path)
    result = CLI.run(home, "audit", "rebuild", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_a_restore_shorter_than_the_watermark_records_the_loss_and_the_agent_starts(
    tmp_path: Path,
) -> None:
    home, _ = _home(tmp_path)
    backup = tmp_path / "backup"
    with AuditLog.open(home / "audit", readonly=True) as log:
        root_128 = log.root_at(128)
    # A backup of the first 128 entries, as an older `talos audit backup` left it.
    shutil.copytree(home / "audit", tmp_path / "copy")
    with AuditLog.open(tmp_path / "copy", readonly=True) as log:
        entries = [entry.to_bytes() for entry in log.entries(0, 128)]
        blocks = [log.block(height) for height in range(2)]
    environment = Environment.open(backup)
    try:
        write_log(environment, entries, blocks=blocks)
    finally:
        environment.close()
    result = CLI.run(home, "audit", "restore", "--backup", str(backup))
    assert result.returncode == 0, result.stderr
    assert "restored 128 entries" in result.stdout
    assert f"the agent had {ENTRIES} entries; {ENTRIES - 128} are not in this backup" in (
        result.stderr
    )
    with AuditLog.open(home / "audit", readonly=True) as log:
        assert log.root_at(128) == root_128
        entry = log.entry(128)
        assert entry.kind == "LOG_RESTORED"
        assert entry.data["backup"] == "backup"
        assert (entry.data["backup_size"], entry.data["lost"]) == (128, ENTRIES - 128)
        assert entry.data["recorded_size"] == ENTRIES
        assert entry.data["replaced_size"] == ENTRIES
    ok(home, "audit", "verify-chain")
    with launched() as launcher:
        agent = launcher.agent(home, "--offline")
        assert agent.stop() == 0
