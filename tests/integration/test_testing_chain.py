"""talos.testing.chain: a real anvil on loopback, its --state kept across a restart."""

from __future__ import annotations

from pathlib import Path

from talos.testing.chain import AnvilProcess, start_anvil


def test_anvil_answers_and_mines(anvil: AnvilProcess) -> None:
    assert anvil.url.startswith("http://127.0.0.1:")
    assert int(anvil.rpc("eth_chainId"), 16) == 31337
    anvil.mine(3)
    assert anvil.block_number() == 3


def test_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "chain.json"
    first = start_anvil(tmp_path / "anvil.log", state=state)
    try:
        first.mine(7)
    finally:
        first.stop()
    assert first.child.process.returncode == 0
    again = start_anvil(tmp_path / "anvil.log", state=state)
    try:
        assert again.block_number() == 7
        assert again.port != 0
    finally:
        again.stop()
