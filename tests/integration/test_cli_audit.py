"""`talos audit` in real processes on real LMDB logs: verify, query, prove, export, restore."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner, leaf_hash, verifier_key, verify_inclusion
from talos.core.crypto import SigningKey
from talos.storage.home import AgentHome
from talos.storage.lmdb import u64
from talos.storage.lock import LOCK_NAME  # the command held the home: not a change
from talos.testing import FakeClock, SeededRng
from talos.testing.cli import CliResult, TalosCli
from talos.testing.damage import flip_stored_bit

ENTRIES = 300
BLOCK_ENTRIES = 64

CLI = TalosCli()
ok, fails = CLI.ok, CLI.fails


def talos(home: Path, *args: str, env_extra: dict[str, str] | None = None) -> CliResult:
    return CLI.run(home, *args, extra_env=env_extra)


def _fill(log: AuditLog, clock: FakeClock, start: int, count: int) -> None:
    for i in range(start, start + count):
        kind = "SIGNATURE_FAILURE" if i % 3 == 0 else "MESSAGE_SENT"
        peer = f"peer{i % 4}" if i % 2 else None
        log.append(kind, {"hash": bytes([i % 256]) * 32, "n": i}, peer=peer)
        clock.advance(1)


@dataclass(frozen=True)
class World:
    """A home with an identity and its signed 300-entry log, plus a keyless home and log."""

    home: Path
    agent_id: str
    signer: LogSigner
    root: bytes
    empty_home: Path
    other_log: Path


START = 1_700_000_000.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("audit-cli")
    home = base / "home"
    agent_id = ok(home, "init", "--name", "alice").strip()
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, name=agent_id, origin=f"{agent_id}/audit")
    clock = FakeClock(START)
    with AuditLog.open(
        AgentHome(home).audit_path,
        signer=signer,
        clock=clock,
        block_entries=BLOCK_ENTRIES,
        block_seconds=1e6,  # blocks by count only, so their ranges are known
    ) as log:
        _fill(log, clock, 0, ENTRIES)
        root = log.root()
    other = base / "other-log"
    key = SigningKey.generate(SeededRng(7))
    with AuditLog.open(
        other, signer=LogSigner(key, "tester"), clock=FakeClock(START), block_entries=10
    ) as log:
        log.append_many([("MESSAGE_SENT", {"n": i}, None) for i in range(25)])
    empty = base / "empty-home"
    empty.mkdir()
    return World(home, agent_id, signer, root, empty, other)


@pytest.fixture
def home(world: World, tmp_path: Path) -> Path:
    """A private copy of the world's home, for tests that damage or replace its log."""
    copy = tmp_path / "home"
    shutil.copytree(world.home, copy)
    return copy


# -- verify-chain -------------------------------------------------------------------


def test_verify_chain_intact(world: World) -> None:
    out = ok(world.home, "audit", "verify-chain")
    assert f"{ENTRIES} entries, {ENTRIES // BLOCK_ENTRIES} blocks" in out
    assert f"root {world.root.hex()}" in out
    assert "this agent's public key log" in out
    report = json.loads(ok(world.home, "audit", "verify-chain", "--deep", "--json"))
    assert report["ok"] is True
    assert (report["entries"], report["root"]) == (ENTRIES, world.root.hex())
    assert report["signers"] == [world.signer.public_key.raw.hex()]
    assert report["signatures_checked_against"] == "key-log"


def test_verify_chain_without_a_key_log_says_so(world: World) -> None:
    out = ok(world.empty_home, "audit", "verify-chain", "--log", str(world.other_log))
    assert "25 entries, 2 blocks" in out
    assert "only against the keys the blocks carry" in out


def test_blocks_signed_by_a_key_outside_the_key_log_are_refused(world: World) -> None:
    result = fails(world.home, 3, "audit", "verify-chain", "--log", str(world.other_log))
    assert "height 0" in result.stderr
    assert "untrusted key" in result.stderr


@pytest.mark.parametrize(
    ("db", "key", "named"),
    [(b"entries", u64(123), "seq 123"), (b"blocks", u64(2), "height 2")],
)
def test_a_flipped_byte_is_found_with_its_position(
    home: Path, db: bytes, key: bytes, named: str
) -> None:
    flip_stored_bit(home / "audit", db, key, 40)
    result = fails(home, 3, "audit", "verify-chain")
    assert named in result.stderr
    assert "restore" in result.stderr  # the hint
    report = json.loads(fails(home, 3, "audit", "verify-chain", "--json").stdout)
    assert report["ok"] is False
    assert named in report["problem"]["text"]


def test_truncated_data_file_is_reported_cleanly(home: Path) -> None:
    data = home / "audit" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    result = fails(home, 3, "audit", "verify-chain")
    assert "data.mdb" in result.stderr
    assert "StoreCorrupted" in result.stderr
    assert fails(home, 3, "audit", "show", "1").stderr.startswith("error: StoreCorrupted")


def test_a_sigbus_in_the_scan_is_reported_and_the_parent_survives(
    home: Path, tmp_path: Path
) -> None:
    """Truncate the file after the library's pre-check passed, inside the scanning child.

    The child then touches pages past the end of the file and gets a real
    SIGBUS, the window the pre-check cannot close. The hook lives in a
    sitecustomize module on PYTHONPATH, which only the spawned child acts on;
    no production code knows about it.
    """
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if '--multiprocessing-fork' in sys.argv:\n"
        "    import talos.audit.integrity as log_module\n"
        "    checked = log_module.check_data_file\n"
        "    def check_then_truncate(path, **options):\n"
        "        info = checked(path, **options)\n"
        "        os.truncate(path, 8192)\n"
        "        return info\n"
        "    log_module.check_data_file = check_then_truncate\n"
    )
    result = talos(home, "audit", "verify-chain", env_extra={"PYTHONPATH": str(hooks)})
    assert result.returncode == 3, result.stderr
    assert "SIGBUS" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_scan_killed_by_another_signal_is_not_called_corruption(
    home: Path, tmp_path: Path
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "if '--multiprocessing-fork' in sys.argv:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = talos(home, "audit", "verify-chain", env_extra={"PYTHONPATH": str(hooks)})
    assert result.returncode == 1, result.stderr
    assert "stopped by SIGKILL; nothing was checked" in result.stderr


def test_missing_log_is_a_clear_error(world: World) -> None:
    for command in (["verify-chain"], ["log"], ["root"], ["backup", "--out", "x"]):
        result = fails(world.empty_home, 1, "audit", *command)
        assert "no audit log at" in result.stderr


# -- reading ------------------------------------------------------------------------------


def _seqs(out: str) -> list[int]:
    return [entry["seq"] for entry in json.loads(out)]


def test_query_by_type_peer_time_and_last(world: World) -> None:
    out = ok(world.home, "audit", "query", "--type", "SIGNATURE_FAILURE", "--last", "4", "--json")
    assert _seqs(out) == [288, 291, 294, 297]
    assert {entry["kind"] for entry in json.loads(out)} == {"SIGNATURE_FAILURE"}
    # Entry i was written at START + i seconds; --until is exclusive.
    since, until = "2023-11-14T22:15:00Z", str(int(START) + 120)  # seq 100 .. 119
    out = ok(world.home, "audit", "query", "--peer", "peer1", "--since", since, "--until", until)
    assert "peer1" in out
    out = ok(
        world.home,
        "audit",
        "query",
        "--peer",
        "peer1",
        "--since",
        since,
        "--until",
        until,
        "--json",
    )
    assert _seqs(out) == [101, 105, 109, 113, 117]
    table = ok(world.home, "audit", "query", "--type", "signature_failure", "--last", "2")
    assert "SIGNATURE_FAILURE" in table
    assert "297" in table
    assert "ISO-8601" in fails(world.home, 2, "audit", "query", "--since", "yesterday").stderr


def test_log_shows_the_most_recent_entries(world: World) -> None:
    assert _seqs(ok(world.home, "audit", "log", "--last", "3", "--json")) == [297, 298, 299]
    assert len(json.loads(ok(world.home, "audit", "log", "--json"))) == 20


def test_show_entry_leaf_and_sealing_block(world: World) -> None:
    shown = json.loads(ok(world.home, "audit", "show", "70", "--json"))
    assert shown["entry"]["seq"] == 70
    assert shown["entry"]["data"] == {"hash": "46" * 32, "n": 70}
    with AuditLog.open(world.home / "audit", readonly=True) as log:
        assert shown["leaf_hash"] == log.entry(70).leaf_hash().hex()
    block = shown["block"]
    assert (block["height"], block["first_seq"], block["last_seq"]) == (1, 64, 127)
    assert block["signature"] == "valid"
    assert json.loads(ok(world.home, "audit", "show", "299", "--json"))["block"] is None
    text = ok(world.home, "audit", "show", "70")
    assert "height 1, entries 64..127" in text
    assert "no audit entry" in fails(world.home, 1, "audit", "show", "300").stderr


def test_root_now_and_at_a_height(world: World) -> None:
    assert ok(world.home, "audit", "root").splitlines() == [
        f"size {ENTRIES}",
        f"root {world.root.hex()}",
    ]
    sealed = json.loads(ok(world.home, "audit", "root", "--height", "2", "--json"))
    with AuditLog.open(world.home / "audit", readonly=True) as log:
        assert sealed["root"] == log.root_at(3 * BLOCK_ENTRIES).hex()
    assert sealed["size"] == 3 * BLOCK_ENTRIES


# -- export ---------------------------------------------------------------------------------


def test_export_json_with_proofs_verifies(world: World, tmp_path: Path) -> None:
    out = tmp_path / "export.json"
    ok(world.home, "audit", "export", "--format", "json", "--include-proofs", "--out", str(out))
    exported = json.loads(out.read_text())
    assert (exported["tree_size"], exported["root"]) == (ENTRIES, world.root.hex())
    entries = exported["entries"]
    assert [entry["seq"] for entry in entries] == list(range(ENTRIES))
    for entry in entries:
        leaf = leaf_hash(bytes.fromhex(entry["cbor"]))
        assert leaf.hex() == entry["leaf_hash"] == entry["proof"]["leaf_hash"]
        proof = entry["proof"]
        verify_inclusion(
            leaf,
            proof["leaf_index"],
            proof["tree_size"],
            [bytes.fromhex(item) for item in proof["hashes"]],
            world.root,
        )


def test_export_csv_with_and_without_proofs(world: World) -> None:
    rows = list(csv.DictReader(io.StringIO(ok(world.home, "audit", "export", "--format", "csv"))))
    assert len(rows) == ENTRIES
    assert "proof_hashes" not in rows[0]
    assert json.loads(rows[7]["data"]) == {"hash": "07" * 32, "n": 7}
    out = ok(world.home, "audit", "export", "--format", "csv", "--include-proofs")
    for row in csv.DictReader(io.StringIO(out)):
        hashes = [bytes.fromhex(item) for item in row["proof_hashes"].split(";") if item]
        assert row["root"] == world.root.hex()
        verify_inclusion(
            bytes.fromhex(row["leaf_hash"]),
            int(row["seq"]),
            int(row["tree_size"]),
            hashes,
            world.root,
        )


# -- proofs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proof_file(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("proof") / "proof.json"
    out = ok(world.home, "audit", "prove", "17", "--out", str(path))
    assert f"checkpoint signed by {world.agent_id}" in out
    return path


def test_prove_writes_the_documented_format(proof_file: Path, world: World) -> None:
    proof = json.loads(proof_file.read_text())
    assert set(proof) == {"leaf_index", "tree_size", "leaf_hash", "hashes", "checkpoint"}
    assert (proof["leaf_index"], proof["tree_size"]) == (17, ENTRIES)
    assert proof["checkpoint"].startswith(f"{world.agent_id}/audit\n{ENTRIES}\n")


def test_prove_signs_a_checkpoint_only_for_the_homes_own_log(world: World, tmp_path: Path) -> None:
    log = ["--log", str(world.home / "audit")]
    ok(world.home, "audit", "prove", "3", "--out", str(tmp_path / "a.json"), *log)
    assert "checkpoint" not in json.loads((tmp_path / "a.json").read_text())
    ok(world.home, "audit", "prove", "3", "--out", str(tmp_path / "b.json"), "--checkpoint", *log)
    assert "checkpoint" in json.loads((tmp_path / "b.json").read_text())
    ok(world.home, "audit", "prove", "3", "--out", str(tmp_path / "c.json"), "--no-checkpoint")
    assert "checkpoint" not in json.loads((tmp_path / "c.json").read_text())


def test_verify_proof_against_a_root_or_the_signed_checkpoint(
    proof_file: Path, world: World
) -> None:
    root = world.root.hex()
    for given in (root, "0x" + root, root.upper()):
        assert "valid: entry 17" in ok(
            world.empty_home, "audit", "verify-proof", "--proof", str(proof_file), "--root", given
        )
    # No --root: the checkpoint's root, its signature checked against the home's key log ...
    out = ok(world.home, "audit", "verify-proof", "--proof", str(proof_file))
    assert f"checkpoint signed by {world.agent_id}" in out
    # ... or against a verifier key given on the command line; no log needed either way.
    key = verifier_key(world.agent_id, world.signer.public_key)
    verdict = json.loads(
        ok(
            world.empty_home,
            "audit",
            "verify-proof",
            "--proof",
            str(proof_file),
            "--verifier-key",
            key,
            "--json",
        )
    )
    assert verdict["valid"] is True
    assert verdict["checkpoint"] == "verified"
    assert verdict["root"] == root
    # Without --root and without a trusted key, the checkpoint proves nothing: refused.
    result = fails(world.empty_home, 1, "audit", "verify-proof", "--proof", str(proof_file))
    assert "no trusted key" in result.stderr


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_verify_proof_rejects_damage_with_a_reason(
    proof_file: Path, world: World, tmp_path: Path
) -> None:
    good = json.loads(proof_file.read_text())
    wrong_root = "ab" * 32

    def reason(path: Path, *extra: str) -> str:
        args = ["audit", "verify-proof", "--proof", str(path), *extra]
        return fails(world.home, 1, *args).stderr

    assert "wrong root" in reason(proof_file, "--root", wrong_root)

    flipped = dict(good, hashes=list(good["hashes"]))
    digit = flipped["hashes"][2]
    flipped["hashes"][2] = ("0" if digit[0] != "0" else "1") + digit[1:]
    assert "corrupted proof" in reason(_write(tmp_path / "flipped.json", flipped))
    assert "corrupted proof" in reason(
        _write(tmp_path / "flipped.json", flipped), "--root", world.root.hex()
    )

    bare = {k: v for k, v in good.items() if k != "checkpoint"}
    assert "does not lead to root" in reason(
        _write(tmp_path / "bare.json", bare), "--root", "00" * 32
    )
    assert "hashes, expected" in reason(
        _write(tmp_path / "short.json", dict(bare, hashes=bare["hashes"][:-1])),
        "--root",
        world.root.hex(),
    )

    lines = good["checkpoint"].split("\n")
    lines[2] = base64.b64encode(bytes(32)).decode()  # another root under the same signature
    tampered = dict(good, checkpoint="\n".join(lines))
    assert "bad checkpoint signature" in reason(_write(tmp_path / "forged.json", tampered))

    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xffnot json at all")
    assert "not JSON" in reason(garbage, "--root", world.root.hex())
    missing = _write(tmp_path / "missing.json", {"leaf_index": 1})
    assert "malformed proof file" in reason(missing, "--root", world.root.hex())
    usage = fails(
        world.home, 2, "audit", "verify-proof", "--proof", str(proof_file), "--root", "xyz"
    )
    assert "64 hex digits" in usage.stderr


# -- backup and restore ---------------------------------------------------------------------


def test_backup_and_restore_round_trip(home: Path, world: World, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    out = ok(home, "audit", "backup", "--out", str(backup))
    assert f"backup of {ENTRIES} entries" in out
    assert world.root.hex() in out
    clock = FakeClock(START + 10_000)
    with AuditLog.open(home / "audit", signer=world.signer, clock=clock) as log:
        _fill(log, clock, ENTRIES, 10)
    out = ok(home, "audit", "restore", "--backup", str(backup))
    assert f"restored {ENTRIES} entries" in out
    aside = Path(out.split("previous log kept at ", 1)[1].splitlines()[0].strip())
    assert aside.is_dir()
    with AuditLog.open(aside, readonly=True) as old:
        assert old.size == ENTRIES + 10
    with AuditLog.open(home / "audit", readonly=True) as restored:
        assert restored.root_at(ENTRIES) == world.root
        assert restored.entry(ENTRIES).kind == "LOG_RESTORED"
        assert restored.entry(ENTRIES).data["replaced_size"] == ENTRIES + 10
    ok(home, "audit", "verify-chain")


def test_restore_refuses_a_damaged_backup(home: Path, world: World, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    ok(home, "audit", "backup", "--out", str(backup))
    flip_stored_bit(backup, b"entries", u64(200), 50)
    (backup / "lock.mdb").unlink(missing_ok=True)
    before = sorted(p.name for p in home.iterdir() if p.name != LOCK_NAME)
    result = fails(home, 5, "audit", "restore", "--backup", str(backup))
    assert "BackupInvalid" in result.stderr
    assert "seq 200" in result.stderr
    assert sorted(p.name for p in home.iterdir() if p.name != LOCK_NAME) == before
    assert f"root {world.root.hex()}" in ok(home, "audit", "root")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        "no audit log backup" in fails(home, 5, "audit", "restore", "--backup", str(empty)).stderr
    )
