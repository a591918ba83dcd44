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

from talos.audit.anchoring.chain import Chain
from talos.audit.anchoring.verify import anchors_on_chain
from talos.audit.peer_rebuild import TrustedRoot
from talos.core.audit.entry import AuditEntry, AuditKind

__all__ = ["anchored_roots"]


def anchored_roots(entries: Sequence[bytes], chain: Chain) -> list[TrustedRoot]:
    """The anchors on ``chain``, by the log's own wallet, of the log whose verified
    entries are ``entries``.

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
    return [
        TrustedRoot(
            found.size, found.root, f"the anchor in block {found.event.block_number} on chain"
        )
        for found in anchors_on_chain(anchored, chain)
        if found.own
    ]
