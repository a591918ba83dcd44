"""Damaged, full and private stores, in real processes on real LMDB files (issue 13).

* A capabilities store truncated below its committed pages is a named
  ``StoreCorrupted`` for every command that opens it, never a bus error.
* Damage to an LMDB internal page (a branch page) is exit 3 naming the file.
* A full disk (ENOSPC, or the EIO LMDB reports for a short write) is
  ``AuditFull`` with its hint and the ``audit_full`` event, on the receive
  path, the send path and the CLI.
* Every file Talos creates in a home, a backup or a restored log is 0600.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.core.crypto import SigningKey
from talos.errors import AuditFull
from talos.storage.home import AgentHome
from talos.storage.tokens import TokenStore
from talos.testing import FakeClock, SeededRng
from talos.testing.cli import CliResult, TalosCli
from talos.testing.processes import launched, registry_process
from talos.testing.waiting import wait_until

CLI = TalosCli()
ok, talos = CLI.ok, CLI.run
_PAGE = 4096


def _not_killed(result: CliResult) -> CliResult:
    assert result.returncode >= 0, (
        f"killed by {signal.Signals(-result.returncode).name}: {result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def base_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with an identity, a capabilities store of a few dozen pages, and an audit
    log deep enough to have branch pages; tests damage private copies of it."""
    home = tmp_path_factory.mktemp("storage") / "home"
    agent_id = ok(home, "init", "--name", "alice").strip()
    rng = SeededRng(13)
    with TokenStore.open(home / "capabilities") as store:
        for n in range(40):
            store.add_granted(n.to_bytes(16, "big"), rng.bytes(2000))
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, name=agent_id, origin=f"{agent_id}/audit")
    clock = FakeClock()
    with AuditLog.open(AgentHome(home).audit_path, signer=signer, clock=clock) as log:
        for n in range(600):
            log.append("MESSAGE_SENT", {"hash": rng.bytes(32), "n": n})
            clock.advance(1)
    return home


@pytest.fixture
def home(base_home: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(base_home, copy)
    return copy


@pytest.fixture
def truncated_capabilities(home: Path) -> Path:
    """The home, its capabilities store cut after its two meta pages."""
    data = home / "capabilities" / "data.mdb"
    assert data.stat().st_size > 2 * _PAGE
    os.truncate(data, 2 * _PAGE)
    return home


def test_capabilities_list_names_a_truncated_store(truncated_capabilities: Path) -> None:
    result = _not_killed(talos(truncated_capabilities, "capabilities", "list"))
    assert result.returncode == 3, result.stderr
    assert "StoreCorrupted" in result.stderr
    assert str(Path("capabilities") / "data.mdb") in result.stderr


def test_run_refuses_a_truncated_capabilities_store(truncated_capabilities: Path) -> None:
    result = _not_killed(talos(truncated_capabilities, "run", "--offline"))
    assert result.returncode == 3, result.stderr
    assert "StoreCorrupted" in result.stderr
    assert str(Path("capabilities") / "data.mdb") in result.stderr


def test_diagnose_reports_a_truncated_capabilities_store(truncated_capabilities: Path) -> None:
    """diagnose reports the damage as a FAIL line naming the file (its exit status for FAIL)."""
    result = _not_killed(talos(truncated_capabilities, "diagnose", "--storage"))
    assert result.returncode == 1, result.stdout + result.stderr
    fail = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert len(fail) == 1, result.stdout
    assert "token store" in fail[0]
    assert str(Path("capabilities") / "data.mdb") in fail[0]


# -- damage to an internal page ------------------------------------------------------------


def _branch_pages(data: Path) -> list[int]:
    """Page numbers of the LMDB branch pages in ``data`` (P_BRANCH in the page header)."""
    raw = data.read_bytes()
    pages = []
    for number in range(2, len(raw) // _PAGE):
        flags = struct.unpack_from("<H", raw, number * _PAGE + 10)[0]
        if flags & 0x01:
            pages.append(number)
    return pages


@pytest.mark.parametrize(
    "damage",
    [
        # The node area says it reaches past the page's free space: the read fails and
        # poisons the transaction, so the next read is MDB_BAD_TXN.
        pytest.param(
            lambda page, number: struct.pack_into("<HH", page, 12, 4000, 100), id="bounds"
        ),
        # Every child pointer points back at the page: MDB_CURSOR_FULL.
        pytest.param("self", id="self-pointing"),
        # Not a branch page any more: MDB_CORRUPTED.
        pytest.param(lambda page, number: struct.pack_into("<H", page, 10, 0x02), id="flags"),
    ],
)
def test_damage_to_a_branch_page_is_exit_3_naming_the_file(home: Path, damage: object) -> None:
    data = home / "audit" / "data.mdb"
    ok(home, "audit", "verify-chain")
    found = []
    for number in _branch_pages(data):
        with data.open("r+b") as handle:
            handle.seek(number * _PAGE)
            original = handle.read(_PAGE)
            page = bytearray(original)
            if damage == "self":
                lower = struct.unpack_from("<H", page, 12)[0]
                for slot in range(16, lower, 2):
                    node = struct.unpack_from("<H", page, slot)[0]
                    struct.pack_into("<HHH", page, node, number & 0xFFFF, number >> 16, 0)
            else:
                damage(page, number)  # type: ignore[operator]
            handle.seek(number * _PAGE)
            handle.write(page)
        result = _not_killed(talos(home, "audit", "verify-chain"))
        with data.open("r+b") as handle:
            handle.seek(number * _PAGE)
            handle.write(original)
        if result.returncode != 0:  # a free page (no longer in any tree) changes nothing
            found.append(number)
            assert result.returncode == 3, result.stderr
            assert str(data) in result.stderr or str(Path("audit") / "data.mdb") in result.stderr
            assert "StorageError" not in result.stderr, result.stderr
            break
    assert found, "no branch page in use was damaged"


# -- file modes ----------------------------------------------------------------------------


def test_every_file_talos_creates_is_0600(tmp_path: Path) -> None:
    home = tmp_path / "home"
    agent_id = ok(home, "init", "--name", "alice").strip()
    ok(home, "capabilities", "grant", "--to", agent_id, "--action", "message.send",
       "--resource", "inbox/*", "--expires-in", "1h")  # fmt: skip
    with launched() as launcher:
        agent = launcher.agent(home, "--offline")
        ok(home, "send", agent_id, "hello")
        agent.stop()
    ok(home, "backup", "--out", str(home / "identity.backup"),
       extra_env={"TALOS_PASSPHRASE": "a long enough passphrase"})  # fmt: skip
    backup = tmp_path / "audit-backup"
    ok(home, "audit", "backup", "--out", str(backup))
    ok(home, "audit", "restore", "--backup", str(backup))

    files = {}
    for root in (home, backup):
        for path in [root, *root.rglob("*")]:
            files[path] = stat.S_IMODE(path.lstat().st_mode)
    assert any(p.name == "data.mdb" and "capabilities" in p.parts for p in files)
    assert any(".replaced-" in str(p) for p in files)  # the restore moved the old log aside
    loose = {
        str(p): oct(mode) for p, mode in files.items() if mode != (0o700 if p.is_dir() else 0o600)
    }
    assert loose == {}


# -- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB file system (tmpfs), to fill up for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (CI runs these as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(  # noqa: S603 -- fixed arguments
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # noqa: S603, S607


def _fill(disk: Path, *, leave: int) -> Path:
    """Fill ``disk`` with one file until it is full, then give back ``leave`` bytes."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        chunk = bytes(1 << 16)
        while True:
            try:
                handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.mark.parametrize("leave", [0, 8192], ids=["ENOSPC", "short-write-EIO"])
def test_a_full_disk_is_audit_full_with_the_event(
    small_disk: Path, leave: int, caplog: pytest.LogCaptureFixture
) -> None:
    """No room at all gives LMDB ENOSPC; a little room gives it a short write, which
    LMDB reports as EIO: both are AuditFull, logged as audit_full, nothing lost."""
    key = SigningKey.generate(SeededRng(5))
    clock = FakeClock()
    path = small_disk / "audit"
    with AuditLog.open(path, signer=LogSigner(key, "t"), clock=clock) as log:
        log.append("MESSAGE_SENT", {"n": 0})
        _fill(small_disk, leave=leave)
        batch = [("MESSAGE_SENT", {"n": n, "hash": bytes(32)}, None) for n in range(3000)]
        with caplog.at_level(logging.WARNING, "talos.audit"), pytest.raises(AuditFull) as caught:
            log.append_many(batch)
    assert "free disk space" in caught.value.hint
    cause = str(caught.value.__cause__)
    assert ("Input/output error" if leave else "No space left") in cause
    assert [r for r in caplog.records if getattr(r, "event", None) == "audit_full"]
    with AuditLog.open(path, readonly=True) as log:
        assert log.size == 1
        assert log.verify_chain().ok


def test_the_receive_and_send_paths_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    """A receiver whose disk fills says AuditFull with its hint and the audit_full event,
    keeps running, and takes the message once there is room again (the sender retries);
    a sender whose disk is full refuses `talos send` with AuditFull and its hint."""
    alice_home, bob_home = tmp_path / "alice", small_disk / "bob"
    alice_id = ok(alice_home, "init", "--name", "alice").strip()
    bob_id = ok(bob_home, "init", "--name", "bob").strip()
    with registry_process(tmp_path / "registry") as registry, launched() as launcher:
        url = ["--registry", registry.url]
        bob = launcher.agent(bob_home, *url, "--accept", "open", "--log-format", "json")
        launcher.agent(alice_home, *url, "--accept", "open", "--reconnect-interval", "0.2")
        assert ok(alice_home, "send", bob_id, "warm-up", "--timeout", "10").startswith("delivered")
        filler = _fill(small_disk, leave=8192)
        big = "x" * 120_000  # needs new pages: the commit must grow the file
        queued = ok(alice_home, "send", bob_id, big, "--timeout", "1")
        assert queued.startswith("queued"), queued
        lines = wait_until(
            lambda: [
                json.loads(line)
                for line in bob.log.read_text().splitlines()
                if line.startswith("{") and "not committed" in line
            ],
            30,
            what="bob logs the uncommitted receive",
        )
        assert "AuditFull" in lines[0]["message"]
        assert "hint: free disk space" in lines[0]["message"]
        assert "audit_full" in bob.log.read_text()
        assert bob.child.running
        # The sender's disk is fine; bob's own CLI write path hits the full disk too.
        refused = talos(bob_home, "send", alice_id, big, "--timeout", "1")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "AuditFull" in refused.stderr
        assert "hint: free disk space" in refused.stderr
        filler.unlink()
        inbox = wait_until(
            lambda: [m for m in json.loads(ok(bob_home, "inbox", "--json")) if m["data"] == big],
            30,
            what="the message arrives once there is room",
        )
        assert len(inbox) == 1
