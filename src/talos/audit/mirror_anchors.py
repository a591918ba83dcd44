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
from talos.audit.anchoring.verify import anchor_events, decode_anchored, names_of
from talos.audit.peer_rebuild import TrustedRoot
from talos.core.audit.entry import AuditEntry, AuditKind
from talos.errors import AnchorMismatch

__all__ = ["anchored_roots"]


def anchored_roots(entries: Sequence[bytes], chain: Chain) -> list[TrustedRoot]:
    """The anchors on ``chain``, by the log's own wallets, of the log whose verified
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
    names, gone = names_of(anchored, chain)
    if gone:
        raise AnchorMismatch(gone[0].reason)
    roots = []
    for name in names:
        for event in anchor_events(chain, name.contract, name.log_id):
            _, size, root, sender = decode_anchored(event)
            if sender in name.wallets:
                where = f"the anchor in block {event.block_number} on chain"
                roots.append(TrustedRoot(size, root, where))
    return roots
