"""Checking a log against the chain: every anchor of it must hold a root the log had.

:func:`verify_anchors` starts from the log's own ``AUDIT_ANCHORED`` entries
(signed into the log): each names a chain, a contract, a transaction and a
block. Each must still be on that chain, in that block, with the entry's
size and root; the ``Anchored`` event found there gives the log's on-chain
name (``logId``) and its wallet (``submitter``). Then every ``Anchored``
event of that log by that wallet on that contract (``eth_getLogs``) must
carry, for its tree size, the root the local log has at that size. Since
the local log is an append-only Merkle tree, equal roots at each anchored
size also prove the anchors consistent with one another (check the log
itself with ``talos audit verify-chain``).

Anchors by other wallets are listed (anyone may call the contract with any
``logId``) but not held against the log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from talos.audit.anchoring.chain import Chain, EventLog, check_address
from talos.audit.log import AuditLog
from talos.core.audit.entry import AuditEntry, AuditKind
from talos.errors import AnchorMismatch

__all__ = [
    "ANCHORED_TOPIC",
    "AnchorCheck",
    "AnchorFound",
    "anchors_on_chain",
    "decode_anchored",
    "verify_anchors",
]


def _anchored_topic() -> bytes:
    from eth_utils.crypto import keccak

    return bytes(keccak(text="Anchored(bytes32,uint64,bytes32,address)"))


#: topic 0 of ``Anchored(bytes32 indexed, uint64, bytes32, address indexed)``.
ANCHORED_TOPIC = _anchored_topic()


@dataclass(frozen=True)
class AnchorCheck:
    """One anchor found on chain and what the local log says about it."""

    tree_size: int
    root: bytes
    block_number: int
    tx_hash: bytes
    submitter: str
    #: ``ok``, ``foreign`` (another wallet: not held against the log).
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "block_number": self.block_number,
            "tx": self.tx_hash.hex(),
            "submitter": self.submitter,
            "verdict": self.verdict,
        }


def decode_anchored(event: EventLog) -> tuple[bytes, int, bytes, str]:
    """An `Anchored` event's log id, tree size, root and submitter.

    Raises:
        AnchorMismatch: the event is not an `Anchored` event.
    """
    if len(event.topics) != 3 or event.topics[0] != ANCHORED_TOPIC or len(event.data) != 64:
        raise AnchorMismatch(f"transaction 0x{event.tx_hash.hex()} holds no Anchored event")
    size = int.from_bytes(event.data[:32], "big")
    return event.topics[1], size, event.data[32:], check_address("0x" + event.topics[2][-20:].hex())


def verify_anchors(log: AuditLog, chain: Chain) -> list[AnchorCheck]:
    """Check every anchor of ``log`` on ``chain``; what was found, oldest first.

    Raises:
        AnchorMismatch: an ``AUDIT_ANCHORED`` anchor is not on the chain as
            recorded, or an anchor by the log's wallet holds a root the log did
            not have at that size (a split view), or a size past the log's end.
        ChainUnavailable, RpcError: the chain did not answer.
    """
    checks = []
    for found in anchors_on_chain(log.query(kind=AuditKind.AUDIT_ANCHORED), chain):
        verdict = "foreign" if not found.own else _judge(log, found.size, found.root)
        event = found.event
        checks.append(
            AnchorCheck(
                found.size, found.root, event.block_number, event.tx_hash, found.sender, verdict
            )
        )
    return checks


@dataclass(frozen=True)
class AnchorFound:
    """One ``Anchored`` event of a log on chain; ``own``: sent by the log's own wallet."""

    event: EventLog
    size: int
    root: bytes
    sender: str
    own: bool


def anchors_on_chain(anchored: Iterable[AuditEntry], chain: Chain) -> list[AnchorFound]:
    """Every ``Anchored`` event of the log whose ``AUDIT_ANCHORED`` entries are ``anchored``.

    Each entry's anchor must be on the chain as recorded; it names the log's
    on-chain id and wallet, whose every event is then listed (``own``), with
    those of other wallets for the same id.

    Raises:
        AnchorMismatch: an entry's anchor is not on the chain as recorded.
        ChainUnavailable, RpcError: the chain did not answer.
    """
    entries = list(anchored)
    if not entries:
        return []
    chain_id = chain.chain_id()
    names: set[tuple[str, bytes, str]] = set()
    for entry in entries:
        data = entry.data
        if data["chain"] != chain_id:
            continue
        contract = check_address("0x" + bytes(data["contract"]).hex())
        found = [
            event
            for event in chain.logs(
                {"address": contract, "blockHash": "0x" + data["block_hash"].hex()}
            )
            if event.tx_hash == data["tx"]
        ]
        if not found:
            raise AnchorMismatch(
                f"the anchor of size {data['size']} (entry {entry.seq}) is not in block "
                f"{data['block']} of chain {chain_id} any more"
            )
        log_name, size, root, submitter = decode_anchored(found[0])
        if (size, root) != (data["size"], data["root"]):
            raise AnchorMismatch(f"entry {entry.seq} and its transaction disagree on the root")
        names.add((contract, log_name, submitter))
    anchors = []
    for contract, log_name, submitter in sorted(names):
        query = {
            "address": contract,
            "fromBlock": "0x0",
            "topics": ["0x" + ANCHORED_TOPIC.hex(), "0x" + log_name.hex()],
        }
        for event in chain.logs(query):
            _, size, root, sender = decode_anchored(event)
            anchors.append(AnchorFound(event, size, root, sender, sender == submitter))
    return anchors


def _judge(log: AuditLog, size: int, root: bytes) -> str:
    if size > log.size:
        raise AnchorMismatch(f"an anchor claims {size} entries; the log has {log.size}")
    if log.root_at(size) != root:
        raise AnchorMismatch(
            f"the root anchored at size {size} (0x{root.hex()}) is not the log's "
            f"(0x{log.root_at(size).hex()}): a split view or a rewritten log"
        )
    return "ok"
