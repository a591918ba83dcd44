"""The rules of pruning an anchored audit log (``prune_after_anchor``), pure.

Pruning drops the *payload* (the entry's CBOR) of entries that a final
on-chain anchor covers. It keeps every leaf hash and every stored node, so
the tree is whole: appending goes on, a consistency proof from any anchored
size and an inclusion proof of any entry (a pruned one's proves its leaf
hash) can still be made, and ``verify_chain`` still rebuilds every root.

Rules (docs/design/anchoring.md, "Pruning"):

1. Only the log's own final anchors count: the newest ``AUDIT_ANCHORED``
   entry names the anchored tree size ``S`` and root, and the log's root at
   ``S`` must be that root, or nothing is pruned (:func:`anchor_problem`).
2. A step never passes the anchored size, nor the end of the last sealed
   block (the writer reads the first unsealed entry's time after a
   restart) (:func:`step_end`); one step drops at most a given number of
   payloads (one LMDB transaction each).
3. Entries of :data:`KEPT_KINDS` keep their payload: the anchors and the
   pruning record itself stay readable (``verify-anchors``, proof files,
   ``verify-chain``), and a range holding only those is not a step at all
   (:func:`drops_payload`), so pruning never appends a record for nothing.
4. The pruning point only moves forward: below it an entry row is its leaf
   hash alone (pruned) or a kept entry; from it on, every row holds its
   payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from talos.core.audit.entry import AuditKind

__all__ = [
    "DEFAULT_STEP",
    "KEPT_KINDS",
    "anchor_problem",
    "drops_payload",
    "pruned_record",
    "step_end",
]

#: Payloads one pruning step (one LMDB transaction) drops, at most.
DEFAULT_STEP: Final = 16_384

#: Kinds whose payload is never pruned.
#: Besides the anchoring records, the evidence nothing can recompute: witnesses'
#: cosignatures and equivocations, anchor mismatches, and the records of
#: rotations, restores, rebuilds and accepted losses.
KEPT_KINDS: Final = frozenset(
    {
        AuditKind.AUDIT_ANCHORED.value,
        AuditKind.AUDIT_PRUNED.value,
        AuditKind.CHECKPOINT_COSIGNED.value,
        AuditKind.AUDIT_EQUIVOCATION.value,
        AuditKind.ANCHOR_MISMATCH.value,
        AuditKind.KEY_ROTATED.value,
        AuditKind.LOG_RESTORED.value,
        AuditKind.AUDIT_REBUILT.value,
        AuditKind.MIRROR_REBUILT.value,
        "STATE_LOSS_ACCEPTED",
    }
)


def step_end(*, pruned: int, anchored: int, sealed: int, held: int | None = None) -> int:
    """How far pruning may go (exclusive): never past the anchored size or the last block,
    nor past ``held`` (what a hold still needs: the entries the agent's mirrors have not
    acknowledged yet; ``None``: no hold).

    Returns ``pruned`` when there is nothing to do (the point never moves back).
    """
    bound = min(anchored, sealed) if held is None else min(anchored, sealed, held)
    return max(pruned, bound)


def drops_payload(kind: str) -> bool:
    """Whether an entry of ``kind`` loses its payload when pruned (rule 3)."""
    return kind not in KEPT_KINDS


def anchor_problem(
    data: Mapping[str, Any], log_size: int, root_at_size: bytes | None
) -> str | None:
    """Why an ``AUDIT_ANCHORED`` entry's data cannot license pruning, or None (rule 1).

    ``root_at_size`` is the log's own root at the anchored size (None when
    the size is past the log's end).
    """
    size, root = data.get("size"), data.get("root")
    if type(size) is not int or not isinstance(root, bytes) or len(root) != 32:
        return "the AUDIT_ANCHORED entry has no tree size and root"
    if not 0 < size <= log_size or root_at_size is None:
        return f"the anchored size {size} is not inside the log ({log_size} entries)"
    if root_at_size != root:
        return f"the root anchored at size {size} is not the log's root at that size"
    return None


def pruned_record(
    *, start: int, end: int, entries: int, anchor_seq: int, anchor: Mapping[str, Any]
) -> dict[str, Any]:
    """The data of the ``AUDIT_PRUNED`` entry of one step.

    ``from``/``to``: the pruning point before and after (entries ``from``
    to ``to - 1`` were looked at), ``entries``: payloads dropped, then the
    covering anchor: its entry's seq, tree size, root, and where it is on
    chain (chain id, transaction).
    """
    record: dict[str, Any] = {
        "from": start,
        "to": end,
        "entries": entries,
        "anchor_seq": anchor_seq,
        "anchor_size": anchor["size"],
        "anchor_root": anchor["root"],
    }
    for key in ("chain", "tx"):
        if key in anchor:
            record[key] = anchor[key]
    return record
