"""Anchors on chain as trusted roots of a log rebuilt from mirrors (docs/design/mirrors.md).

``talos audit rebuild --from-peers --anchor-rpc URL``: the copy a mirror
served holds the log's own ``AUDIT_ANCHORED`` entries. Each names a chain, a
contract, a block and a transaction; the ``Anchored`` event found there must
carry the entry's size and root, and gives the log's on-chain name and its
wallet (as :func:`talos.audit.anchoring.verify.verify_anchors` reads them).
Every ``Anchored`` event of that log by that wallet is then a
:class:`~talos.audit.peer_rebuild.TrustedRoot`: one within the copy must
match it, one past it proves entries that were anchored and not mirrored (a
loss, reported).

Needs the ``talos[anchor]`` extra (imported by the CLI only when asked).
"""

from __future__ import annotations

from collections.abc import Sequence

from talos.audit.anchoring.chain import Chain, check_address
from talos.audit.anchoring.verify import ANCHORED_TOPIC, decode_anchored
from talos.audit.peer_rebuild import TrustedRoot
from talos.core.audit.entry import AuditEntry, AuditKind
from talos.errors import AnchorMismatch

__all__ = ["anchored_roots"]


def anchored_roots(entries: Sequence[bytes], chain: Chain) -> list[TrustedRoot]:
    """The anchors on ``chain`` of the log whose verified entries are ``entries``.

    Raises:
        AnchorMismatch: an ``AUDIT_ANCHORED`` entry's anchor is not on the
            chain as recorded.
        ChainUnavailable, RpcError: the chain did not answer.
    """
    anchored = [
        entry
        for entry in (AuditEntry.from_bytes(raw) for raw in entries)
        if entry.kind == AuditKind.AUDIT_ANCHORED
    ]
    if not anchored:
        return []
    chain_id = chain.chain_id()
    names: set[tuple[str, bytes, str]] = set()
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
        if not found:
            raise AnchorMismatch(
                f"the anchor of size {data['size']} (entry {entry.seq}) is not in block "
                f"{data['block']} of chain {chain_id} any more"
            )
        log_name, size, root, submitter = decode_anchored(found[0])
        if (size, root) != (data["size"], data["root"]):
            raise AnchorMismatch(f"entry {entry.seq} and its transaction disagree on the root")
        names.add((contract, log_name, submitter))
    roots = []
    for contract, log_name, submitter in sorted(names):
        query = {
            "address": contract,
            "fromBlock": "0x0",
            "topics": ["0x" + ANCHORED_TOPIC.hex(), "0x" + log_name.hex()],
        }
        for event in chain.logs(query):
            _, size, root, sender = decode_anchored(event)
            if sender == submitter:
                source = f"the anchor in block {event.block_number} of chain {chain_id}"
                roots.append(TrustedRoot(size, root, source))
    return roots
