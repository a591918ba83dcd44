"""``talos anchor deploy`` against a real anvil, and every kind of bad input it meets."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from talos.audit.anchoring.contract import artifact
from talos.audit.anchoring.eth import Account
from talos.cli.exit_codes import EXIT_ANCHORING
from talos.testing.chain import DEV_KEYS, AnvilProcess
from talos.testing.cli import CliResult, TalosCli
from talos.testing.processes import free_port

CLI = TalosCli()


def _hex_key_file(tmp_path: Path, key: str = DEV_KEYS[0]) -> Path:
    path = tmp_path / "wallet.hex"
    path.write_text(key + "\n")
    return path


def _deploy_fails(code: int, url: str, key_file: str) -> CliResult:
    return CLI.fails(None, code, "anchor", "deploy", "--rpc", url, "--key-file", key_file)


def _runtime_code(anvil: AnvilProcess, address: str) -> bytes:
    return bytes.fromhex(anvil.rpc("eth_getCode", [address, "latest"])[2:])


def test_deploy_with_a_hex_key_prints_the_address_last(anvil: AnvilProcess, tmp_path: Path) -> None:
    out = CLI.ok(
        None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(_hex_key_file(tmp_path))
    )
    address = out.strip().splitlines()[-1]
    assert address.startswith("0x")
    assert len(address) == 42
    code = _runtime_code(anvil, address)
    assert code
    assert code in artifact().bytecode


def test_deploy_with_an_encrypted_keystore(anvil: AnvilProcess, tmp_path: Path) -> None:
    keystore = Account.encrypt(DEV_KEYS[1], "correct horse", kdf="scrypt", iterations=2**10)
    path = tmp_path / "wallet.json"
    path.write_text(json.dumps(keystore))
    args = ("anchor", "deploy", "--rpc", anvil.url, "--key-file", str(path))
    wrong = CLI.fails(None, 5, *args, extra_env={"TALOS_ANCHOR_PASSPHRASE": "wrong"})
    assert "WrongPassphrase" in wrong.stderr
    assert "correct horse" not in wrong.stderr + wrong.stdout
    missing = CLI.fails(None, EXIT_ANCHORING, *args)
    assert "TALOS_ANCHOR_PASSPHRASE" in missing.stderr
    out = CLI.ok(None, *args, extra_env={"TALOS_ANCHOR_PASSPHRASE": "correct horse"})
    assert _runtime_code(anvil, out.strip().splitlines()[-1])


def test_unreachable_rpc_is_a_clean_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = _deploy_fails(EXIT_ANCHORING, url, str(_hex_key_file(tmp_path)))
    assert "ChainUnavailable" in result.stderr
    assert "unreachable" in result.stderr
    assert DEV_KEYS[0][2:] not in result.stderr


@pytest.mark.parametrize("key", ["", "not a key", "0x" + "00" * 32, '{"crypto": 5}', "{nope"])
def test_bad_key_files_are_clean_errors(tmp_path: Path, key: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = _deploy_fails(EXIT_ANCHORING, url, str(_hex_key_file(tmp_path, key)))
    assert "AnchorKeyInvalid" in result.stderr


def test_missing_key_file_and_bad_url(tmp_path: Path) -> None:
    gone = _deploy_fails(EXIT_ANCHORING, "http://127.0.0.1:1", str(tmp_path / "none"))
    assert "cannot read key file" in gone.stderr
    bad = _deploy_fails(1, "ftp://x", str(_hex_key_file(tmp_path)))
    assert "is not an http" in bad.stderr


class _Garbage(BaseHTTPRequestHandler):
    """Answers every POST with what the test class says: not JSON-RPC."""

    body = b"<html>hello</html>"

    def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture(
    params=[b"<html>hello</html>", b'{"jsonrpc": "2.0", "id": 1, "result": "0xZZ"}', b"[1, 2]"]
)
def garbage_url(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = type("Handler", (_Garbage,), {"body": request.param})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_rpc_answering_garbage_is_a_clean_error(garbage_url: str, tmp_path: Path) -> None:
    result = _deploy_fails(EXIT_ANCHORING, garbage_url, str(_hex_key_file(tmp_path)))
    assert "not Ethereum JSON-RPC" in result.stderr


def test_an_unfunded_wallet_is_refused(anvil: AnvilProcess, tmp_path: Path) -> None:
    poor = Account.create()
    result = _deploy_fails(
        EXIT_ANCHORING,
        anvil.url,
        str(_hex_key_file(tmp_path, poor.key.hex())),
    )
    assert "AnchorRejected" in result.stderr or "RpcError" in result.stderr
    assert "funds" in result.stderr.lower()
