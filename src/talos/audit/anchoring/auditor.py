"""Which log an auditor without its entries means (``talos audit verify-anchors --log-id``).

An auditor who trusts only the chain holds no copy of the log, only what
names it: its ``logId`` itself, the agent's id, the agent's public key log,
or a proof file issued by the agent. :func:`log_reference` turns any of these
into a :class:`LogReference`: the ``logId`` (SHA-256 of the checkpoint origin
``"<agent id>/audit"``), the roots the reference vouches for at some sizes (a
proof file's checkpoint, anchor and consistency target; none otherwise) and,
from a proof file's anchor, the contract. The anchors are then judged by
:func:`talos.audit.anchoring.verify.judge` against those roots and against
one another: the wallet's anchors must never give two roots for one size.

The wallet cannot come from any of these (a proof file's anchor may have been
sent by anyone): the auditor names it (``--wallet``), as the log's operator
publishes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from talos.audit.anchoring.contract import log_id
from talos.audit.proof_file import read_proof_file
from talos.core.agent_id import AGENT_ID_PREFIX
from talos.core.keylog import KeyLog
from talos.errors import ConfigurationError, TalosError

__all__ = ["LogReference", "log_reference"]

_LOG_ID = re.compile(r"0x[0-9a-fA-F]{64}")
#: Largest file read as a key log or proof file.
_MAX_FILE = 4 * 1024 * 1024


@dataclass(frozen=True)
class LogReference:
    """A log named from outside: its ``logId``, roots vouched for, maybe its contract."""

    log_id: bytes
    described: str
    known: dict[int, bytes] = field(default_factory=dict)
    contract: str | None = None


def log_reference(text: str) -> LogReference:
    """Parse ``--log-id``: ``0x`` and 64 hex digits, an agent id, or a key log or proof file.

    Raises:
        ConfigurationError: none of these (the message says which forms are accepted).
    """
    if _LOG_ID.fullmatch(text):
        return LogReference(bytes.fromhex(text[2:]), f"log id {text.lower()}")
    if text.startswith(AGENT_ID_PREFIX):
        return LogReference(log_id(f"{text}/audit"), f"the audit log of {text}")
    path = Path(text)
    if not path.is_file():
        error = ConfigurationError(f"--log-id {text!r} is no log id, agent id or file")
        error.hint = (
            "give 0x and 64 hex digits, an agent id (did:talos:...), the agent's public key "
            "log (keylog.cbor, `talos whoami --export-log`) or a proof file of the log"
        )
        raise error
    head = path.read_bytes()[:1]
    if head == b"{":
        return _from_proof(path)
    return _from_keylog(path)


def _from_keylog(path: Path) -> LogReference:
    try:
        data = path.read_bytes()
        if len(data) > _MAX_FILE:
            raise ConfigurationError(f"{path} is too large for a key log")
        agent = KeyLog.from_bytes(data).agent_id
    except (OSError, TalosError) as exc:
        raise ConfigurationError(f"{path} is neither a proof file nor a key log: {exc}") from None
    return LogReference(log_id(f"{agent}/audit"), f"the audit log of {agent} (key log {path})")


def _from_proof(path: Path) -> LogReference:
    proof = read_proof_file(path)
    known: dict[int, bytes] = {}
    name = None
    if proof.checkpoint is not None:
        name = log_id(proof.checkpoint.origin)
        known[proof.checkpoint.size] = proof.checkpoint.root
    anchor = proof.anchor
    if anchor is not None:
        if name is not None and anchor.log_id is not None and anchor.log_id != name:
            raise ConfigurationError(f"{path}: its anchor and its checkpoint name other logs")
        name = name or anchor.log_id
        _agree(known, anchor.tree_size, anchor.root, path)
        if anchor.proof_root is not None:
            _agree(known, proof.proof.tree_size, anchor.proof_root, path)
    if name is None:
        error = ConfigurationError(f"{path} names no log: it has neither checkpoint nor anchor")
        error.hint = "pass the log id, the agent id or its key log with --log-id instead"
        raise error
    contract = None if anchor is None else anchor.contract
    return LogReference(name, f"the log of proof file {path}", known, contract)


def _agree(known: dict[int, bytes], size: int, root: bytes, path: Path) -> None:
    if known.setdefault(size, root) != root:
        raise ConfigurationError(f"{path} gives two roots for tree size {size}")
