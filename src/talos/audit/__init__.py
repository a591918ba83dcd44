"""The audit log's public face: Merkle proof verification (RFC 9162).

Anyone holding a log's signed tree heads can check inclusion and consistency
proofs with these functions alone. The ``AuditLog`` itself (LMDB-backed,
append-only, with checkpoints and anchoring) arrives in this package later.
"""

from __future__ import annotations

from talos.core.audit.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from talos.errors import ConsistencyError, InclusionProofError

__all__ = [
    "EMPTY_ROOT",
    "ConsistencyError",
    "InclusionProofError",
    "leaf_hash",
    "node_hash",
    "root_from_leaves",
    "verify_consistency",
    "verify_inclusion",
]
