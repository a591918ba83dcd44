"""Checking a log against the chain: every anchor of it must hold a root the log had.

The contract keys an anchor by the log's name (``logId``, topic 1) and the
wallet that sent it (``submitter``, topic 2), and anyone may call it with any
``logId``. So an anchor only speaks for the log when its wallet is the
log's, and a check always names the wallets that count:

* :func:`anchored_names` starts from the log's own ``AUDIT_ANCHORED`` entries
  (signed into the log): each names a chain, a contract, a transaction and a
  block, which must still hold the entry's size and root; the ``Anchored``
  event found there gives the log's ``logId`` and its wallet.
* :func:`anchor_checks` lists every ``Anchored`` event of that ``logId`` on
  that contract (``eth_getLogs``) and judges each (:func:`judge`): an anchor
  by one of the log's wallets must carry, for its tree size, the root the
  local log has at that size (else ``mismatch``: a split view, a rewritten or
  rolled-back log, or the wallet's key used elsewhere); an anchor by any other
  wallet is ``foreign``, listed with whether its root agrees, never trusted
  and never an error. Since the local log is an append-only Merkle tree, equal
  roots at each anchored size also prove the anchors consistent with one
  another (check the log itself with ``talos audit verify-chain``).
* Without the log (an auditor who has only the log's name and its wallet),
  the wallet's own anchors can still contradict one another: two roots for
  one size are a ``mismatch``.

:func:`verify_anchors` is the all-in-one check that raises
:class:`~talos.errors.AnchorMismatch` (``talos audit verify-anchors``, and the
running agent through :mod:`talos.audit.anchoring.watch`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from talos.audit.anchoring.chain import Chain, EventLog, check_address
from talos.audit.anchoring.contract import artifact
from talos.audit.log import AuditLog
from talos.core.audit.entry import AuditEntry, AuditKind
from talos.errors import AnchorMismatch

__all__ = [
    "ANCHORED_TOPIC",
    "AnchorCheck",
    "LogName",
    "anchor_checks",
    "anchored_names",
    "decode_anchored",
    "holds_anchor_contract",
    "judge",
    "names_of",
    "verify_anchors",
]


def _anchored_topic() -> bytes:
    from eth_utils.crypto import keccak

    return bytes(keccak(text="Anchored(bytes32,uint64,bytes32,address)"))


#: topic 0 of ``Anchored(bytes32 indexed, uint64, bytes32, address indexed)``.
ANCHORED_TOPIC = _anchored_topic()

OK = "ok"
MISMATCH = "mismatch"
FOREIGN = "foreign"


@dataclass(frozen=True)
class LogName:
    """How the chain names one log: the contract, the ``logId`` and the wallets that count."""

    contract: str
    log_id: bytes
    wallets: frozenset[str]


@dataclass(frozen=True)
class AnchorCheck:
    """One anchor found on chain and what the local log says about it."""

    tree_size: int
    root: bytes
    block_number: int
    tx_hash: bytes
    submitter: str
    #: ``ok``; ``mismatch`` (by the log's wallet, contradicts the log); ``foreign``
    #: (another wallet: reported, not held against the log).
    verdict: str
    #: Whether the root is the log's at that size (None: nothing to compare it with).
    agrees: bool | None = None
    #: For a mismatch, why.
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root": self.root.hex(),
            "block_number": self.block_number,
            "tx": self.tx_hash.hex(),
            "submitter": self.submitter,
            "verdict": self.verdict,
            "agrees": self.agrees,
            "reason": self.reason,
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


def holds_anchor_contract(chain: Chain, address: str) -> bool:
    """Whether the code at ``address`` is TalosAnchor's (only its events name a real sender)."""
    code = chain.code(check_address(address))
    return bool(code) and artifact().bytecode.endswith(code)


def anchored_names(log: AuditLog, chain: Chain) -> tuple[list[LogName], list[AnchorCheck]]:
    """The log's names on ``chain`` from its ``AUDIT_ANCHORED`` entries, and the entries the
    chain no longer backs (as ``mismatch`` checks).

    Raises:
        ChainUnavailable, RpcError: the chain did not answer.
    """
    return names_of(log.query(kind=AuditKind.AUDIT_ANCHORED), chain)


def names_of(
    anchored: Iterable[AuditEntry], chain: Chain
) -> tuple[list[LogName], list[AnchorCheck]]:
    """:func:`anchored_names` from the ``AUDIT_ANCHORED`` entries themselves (a log
    rebuilt from mirrors holds them before it is written: ``talos.audit.mirror_anchors``).

    Raises:
        ChainUnavailable, RpcError: the chain did not answer.
    """
    chain_id = chain.chain_id()
    wallets: dict[tuple[str, bytes], set[str]] = {}
    gone: list[AnchorCheck] = []
    for entry in anchored:
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
        problem = ""
        if not found:
            problem = (
                f"the final anchor of size {data['size']} (entry {entry.seq}) is not in block "
                f"{data['block']} of chain {chain_id} any more"
            )
        else:
            log_name, size, root, submitter = decode_anchored(found[0])
            if (size, root) != (data["size"], data["root"]):
                problem = f"entry {entry.seq} and its transaction disagree on the root"
            else:
                wallets.setdefault((contract, log_name), set()).add(submitter)
        if problem:
            gone.append(
                AnchorCheck(
                    data["size"],
                    data["root"],
                    data["block"],
                    data["tx"],
                    "",
                    MISMATCH,
                    False,
                    problem,
                )  # fmt: skip
            )
    names = [LogName(c, n, frozenset(w)) for (c, n), w in sorted(wallets.items())]
    return names, gone


def anchor_events(chain: Chain, contract: str, log_id: bytes) -> list[EventLog]:
    """Every ``Anchored`` event of ``log_id`` emitted by ``contract``, oldest first."""
    query = {
        "address": check_address(contract),
        "fromBlock": "0x0",
        "topics": ["0x" + ANCHORED_TOPIC.hex(), "0x" + log_id.hex()],
    }
    return chain.logs(query)


def judge(
    reference: AuditLog | Mapping[int, bytes] | None,
    events: Iterable[EventLog],
    wallets: Collection[str],
) -> list[AnchorCheck]:
    """Each event's verdict against ``reference``: the log itself, or the roots known at a
    few sizes (a proof file's), or nothing; the wallets' own anchors are also held against
    one another (two roots for one size are a split view whatever the reference)."""
    found = [(event, *decode_anchored(event)[1:]) for event in events]
    own_roots: dict[int, set[bytes]] = {}
    for _, size, root, sender in found:
        if sender in wallets:
            own_roots.setdefault(size, set()).add(root)
    checks = []
    for event, size, root, sender in found:
        agrees, reason = _compare(reference, own_roots.get(size, set()), size, root)
        verdict = FOREIGN if sender not in wallets else MISMATCH if reason else OK
        checks.append(
            AnchorCheck(
                size, root, event.block_number, event.tx_hash, sender, verdict, agrees, reason
            )
        )
    return checks


def _compare(
    reference: AuditLog | Mapping[int, bytes] | None, own: set[bytes], size: int, root: bytes
) -> tuple[bool | None, str]:
    """Whether ``root`` is the reference's at ``size`` (None: unknown) and, if an anchor by
    the log's wallet with it would be a mismatch, why."""
    if isinstance(reference, AuditLog):
        agrees = size <= reference.size and reference.root_at(size) == root
        return agrees, "" if agrees else _why(reference, size, root)
    known = (reference or {}).get(size)
    if known is not None and known != root:
        return False, (
            f"the root anchored at size {size} (0x{root.hex()}) is not the one the proof "
            f"file gives (0x{known.hex()})"
        )
    if len(own) > 1:
        return False, f"the log's wallet anchored {len(own)} roots for size {size}: a split view"
    return (True if known is not None or own == {root} else None), ""


def _why(log: AuditLog, size: int, root: bytes) -> str:
    if size > log.size:
        return f"an anchor claims {size} entries; the log has {log.size}"
    return (
        f"the root anchored at size {size} (0x{root.hex()}) is not the log's "
        f"(0x{log.root_at(size).hex()}): a split view or a rewritten log"
    )


def anchor_checks(
    reference: AuditLog | Mapping[int, bytes] | None, chain: Chain, names: Iterable[LogName]
) -> list[AnchorCheck]:
    """Every anchor of each of ``names`` on ``chain``, judged against ``reference`` (:func:`judge`).

    Raises:
        AnchorMismatch: a contract is not TalosAnchor (its events prove nothing).
        ChainUnavailable, RpcError: the chain did not answer.
    """
    checks: list[AnchorCheck] = []
    for name in names:
        if not holds_anchor_contract(chain, name.contract):
            raise AnchorMismatch(
                f"{name.contract} does not hold the TalosAnchor contract: its events prove nothing"
            )
        checks += judge(reference, anchor_events(chain, name.contract, name.log_id), name.wallets)
    return checks


def verify_anchors(log: AuditLog, chain: Chain) -> list[AnchorCheck]:
    """Check every anchor of ``log`` on ``chain``; what was found, oldest first.

    Raises:
        AnchorMismatch: an ``AUDIT_ANCHORED`` anchor is not on the chain as
            recorded, or an anchor by the log's wallet holds a root the log did
            not have at that size (a split view), or a size past the log's end.
        ChainUnavailable, RpcError: the chain did not answer.
    """
    names, gone = anchored_names(log, chain)
    checks = [*gone, *anchor_checks(log, chain, names)]
    for check in checks:
        if check.verdict == MISMATCH:
            raise AnchorMismatch(check.reason)
    return checks
