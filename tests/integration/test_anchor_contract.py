"""The committed contract is what the pinned solcjs makes of the committed source."""

from __future__ import annotations

from pathlib import Path

from eth_utils import keccak

from talos.audit.anchoring.contract import ANCHOR_SELECTOR, anchor_calldata, artifact, log_id
from talos.testing.chain import compile_contract

ROOT = Path(__file__).resolve().parents[2]


def test_committed_bytecode_and_abi_match_the_source() -> None:
    source = (ROOT / "contracts" / "TalosAnchor.sol").read_text()
    compiled = compile_contract(source, "TalosAnchor.sol", "TalosAnchor")
    shipped = artifact()
    assert compiled["bytecode"] == "0x" + shipped.bytecode.hex()
    assert compiled["abi"] == shipped.abi
    assert compiled["compiler"] == shipped.compiler


def test_selector_and_event_are_the_abi_s() -> None:
    names = {item["name"]: item for item in artifact().abi}
    assert keccak(text="anchor(bytes32,uint64,bytes32)")[:4] == ANCHOR_SELECTOR
    assert [i["type"] for i in names["anchor"]["inputs"]] == ["bytes32", "uint64", "bytes32"]
    event = [(i["name"], i["type"], i["indexed"]) for i in names["Anchored"]["inputs"]]
    assert event == [
        ("logId", "bytes32", True),
        ("treeSize", "uint64", False),
        ("root", "bytes32", False),
        ("submitter", "address", True),
    ]
    data = anchor_calldata(log_id("a/audit"), 5, b"\x01" * 32)
    assert data[:4] == ANCHOR_SELECTOR
    assert len(data) == 4 + 3 * 32
