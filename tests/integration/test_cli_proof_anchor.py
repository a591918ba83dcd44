"""``talos audit prove`` with an anchor, and ``verify-proof --rpc/--root`` against a real anvil.

An agent anchors its log on anvil; its proof files then carry the anchor, and
an auditor checks them with nothing but the file, the agent's key log (the
home) and the RPC URL. Bad input is a clean error with its exit code.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from talos.audit.anchoring.contract import anchor_calldata
from talos.cli.exit_codes import EXIT_ANCHOR_MISMATCH, EXIT_ANCHORING
from talos.testing.chain import DEV_KEYS, AnvilProcess, start_anvil
from talos.testing.cli import TalosCli
from talos.testing.processes import launched
from talos.testing.waiting import wait_until

CLI = TalosCli()
#: anvil's second dev account (unlocked: eth_sendTransaction signs for it).
STRANGER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


@dataclass
class Anchored:
    anvil: AnvilProcess
    home: Path
    contract: str
    proof: Path
    document: dict[str, Any]


def _final(home: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(CLI.ok(home, "audit", "anchors", "--json"))
    return [row for row in rows if row["state"] == "final"]


def _final_or_mine(home: Path, anvil: AnvilProcess) -> list[dict[str, object]]:
    """The final anchors; none yet: mine a block towards the confirmations."""
    found = _final(home)
    if not found:
        anvil.mine(1)
    return found


@pytest.fixture(scope="module")
def anchored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anchored]:
    """An agent's log anchored once, grown past the anchor, and a proof of entry 0.

    One for the module (an agent anchoring takes seconds); the tests only
    read it, or add other wallets' anchors to the chain.
    """
    tmp_path = tmp_path_factory.mktemp("anchored")
    anvil = start_anvil(tmp_path / "anvil.log")
    try:
        yield _anchored_home(anvil, tmp_path)
    finally:
        anvil.stop()


def _anchored_home(anvil: AnvilProcess, tmp_path: Path) -> Anchored:
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[2])
    deployed = CLI.ok(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(key_file))
    contract = deployed.strip().splitlines()[-1]
    home = tmp_path / "prover"
    agent_id = CLI.ok(home, "init", "--name", "prover").strip().splitlines()[-1]
    CLI.ok(home, "capabilities", "grant", "--to", agent_id, "--action", "message.send",
           "--expires-in", "1h")  # fmt: skip
    with launched() as launcher:
        agent = launcher.agent(home, "--offline", "--anchor-rpc", anvil.url,
                               "--anchor-contract", contract,
                               "--anchor-key-file", str(key_file), "--anchor-interval", "60",
                               "--anchor-confirmations", "2")  # fmt: skip
        wait_until(lambda: _final_or_mine(home, anvil), 30.0, what="anchored")
        assert agent.stop() == 0
    proof = tmp_path / "proof.json"
    CLI.ok(home, "audit", "prove", "0", "--out", str(proof))
    return Anchored(anvil, home, contract, proof, json.loads(proof.read_text()))


def _verify(fixture: Anchored, *args: str) -> dict[str, Any]:
    out = CLI.ok(fixture.home, "audit", "verify-proof", "--proof", str(fixture.proof), "--json",
                 *args)  # fmt: skip
    verdict: dict[str, Any] = json.loads(out)
    return verdict


def _rewrite(fixture: Anchored, path: Path, **anchor: object) -> Path:
    path.write_text(json.dumps({**fixture.document, "anchor": {**fixture.document["anchor"],
                                                               **anchor}}))  # fmt: skip
    return path


def test_a_proof_carries_its_anchor_and_verifies_on_chain(anchored: Anchored) -> None:
    anchor = anchored.document["anchor"]
    [final] = _final(anchored.home)
    assert (anchor["tree_size"], anchor["root"]) == (final["tree_size"], final["root"])
    assert anchor["tx"] == "0x" + str(final["tx"])
    assert anchor["contract"] == anchored.contract.lower()
    # The log grew past the anchor (its AUDIT_ANCHORED entry): a consistency step.
    assert anchored.document["tree_size"] > anchor["tree_size"]
    assert anchor["consistency"]["proof_root"]

    on_chain = _verify(anchored, "--rpc", anchored.anvil.url)
    assert (on_chain["valid"], on_chain["anchor"], on_chain["checkpoint"]) == (
        True, "chain", "verified",
    )  # fmt: skip
    assert on_chain["anchored"]["submitter"].lower() == _address(DEV_KEYS[2]).lower()
    text = CLI.ok(anchored.home, "audit", "verify-proof", "--proof", str(anchored.proof),
                  "--rpc", anchored.anvil.url)  # fmt: skip
    assert "anchored on chain" in text
    # The seed's spelling: the anchored root, 0x-prefixed, read off the chain.
    by_root = _verify(anchored, "--root", "0x" + anchor["root"])
    assert by_root["anchor"] == "root"


def _address(key: str) -> str:
    from talos.audit.anchoring.eth import Account

    return str(Account.from_key(key).address)


def test_an_entry_newer_than_every_anchor_has_none(anchored: Anchored, tmp_path: Path) -> None:
    newest = anchored.document["tree_size"] - 1
    path = tmp_path / "late.json"
    out = CLI.ok(anchored.home, "audit", "prove", str(newest), "--out", str(path))
    assert "not anchored yet" in out
    assert "anchor" not in json.loads(path.read_text())
    result = CLI.fails(anchored.home, 1, "audit", "verify-proof", "--proof", str(path),
                       "--rpc", anchored.anvil.url)  # fmt: skip
    assert "carries no anchor" in result.stderr


def test_a_wrong_root_is_exit_1(anchored: Anchored) -> None:
    result = CLI.fails(anchored.home, 1, "audit", "verify-proof", "--proof", str(anchored.proof),
                       "--root", "0x" + "11" * 32)  # fmt: skip
    assert "wrong root" in result.stderr
    assert "Traceback" not in result.stderr


def _send_anchor(anvil: AnvilProcess, contract: str, log: bytes, size: int, root: bytes) -> str:
    tx = anvil.rpc(
        "eth_sendTransaction",
        [{"from": STRANGER, "to": contract, "data": "0x" + anchor_calldata(log, size, root).hex()}],
    )
    anvil.wait_mined(bytes.fromhex(tx[2:]), 10.0)
    return str(tx)


def _pointing_at(anchored: Anchored, path: Path, tx: str) -> Path:
    receipt = anchored.anvil.rpc("eth_getTransactionReceipt", [tx])
    return _rewrite(anchored, path, tx=tx, block_number=int(receipt["blockNumber"], 16),
                    block_hash=receipt["blockHash"])  # fmt: skip


def test_an_anchor_of_another_log_is_an_anchor_mismatch(anchored: Anchored, tmp_path: Path) -> None:
    anchor = anchored.document["anchor"]
    root = bytes.fromhex(anchor["root"])
    tx = _send_anchor(anchored.anvil, anchored.contract, b"\x77" * 32, anchor["tree_size"], root)
    path = _pointing_at(anchored, tmp_path / "other-log.json", tx)
    result = CLI.fails(anchored.home, EXIT_ANCHOR_MISMATCH, "audit", "verify-proof", "--proof",
                       str(path), "--rpc", anchored.anvil.url)  # fmt: skip
    assert "AnchorMismatch" in result.stderr
    assert "another log" in result.stderr


def test_an_anchor_the_chain_holds_with_another_root_is_an_anchor_mismatch(
    anchored: Anchored, tmp_path: Path
) -> None:
    anchor = anchored.document["anchor"]
    log_id = bytes.fromhex(anchor["log_id"][2:])
    tx = _send_anchor(anchored.anvil, anchored.contract, log_id, anchor["tree_size"], b"\x66" * 32)
    path = _pointing_at(anchored, tmp_path / "other-root.json", tx)
    result = CLI.fails(anchored.home, EXIT_ANCHOR_MISMATCH, "audit", "verify-proof", "--proof",
                       str(path), "--rpc", anchored.anvil.url, "--json")  # fmt: skip
    assert json.loads(result.stdout)["reason"] == "AnchorMismatch"
    assert "the proof file claims" in result.stderr


def test_an_anchor_in_a_block_the_chain_does_not_have_is_an_anchor_mismatch(
    anchored: Anchored, tmp_path: Path
) -> None:
    path = _rewrite(anchored, tmp_path / "no-block.json", block_hash="0x" + "55" * 32)
    result = CLI.fails(anchored.home, EXIT_ANCHOR_MISMATCH, "audit", "verify-proof", "--proof",
                       str(path), "--rpc", anchored.anvil.url)  # fmt: skip
    assert "not on this chain" in result.stderr


def test_an_rpc_that_does_not_answer_is_exit_7(anchored: Anchored) -> None:
    result = CLI.fails(anchored.home, EXIT_ANCHORING, "audit", "verify-proof", "--proof",
                       str(anchored.proof), "--rpc", "http://127.0.0.1:1")  # fmt: skip
    assert "ChainUnavailable" in result.stderr
    assert "Traceback" not in result.stderr
    result = CLI.fails(anchored.home, 1, "audit", "verify-proof", "--proof", str(anchored.proof),
                       "--rpc", "ftp://example.org")  # fmt: skip
    assert "not an http" in result.stderr


class _Garbage(BaseHTTPRequestHandler):
    """Answers every POST with a JSON-RPC reply whose result is not a quantity."""

    def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = b'{"jsonrpc": "2.0", "id": 1, "result": {"not": "a chain id"}}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def garbage_rpc() -> Iterator[str]:
    """The URL of an endpoint that answers every call with garbage (:class:`_Garbage`)."""
    server = HTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_rpc_answering_garbage_is_exit_7(anchored: Anchored, garbage_rpc: str) -> None:
    result = CLI.fails(anchored.home, EXIT_ANCHORING, "audit", "verify-proof", "--proof",
                       str(anchored.proof), "--rpc", garbage_rpc, "--json")  # fmt: skip
    assert json.loads(result.stdout)["reason"] == "ChainUnavailable"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"leaf_index": 0}', b"[]"],
)
def test_a_malformed_proof_file_is_exit_1(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    result = CLI.fails(None, 1, "audit", "verify-proof", "--proof", str(path),
                       "--rpc", "http://127.0.0.1:1")  # fmt: skip
    assert "malformed proof file" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_malformed_anchor_is_exit_1(anchored: Anchored, tmp_path: Path) -> None:
    path = _rewrite(anchored, tmp_path / "bad-anchor.json", tx="0x12")
    result = CLI.fails(anchored.home, 1, "audit", "verify-proof", "--proof", str(path),
                       "--rpc", anchored.anvil.url)  # fmt: skip
    assert "anchor.tx must be 32 bytes" in result.stderr


# -- verify-anchors: the log's own wallet, other wallets, an auditor without the log -------

#: The agent's anchoring wallet in the fixture (DEV_KEYS[2], unlocked in anvil).
WALLET = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"


@pytest.fixture
def restored(anchored: Anchored) -> Iterator[Anchored]:
    """The module's chain, put back as it was after the test (it forges the wallet's anchors)."""
    snapshot = anchored.anvil.rpc("evm_snapshot")
    try:
        yield anchored
    finally:
        anchored.anvil.rpc("evm_revert", [snapshot])


def _forge(anchored: Anchored, size: int, root: bytes, sender: str = WALLET) -> None:
    log_id = bytes.fromhex(anchored.document["anchor"]["log_id"][2:])
    call = "0x" + anchor_calldata(log_id, size, root).hex()
    tx = anchored.anvil.rpc(
        "eth_sendTransaction", [{"from": sender, "to": anchored.contract, "data": call}]
    )
    wait_until(lambda: anchored.anvil.rpc("eth_getTransactionReceipt", [tx]), 10.0, what="mined")


def _checks(anchored: Anchored, *args: str, home: Path | None = None) -> list[dict[str, Any]]:
    out = CLI.ok(home, "audit", "verify-anchors", "--rpc", anchored.anvil.url, "--json", *args)
    found: list[dict[str, Any]] = json.loads(out)
    return found


def _own(checks: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(c["verdict"], c["tree_size"]) for c in checks if c["verdict"] != "foreign"]


def test_an_auditor_without_the_log_names_it_by_id_agent_key_log_or_proof(
    anchored: Anchored,
) -> None:
    size = anchored.document["anchor"]["tree_size"]
    log_id = anchored.document["anchor"]["log_id"]
    agent_id = re.search(r"did:talos:\w+", CLI.ok(anchored.home, "whoami"))
    assert agent_id
    keylog = anchored.home / "keylog.cbor"
    where = ("--wallet", WALLET, "--contract", anchored.contract)
    for args in (
        ("--log-id", log_id, *where),
        ("--log-id", agent_id.group(0), *where),
        ("--log-id", str(keylog), *where),
        ("--log-id", str(anchored.proof), "--wallet", WALLET),  # the contract from its anchor
    ):
        checks = _checks(anchored, *args)
        assert _own(checks) == [("ok", size)], args
    own = _checks(anchored, *where, home=anchored.home)  # the home's log, --wallet/--contract
    [check] = [c for c in own if c["verdict"] == "ok"]
    assert check["agrees"] is True


def test_a_split_view_by_the_log_s_wallet_is_exit_8_with_or_without_the_log(
    restored: Anchored,
) -> None:
    size = restored.document["anchor"]["tree_size"]
    _forge(restored, size, b"\x66" * 32)
    result = CLI.fails(restored.home, EXIT_ANCHOR_MISMATCH, "audit", "verify-anchors",
                       "--rpc", restored.anvil.url)  # fmt: skip
    assert "mismatch" in result.stdout
    assert "split view" in result.stderr
    result = CLI.fails(None, EXIT_ANCHOR_MISMATCH, "audit", "verify-anchors", "--rpc",
                       restored.anvil.url, "--log-id", restored.document["anchor"]["log_id"],
                       "--wallet", WALLET, "--contract", restored.contract)  # fmt: skip
    assert f"anchored 2 roots for size {size}" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_anchor_against_the_proof_file_s_roots_is_exit_8(restored: Anchored) -> None:
    checkpoint_size = restored.document["tree_size"]
    _forge(restored, checkpoint_size, b"\x66" * 32)  # the only anchor at that size
    result = CLI.fails(None, EXIT_ANCHOR_MISMATCH, "audit", "verify-anchors", "--rpc",
                       restored.anvil.url, "--log-id", str(restored.proof),
                       "--wallet", WALLET)  # fmt: skip
    assert "not the one the proof file gives" in result.stderr


def test_only_the_named_wallet_counts(restored: Anchored) -> None:
    size = restored.document["anchor"]["tree_size"]
    _forge(restored, size, b"\x66" * 32, sender=STRANGER)
    checks = _checks(restored, home=restored.home)
    assert ("ok", size) in _own(checks)
    assert [c["agrees"] for c in checks if c["verdict"] == "foreign"][-1] is False
    # Named, the stranger's wallet is the one that counts: its false root is a mismatch.
    result = CLI.fails(restored.home, EXIT_ANCHOR_MISMATCH, "audit", "verify-anchors",
                       "--rpc", restored.anvil.url, "--wallet", STRANGER)  # fmt: skip
    assert f"foreign  size {size}" in result.stdout  # the agent's own, now another wallet's


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--log-id", "0x" + "ab" * 32), "--log-id needs --wallet"),
        (("--log-id", "not a log"), "no log id, agent id or file"),
        (("--contract", WALLET), "does not hold the TalosAnchor contract"),
        (("--wallet", "0x1234"), "address"),
    ],
)
def test_verify_anchors_bad_input_is_a_clean_error(
    anchored: Anchored, args: tuple[str, ...], message: str
) -> None:
    result = CLI.fails(anchored.home, 1, "audit", "verify-anchors", "--rpc", anchored.anvil.url,
                       *args)  # fmt: skip
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_proof_whose_contract_is_not_talos_anchor_is_an_anchor_mismatch(
    restored: Anchored,
) -> None:
    # Another contract can emit the very same event, naming any submitter.
    restored.anvil.rpc("anvil_setCode", [restored.contract, "0x6000"])
    result = CLI.fails(restored.home, EXIT_ANCHOR_MISMATCH, "audit", "verify-proof", "--proof",
                       str(restored.proof), "--rpc", restored.anvil.url)  # fmt: skip
    assert "does not hold the TalosAnchor contract" in result.stderr


def test_verify_anchors_on_an_rpc_answering_garbage_is_exit_7(
    anchored: Anchored, garbage_rpc: str
) -> None:
    result = CLI.fails(anchored.home, EXIT_ANCHORING, "audit", "verify-anchors",
                       "--rpc", garbage_rpc)  # fmt: skip
    assert "ChainUnavailable" in result.stderr
    assert "Traceback" not in result.stderr
