"""A proof file's anchor, looked up on the chain (``talos audit verify-proof --rpc``).

:func:`check_proof_anchor` needs nothing but the anchor the proof file
carries and a JSON-RPC URL: the anchor's block must still be the chain's
block at that height (not reorganised away), and the anchor's transaction in
that block must have emitted an ``Anchored`` event from the anchor's contract
with the anchor's log id, tree size and root, and the contract must hold
TalosAnchor's code (another contract can emit the same event with any
submitter). The event's submitter (the
log's wallet) is returned for the verdict; the proof file cannot vouch for
the wallet (``talos audit verify-anchors`` lists every wallet's anchors).
"""

from __future__ import annotations

from talos.audit.anchoring.chain import Chain, check_address
from talos.audit.anchoring.verify import decode_anchored, holds_anchor_contract
from talos.audit.proof_file import ProofAnchor
from talos.errors import AnchorMismatch, ConfigurationError

__all__ = ["check_proof_anchor"]


def check_proof_anchor(anchor: ProofAnchor, chain: Chain, origin: str | None) -> str:
    """Check ``anchor`` on ``chain``; the address of the wallet that sent it.

    ``origin`` is the proof's checkpoint origin, if any: the anchored log
    must be that log.

    Raises:
        ConfigurationError: the RPC URL serves another chain.
        AnchorMismatch: the chain contradicts the anchor (no such block,
            transaction or event; another log, size or root).
        ChainUnavailable, RpcError: the chain did not answer.
    """
    chain_id = chain.chain_id()
    if chain_id != anchor.chain_id:
        error = ConfigurationError(
            f"the RPC URL serves chain {chain_id}; the proof's anchor is on chain {anchor.chain_id}"
        )
        error.hint = f"pass --rpc with a JSON-RPC URL of chain {anchor.chain_id}"
        raise error
    where = f"block {anchor.block_number} of chain {chain_id}"
    block = chain.block(anchor.block_number)
    if block is None or block.hash != anchor.block_hash:
        raise AnchorMismatch(
            f"{where} is not the anchor's block 0x{anchor.block_hash.hex()}: "
            "the anchor is not on this chain (reorganised away, or never there)"
        )
    contract = check_address(anchor.contract)
    if not holds_anchor_contract(chain, contract):
        # Another contract can emit an identical event naming any submitter.
        raise AnchorMismatch(
            f"{contract} does not hold the TalosAnchor contract: the proof's anchor proves nothing"
        )
    found = [
        event
        for event in chain.logs({"address": contract, "blockHash": "0x" + block.hash.hex()})
        if event.tx_hash == anchor.tx_hash
    ]
    if not found:
        raise AnchorMismatch(
            f"transaction 0x{anchor.tx_hash.hex()} in {where} emitted no event of "
            f"contract {contract}: the proof's anchor is not on this chain"
        )
    log_id, size, root, submitter = decode_anchored(found[0])
    expected = {anchor.log_id} if anchor.log_id is not None else set()
    if origin is not None:
        expected.add(ProofAnchor.log_id_of(origin))
    if expected - {log_id}:
        raise AnchorMismatch(
            f"the anchor in transaction 0x{anchor.tx_hash.hex()} is of another log "
            f"(log id 0x{log_id.hex()}), not of this proof's"
        )
    if (size, root) != (anchor.tree_size, anchor.root):
        raise AnchorMismatch(
            f"the chain anchored size {size} root {root.hex()} in that transaction; "
            f"the proof file claims size {anchor.tree_size} root {anchor.root.hex()}"
        )
    return submitter
