"""The anchoring contract as Talos ships it: ABI, bytecode, and how a log is named on chain.

``contract.json`` (package data) is what ``contracts/build.py`` compiled from
``contracts/TalosAnchor.sol`` with the pinned solcjs; a test recompiles the
source and checks the bytes. The contract has no owner and no storage: its one
function, ``anchor(bytes32 logId, uint64 treeSize, bytes32 root)``, emits
``Anchored(logId indexed, treeSize, root, submitter indexed)``.

A log's ``logId`` is SHA-256 of its checkpoint origin line (for an agent,
``"<agent id>/audit"``), so anyone holding one of its checkpoints can find its
anchors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

from talos.core.crypto import sha256

__all__ = ["ANCHOR_SELECTOR", "ContractArtifact", "anchor_calldata", "artifact", "log_id"]

#: ``keccak256("anchor(bytes32,uint64,bytes32)")[:4]`` (a test checks it against the ABI).
ANCHOR_SELECTOR: Final = bytes.fromhex("70c127c6")

_MAX_U64: Final = 2**64 - 1


@dataclass(frozen=True)
class ContractArtifact:
    """The compiled contract: its ABI, creation bytecode and the compiler that made it."""

    abi: list[dict[str, Any]]
    bytecode: bytes
    compiler: str


@cache
def artifact() -> ContractArtifact:
    """The committed ABI and bytecode of ``TalosAnchor``."""
    text = resources.files("talos.audit.anchoring").joinpath("contract.json").read_text()
    document = json.loads(text)
    return ContractArtifact(
        abi=document["abi"],
        bytecode=bytes.fromhex(document["bytecode"].removeprefix("0x")),
        compiler=document["compiler"],
    )


def log_id(origin: str) -> bytes:
    """The on-chain name of the log whose checkpoints carry ``origin``: SHA-256 of it."""
    return sha256(origin.encode("utf-8"))


def anchor_calldata(log: bytes, tree_size: int, root: bytes) -> bytes:
    """ABI-encoded ``anchor(log, tree_size, root)``.

    Raises:
        ValueError: ``log`` or ``root`` is not 32 bytes, or the size is not a uint64.
    """
    if len(log) != 32 or len(root) != 32:
        raise ValueError("log id and root must be 32 bytes")
    if not 0 <= tree_size <= _MAX_U64:
        raise ValueError("tree size must be a uint64")
    return ANCHOR_SELECTOR + log + tree_size.to_bytes(32, "big") + root
