"""A real local EVM chain for tests: anvil on a random loopback port, and solcjs.

Both come from npm into the project-local ``.tools/`` folder
(``.ci/install-anvil.sh``, run by ``make pytest``); ``ANVIL=/path/to/anvil``
and ``SOLCJS=/path/to/solcjs`` override where they are looked for. A missing
tool is an error that says how to install it, never a skipped test.

* :func:`start_anvil` starts ``anvil`` (optionally with ``--state FILE``, which
  loads the chain from the file at start and writes it back when anvil stops
  on SIGTERM), waits until it listens, and returns an :class:`AnvilProcess`
  whose :meth:`~AnvilProcess.rpc` sends raw JSON-RPC calls (``anvil_mine``,
  ``anvil_reorg``, ``evm_snapshot``) for tests that move the chain, and
  :meth:`~AnvilProcess.wait_mined` waits for a transaction a test sent itself;
* :data:`DEV_KEYS` are anvil's well-known funded development accounts (public
  knowledge: never use them on a real chain);
* :func:`compile_contract` compiles Solidity with the pinned solcjs, the way
  ``contracts/build.py`` made the committed ABI and bytecode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from talos.testing.child import ChildFailed, ChildProcess, stop_all
from talos.testing.waiting import wait_until

__all__ = [
    "DEV_KEYS",
    "SOLC_SETTINGS",
    "AnvilProcess",
    "ToolMissing",
    "anvil_binary",
    "compile_contract",
    "solcjs_binary",
    "start_anvil",
]

#: Private keys of anvil's first development accounts (its default test mnemonic).
DEV_KEYS: Final = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
)

#: The compiler settings of the committed contract (``contracts/build.py``).
SOLC_SETTINGS: Final[Mapping[str, Any]] = {
    "optimizer": {"enabled": True, "runs": 200},
    # Paris: no PUSH0, so the bytecode deploys on chains that lag behind mainnet.
    "evmVersion": "paris",
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
}

_LISTENING = re.compile(r"Listening on (127\.0\.0\.1):(\d+)")
_INSTALL_HINT = "run `make anvil` (bash .ci/install-anvil.sh) to install it into .tools/"


class ToolMissing(RuntimeError):
    """anvil or solcjs is not installed where the tests look for it."""


def _tools_dirs() -> list[Path]:
    """``.tools/node_modules`` of the checkout this module lives in, then of the cwd."""
    here = Path(__file__).resolve()
    candidates = [parent / ".tools" / "node_modules" for parent in here.parents]
    candidates.append(Path.cwd() / ".tools" / "node_modules")
    return [path for path in candidates if path.is_dir()]


def anvil_binary() -> Path:
    """The anvil executable: ``$ANVIL``, the npm platform package in .tools/, or PATH.

    Raises:
        ToolMissing: none found.
    """
    if os.environ.get("ANVIL"):
        return Path(os.environ["ANVIL"])
    for tools in _tools_dirs():
        found = sorted(tools.glob("@foundry-rs/anvil-*/bin/anvil"))
        if found:
            return found[0]
    on_path = shutil.which("anvil")
    if on_path:
        return Path(on_path)
    raise ToolMissing(f"anvil not found; {_INSTALL_HINT}")


def solcjs_binary() -> Path:
    """The solcjs script: ``$SOLCJS`` or ``.tools/node_modules/.bin/solcjs``.

    Raises:
        ToolMissing: not found.
    """
    if os.environ.get("SOLCJS"):
        return Path(os.environ["SOLCJS"])
    for tools in _tools_dirs():
        script = tools / ".bin" / "solcjs"
        if script.exists():
            return script
    raise ToolMissing(f"solcjs not found; {_INSTALL_HINT}")


def compile_contract(source: str, file_name: str, contract: str) -> dict[str, Any]:
    """Compile ``source`` with solcjs (standard JSON, :data:`SOLC_SETTINGS`).

    Returns ``{"abi": [...], "bytecode": "0x...", "compiler": "0.8.28+commit..."}``.

    Raises:
        ToolMissing: solcjs is not installed.
        RuntimeError: the compiler reported an error.
    """
    request = {
        "language": "Solidity",
        "sources": {file_name: {"content": source}},
        "settings": SOLC_SETTINGS,
    }
    solcjs = str(solcjs_binary())
    done = subprocess.run(  # noqa: S603 -- the pinned compiler from .tools
        [solcjs, "--standard-json"],
        input=json.dumps(request).encode(),
        capture_output=True,
        check=True,
        timeout=120,
    )
    text = done.stdout.decode()
    # solcjs prints a note about SMT solvers on stdout before the JSON.
    output = json.loads(text[text.index("{") :])
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise RuntimeError("\n".join(e.get("formattedMessage", str(e)) for e in errors))
    compiled = output["contracts"][file_name][contract]
    version = subprocess.run(  # noqa: S603 -- same compiler
        [solcjs, "--version"], capture_output=True, check=True, timeout=60
    )
    return {
        "abi": compiled["abi"],
        "bytecode": "0x" + compiled["evm"]["bytecode"]["object"],
        "compiler": version.stdout.decode().strip(),
    }


@dataclass
class AnvilProcess:
    """A running anvil: its JSON-RPC URL, and raw calls to move its chain."""

    child: ChildProcess
    url: str
    port: int
    state: Path | None = None

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        """One JSON-RPC call; returns ``result``.

        Raises:
            RuntimeError: the node answered with an error.
        """
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
        answer = httpx.post(self.url, json=body, timeout=30).json()
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def mine(self, blocks: int = 1) -> None:
        """Mine ``blocks`` empty blocks now."""
        self.rpc("anvil_mine", [hex(blocks)])

    def block_number(self) -> int:
        return int(self.rpc("eth_blockNumber"), 16)

    def wait_mined(self, tx_hash: bytes, timeout: float = 30.0) -> None:
        """Wait until transaction ``tx_hash`` is in a block. Automine answers
        ``eth_sendRawTransaction`` first and mines just after, so a test that reads
        the chain right after sending its own transaction waits for it here.

        Raises:
            TimeoutError: not mined within ``timeout`` seconds.
        """
        wait_until(
            lambda: self.rpc("eth_getTransactionReceipt", ["0x" + tx_hash.hex()]),
            timeout,
            what=f"transaction 0x{tx_hash.hex()} mined",
            interval=0.01,
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (anvil then writes ``--state``), wait; SIGKILL after ``timeout``."""
        stop_all([self.child], timeout)


def start_anvil(
    log: Path,
    *,
    port: int = 0,
    state: Path | None = None,
    extra: Sequence[str] = (),
    ready: float = 30.0,
) -> AnvilProcess:
    """Start anvil on 127.0.0.1 (a port of its choosing unless ``port``) and wait until it listens.

    ``state`` is anvil's ``--state FILE``: the chain is loaded from it when it
    exists and written to it when anvil stops. Blocks are mined per transaction
    (automine), so tests move time with :meth:`AnvilProcess.mine`.

    Raises:
        ToolMissing: anvil is not installed.
        ChildFailed: it exited or did not listen within ``ready`` seconds.
    """
    argv = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port)]
    if state is not None:
        argv += ["--state", str(state)]
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        # anvil prints a line per RPC call: its stdout goes to the log, not a pipe.
        process = subprocess.Popen(  # noqa: S603 -- the pinned anvil from .tools
            [*argv, *extra],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    child = ChildProcess(process, log, "anvil")

    def listening() -> re.Match[str] | None:
        if process.poll() is not None:
            raise ChildFailed(f"anvil exited ({process.returncode}):\n{child.log_tail(40)}")
        return _LISTENING.search(child.log_text()[offset:])

    try:
        found = wait_until(listening, ready, what="anvil listening")
    except TimeoutError:
        stop_all([child])
        raise ChildFailed(f"anvil did not listen within {ready} s:\n{child.log_tail(40)}") from None
    assert found is not None  # noqa: S101 -- wait_until returns only a truthy value
    bound = int(found.group(2))
    return AnvilProcess(child, f"http://127.0.0.1:{bound}", bound, state)
