"""The audit log's public face: the log itself, its records, and proof verification.

:class:`AuditLog` is the LMDB-backed, append-only, Merkle-hashed log every
agent keeps. Anyone holding a log's signed checkpoints can check inclusion
and consistency proofs with :func:`verify_inclusion` and
:func:`verify_consistency` alone (RFC 9162).
"""

from __future__ import annotations

from talos.audit.log import (
    DEFAULT_BLOCK_ENTRIES,
    DEFAULT_BLOCK_SECONDS,
    AuditLog,
    AuditRecord,
    ChainProblem,
    ChainReport,
)
from talos.audit.pruning import PruneStep, Pruning
from talos.audit.store import EntryPruned, PrunedEntry
from talos.core.audit.checkpoint import (
    Block,
    Checkpoint,
    ConsistencyProof,
    InclusionProof,
    LogSigner,
    NoteSignature,
    note_key_hash,
    parse_verifier_key,
    verifier_key,
)
from talos.core.audit.entry import AuditEntry, AuditKind
from talos.core.audit.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from talos.errors import AuditFull, ConsistencyError, InclusionProofError, StoreCorrupted

__all__ = [
    "DEFAULT_BLOCK_ENTRIES",
    "DEFAULT_BLOCK_SECONDS",
    "EMPTY_ROOT",
    "AuditEntry",
    "AuditFull",
    "AuditKind",
    "AuditLog",
    "AuditRecord",
    "Block",
    "ChainProblem",
    "ChainReport",
    "Checkpoint",
    "ConsistencyError",
    "EntryPruned",
    "ConsistencyProof",
    "InclusionProof",
    "InclusionProofError",
    "LogSigner",
    "NoteSignature",
    "PruneStep",
    "PrunedEntry",
    "Pruning",
    "StoreCorrupted",
    "leaf_hash",
    "node_hash",
    "note_key_hash",
    "parse_verifier_key",
    "root_from_leaves",
    "verifier_key",
    "verify_consistency",
    "verify_inclusion",
]
