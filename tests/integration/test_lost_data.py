"""Lost data is refused, not accepted silently (issue 13, item 3).

Real homes, real LMDB files, real ``talos`` processes. A home whose agent
ran has a signed watermark (``watermark.cbor``); deleting the audit log,
putting back an older copy, emptying the capabilities store or deleting
``keylog.cbor`` makes ``talos run`` refuse with ``StateLost`` (exit 3) naming
the store and the recovery commands, ``diagnose --storage`` FAIL and
``verify-chain`` exit 3. ``talos audit accept-lost-state`` is the explicit,
audited way to start over.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.client import TalosClient
from talos.errors import StateLost
from talos.storage.home import AgentHome
from talos.storage.tokens import TokenStore
from talos.testing import SeededRng
from talos.testing.cli import CliResult, TalosCli
from talos.testing.processes import Launcher, launched

CLI = TalosCli()
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RECOVERY = (
    "talos recover --backup FILE",
    "talos audit restore --backup DIR",
    "talos audit rebuild",
    "talos audit accept-lost-state",
)


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    with launched() as started:
        yield started


def _append(home: Path, count: int) -> None:
    """``count`` signed entries, sealed into blocks, as the agent's log would hold."""
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")
    with AuditLog.open(home / "audit", signer=signer, block_entries=8) as log:
        log.append_many([("MESSAGE_SENT", {"n": n}, None) for n in range(count)])
        log.seal_block()


def _run_once(launcher: Launcher, home: Path) -> None:
    """Start the agent (it records what the stores hold) and stop it."""
    launcher.agent(home, "--offline").stop()


@pytest.fixture(scope="module")
def base_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose agent ran with 30 audit entries and a few capabilities records."""
    home = tmp_path_factory.mktemp("lost") / "alice"
    CLI.ok(home, "init", "--name", "alice", "--no-passphrase")
    rng = SeededRng(3)
    with TokenStore.open(home / "capabilities") as store:
        for n in range(5):
            store.add_granted(n.to_bytes(16, "big"), rng.bytes(100))
    _append(home, 30)
    with launched() as started:
        _run_once(started, home)
    return home


@pytest.fixture
def home(base_home: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "alice"
    shutil.copytree(base_home, copy)
    return copy


def _refused(home: Path) -> CliResult:
    result = CLI.fails(home, 3, "run", "--offline")
    assert "StateLost" in result.stderr
    assert "startup_refused" in result.stderr  # the operator's log event
    for command in RECOVERY:
        assert command in result.stderr
    return result


def _lost_finding(home: Path) -> dict[str, object]:
    report = json.loads(CLI.fails(home, 1, "diagnose", "--storage", "--json").stdout)
    (finding,) = [row for row in report["checks"]["storage"] if row["subject"] == "lost state"]
    assert finding["status"] == "fail"
    return finding


def test_a_deleted_audit_log_is_refused_everywhere(home: Path) -> None:
    data = home / "audit" / "data.mdb"
    data.unlink()

    result = _refused(home)
    assert f"audit log {data}" in result.stderr
    assert "the agent signed a checkpoint of 30 entries" in result.stderr, result.stderr
    assert "holds 0 entries" in result.stderr
    assert str(data) in str(_lost_finding(home)["detail"])
    chain = CLI.fails(home, 3, "audit", "verify-chain")
    assert "StateLost" in chain.stderr
    assert "intact" not in chain.stdout
    # Still refused the second time: the empty log the first attempt opened is no history.
    _refused(home)


def test_a_deleted_audit_log_before_any_start_attempt_fails_verify_chain(home: Path) -> None:
    shutil.rmtree(home / "audit")
    chain = CLI.fails(home, 3, "audit", "verify-chain", "--json")
    assert "StateLost" in chain.stderr
    assert "is missing" in chain.stderr


def test_an_older_copy_of_the_audit_log_is_refused(home: Path, launcher: Launcher) -> None:
    older = home.parent / "older-audit"
    shutil.copytree(home / "audit", older)
    _append(home, 20)
    _run_once(launcher, home)
    backup = home.parent / "backup"
    CLI.ok(home, "audit", "backup", "--out", str(backup))
    shutil.rmtree(home / "audit")
    shutil.copytree(older, home / "audit")

    result = _refused(home)
    assert "holds 30 entries and 4 blocks (an older or shorter copy)" in result.stderr
    assert "the agent signed a checkpoint of 50 entries" in result.stderr
    assert CLI.fails(home, 3, "audit", "verify-chain").stderr.count("StateLost") == 1
    _lost_finding(home)

    CLI.ok(home, "audit", "restore", "--backup", str(backup))  # the documented recovery
    launcher.agent(home, "--offline").stop()


def test_another_history_of_the_same_length_is_refused(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(home, other)
    shutil.rmtree(other / "audit")
    _append(other, 31)  # a different history, as long, signed by the same key
    shutil.rmtree(home / "audit")
    shutil.copytree(other / "audit", home / "audit")

    assert "is another history" in _refused(home).stderr


def test_an_emptied_capabilities_store_is_refused(home: Path) -> None:
    store = home / "capabilities"
    shutil.rmtree(store)
    TokenStore.open(store).close()  # an empty store in its place

    result = _refused(home)
    assert f"capabilities store {store / 'data.mdb'} is at generation 0" in result.stderr
    assert "generation 5 was recorded" in result.stderr
    assert "capabilities store" in str(_lost_finding(home)["detail"])


def test_a_deleted_key_log_is_refused_and_never_replaced_by_the_blocks_keys(home: Path) -> None:
    keylog = home / "keylog.cbor"
    keylog.unlink()

    result = _refused(home)
    assert f"key log {keylog} is missing" in result.stderr
    chain = CLI.fails(home, 3, "audit", "verify-chain", "--json")
    assert json.loads(chain.stdout)["signatures_checked_against"] == "key-file"
    assert f"key log {keylog} is missing" in chain.stderr
    assert "keys the blocks carry" not in chain.stdout + chain.stderr
    _lost_finding(home)


def test_a_deleted_key_log_with_a_passphrase_fails_without_it(tmp_path: Path) -> None:
    home = tmp_path / "carol"
    secret = {"TALOS_KEY_PASSPHRASE": "correct horse"}
    CLI.ok(home, "init", "--name", "carol", extra_env=secret)
    identity = AgentHome(home).load_identity(passphrase=b"correct horse")
    signer = LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")
    with AuditLog.open(home / "audit", signer=signer) as log:
        log.append("MESSAGE_SENT", {"n": 1})
        log.seal_block()
    (home / "keylog.cbor").unlink()

    chain = CLI.fails(home, 3, "audit", "verify-chain")
    assert "TALOS_KEY_PASSPHRASE" in chain.stderr
    assert "intact" not in chain.stdout
    with_key = CLI.fails(home, 3, "audit", "verify-chain", "--json", extra_env=secret)
    assert json.loads(with_key.stdout)["signatures_checked_against"] == "key-file"


def test_starting_over_is_explicit_and_audited(home: Path, launcher: Launcher) -> None:
    (home / "audit" / "data.mdb").unlink()
    shutil.rmtree(home / "capabilities")
    _refused(home)

    declined = CLI.fails(home, 1, "audit", "accept-lost-state")  # no terminal, no --yes
    assert "Aborted" in declined.stderr
    _refused(home)

    accepted = CLI.ok(home, "audit", "accept-lost-state", "--yes")
    assert "lost: audit log" in accepted
    assert "lost: capabilities store" in accepted
    launcher.agent(home, "--offline").stop()
    entries = json.loads(CLI.ok(home, "audit", "query", "--type", "STATE_LOSS_ACCEPTED", "--json"))
    (entry,) = entries
    assert entry["data"]["stores"] == ["audit log", "capabilities store"]
    assert entry["data"]["recorded"]["audit_size"] == 30
    assert entry["data"]["found"]["audit_size"] == 0
    assert CLI.ok(home, "audit", "accept-lost-state", "--yes").startswith("nothing lost")
    CLI.ok(home, "audit", "verify-chain")


def test_a_tampered_watermark_is_corruption(home: Path) -> None:
    watermark = home / "watermark.cbor"
    raw = bytearray(watermark.read_bytes())
    raw[-1] ^= 0x01  # the signature
    watermark.write_bytes(bytes(raw))

    result = CLI.fails(home, 3, "run", "--offline")
    assert f"watermark {watermark} signature does not verify" in result.stderr
    assert "StoreCorrupted" in result.stderr


def test_a_deleted_watermark_is_recreated_from_the_stores(home: Path, launcher: Launcher) -> None:
    (home / "watermark.cbor").unlink()
    agent = launcher.agent(home, "--offline")
    agent.stop()
    assert "watermark_created" in agent.log.read_text()
    assert (home / "watermark.cbor").exists()
    (home / "audit" / "data.mdb").unlink()
    _refused(home)  # and it protects again


def test_a_new_home_starts_and_restarts(tmp_path: Path, launcher: Launcher) -> None:
    home = tmp_path / "dave"
    CLI.ok(home, "init", "--name", "dave", "--no-passphrase")
    assert (home / "watermark.cbor").stat().st_mode & 0o777 == 0o600
    launcher.agent(home, "--offline").stop()
    launcher.agent(home, "--offline").stop()
    report = json.loads(CLI.ok(home, "diagnose", "--storage", "--json"))
    (finding,) = [row for row in report["checks"]["storage"] if row["subject"] == "lost state"]
    assert finding["status"] == "ok"


def test_the_golden_home_v1_still_opens(tmp_path: Path, launcher: Launcher) -> None:
    home = tmp_path / "golden"
    shutil.copytree(GOLDEN / "home-v1", home)
    (home / "identity.localkey").chmod(0o600)
    launcher.agent(home, "--offline").stop()
    assert (home / "watermark.cbor").exists()
    assert (home / "keylog.cbor").exists()  # written with the first watermark
    launcher.agent(home, "--offline").stop()


def test_the_library_refuses_too(home: Path) -> None:
    (home / "audit" / "data.mdb").unlink()

    async def start() -> None:
        async with TalosClient.create("alice", home=home, discovery=[], offline_mode=True):
            pass

    with pytest.raises(StateLost) as caught:
        asyncio.run(start())
    assert caught.value.where == str(home / "audit" / "data.mdb")
    assert caught.value.losses
