"""The agent's signed high-water mark: what its stores held, kept outside them.

A store that is deleted, emptied or replaced by an older copy looks, from
inside, like a young store. So the agent remembers what it had in a small
file in its home, ``watermark.cbor``, signed by its identity key, and
compares every store with it before it starts (docs/design/lost-state.md).

Rules this module keeps:

* **What is recorded** (:class:`Marks`): the key log's length; the tree size,
  root and height of the last sealed (signed) audit block; the generation of
  the capabilities store (:meth:`TokenStore.generation`, bumped by every
  write). The agent state lives in the audit log's LMDB environment, so the
  audit numbers cover it too.
* **Signed, verifiable after rotation**: the file names the key event whose
  key signed it (``kseq``) and is checked against that event of the agent's
  key log, so rotations never invalidate it. A file that does not decode, is
  another agent's, or whose signature fails is :class:`StoreCorrupted`.
* **The watermark lags, never leads**: it is written only after the stores
  committed what it records (a block is sealed in its transaction, then
  :meth:`WatermarkKeeper.block_sealed` runs; a capabilities write commits,
  then :meth:`WatermarkKeeper.capabilities_written` runs), and each field
  only grows (:meth:`Marks.merged`). A crash in between leaves a watermark
  behind the stores, which is accepted and brought forward at the next start.
* **Only an operator lowers it**: :func:`accept_current`, on an explicit
  command (``talos audit accept-lost-state``), which audits it first.

The comparison and the refusal are in :mod:`talos.storage.lost_state`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Protocol

from talos.core.audit.checkpoint import Block
from talos.core.audit.merkle import EMPTY_ROOT
from talos.core.crypto import VerifyKey
from talos.core.encoding import canonical_dumps, check_versioned_map, strict_versioned_map
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.errors import (
    MalformedFrame,
    SignatureInvalid,
    StateLost,
    StorageError,
    StoreCorrupted,
    UnsupportedVersion,
)
from talos.storage.home import KEYLOG_FILE, AgentHome, atomic_write

__all__ = [
    "CAPABILITIES_DIR",
    "STATE_LOSS_ACCEPTED",
    "WATERMARK_FILE",
    "AuditView",
    "Marks",
    "Watermark",
    "WatermarkKeeper",
    "accept_current",
    "load_watermark",
    "longest_keylog",
    "marks_of",
    "start_watermark",
]

WATERMARK_FILE: Final = "watermark.cbor"
CAPABILITIES_DIR: Final = "capabilities"
#: The audit entry kind that records an operator's decision to start over.
STATE_LOSS_ACCEPTED: Final = "STATE_LOSS_ACCEPTED"
FORMAT_VERSION: Final = 1
_DOMAIN: Final = b"talos-watermark-v1\x00"
_BODY_FIELDS: Final = frozenset({"v", "agent", "kseq", "keys", "asize", "aroot", "ablocks", "caps"})
_MAX_FILE: Final = 4096
_log = logging.getLogger("talos.storage")


class AuditView(Protocol):
    """What the watermark needs of an audit log (:class:`talos.audit.AuditLog` is one)."""

    @property
    def size(self) -> int: ...

    @property
    def block_count(self) -> int: ...

    def block(self, height: int) -> Block: ...

    def root_at(self, size: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Marks:
    """How much each store held: the numbers a watermark records."""

    keys: int
    audit_size: int
    audit_root: bytes
    audit_blocks: int
    capabilities: int

    def merged(self, other: Marks) -> Marks:
        """The larger of each field (the audit numbers from the later block)."""
        audit = self if self.audit_blocks >= other.audit_blocks else other
        return Marks(
            max(self.keys, other.keys),
            audit.audit_size,
            audit.audit_root,
            audit.audit_blocks,
            max(self.capabilities, other.capabilities),
        )


@dataclass(frozen=True, slots=True)
class Watermark:
    """A verified watermark: whose it is, which key event signed it, and its marks."""

    agent_id: str
    key_seq: int
    marks: Marks

    def to_bytes(self, identity: Identity) -> bytes:
        """The signed file contents (signed by ``identity``'s current key)."""
        body = _body(self.agent_id, self.key_seq, self.marks)
        signature = identity.signing_key.sign(_DOMAIN + canonical_dumps(body))
        return canonical_dumps({"v": FORMAT_VERSION, "body": body, "sig": signature})

    @classmethod
    def from_bytes(cls, data: bytes, keylog: KeyLog, path: Path) -> Watermark:
        """Decode and verify a watermark of the agent whose log is ``keylog``.

        Raises:
            StoreCorrupted: not a watermark, another agent's, or a bad signature.
            StateLost: signed by a key event ``keylog`` does not have (the key
                log is shorter than it was).
        """
        try:
            outer = strict_versioned_map(
                data,
                max_size=_MAX_FILE,
                fields=frozenset({"v", "body", "sig"}),
                version=FORMAT_VERSION,
                what="watermark",
            )
            body = outer["body"]
            watermark = _decode_body(body)
        except (MalformedFrame, UnsupportedVersion) as exc:
            raise _corrupted(path, f"does not decode: {exc}") from None
        if watermark.agent_id != keylog.agent_id:
            raise _corrupted(path, f"belongs to another agent ({watermark.agent_id})")
        if watermark.key_seq >= len(keylog.events):
            raise StateLost(
                f"key log {path.parent / KEYLOG_FILE} has {len(keylog.events)} key events; "
                f"{path} was signed with key event {watermark.key_seq}",
                where=str(path.parent / KEYLOG_FILE),
                losses=[f"key log: {len(keylog.events)} key events, expected more"],
            )
        key = VerifyKey(keylog.events[watermark.key_seq].signing_key)
        signature = outer["sig"]
        try:
            if type(signature) is not bytes:
                raise SignatureInvalid("no signature")
            key.verify(signature, _DOMAIN + canonical_dumps(body))
        except SignatureInvalid:
            raise _corrupted(path, "signature does not verify under this agent's key") from None
        return watermark


def _body(agent_id: str, key_seq: int, marks: Marks) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "agent": agent_id,
        "kseq": key_seq,
        "keys": marks.keys,
        "asize": marks.audit_size,
        "aroot": marks.audit_root,
        "ablocks": marks.audit_blocks,
        "caps": marks.capabilities,
    }


def _decode_body(body: Any) -> Watermark:
    fields = check_versioned_map(
        body,
        fields=_BODY_FIELDS,
        version=FORMAT_VERSION,
        what="watermark body",
    )
    numbers = [fields[name] for name in ("kseq", "keys", "asize", "ablocks", "caps")]
    if any(type(n) is not int or not 0 <= n < 2**63 for n in numbers):
        raise MalformedFrame("watermark numbers must be non-negative integers")
    if type(fields["agent"]) is not str or type(fields["aroot"]) is not bytes:
        raise MalformedFrame("watermark agent or root has the wrong type")
    if len(fields["aroot"]) != len(EMPTY_ROOT):
        raise MalformedFrame("watermark root has the wrong size")
    key_seq, keys, size, blocks, caps = numbers
    return Watermark(fields["agent"], key_seq, Marks(keys, size, fields["aroot"], blocks, caps))


def _corrupted(path: Path, what: str) -> StoreCorrupted:
    error = StoreCorrupted(f"watermark {path} {what}", where=str(path), what="watermark")
    error.hint = (
        "the watermark is not one this agent signed: restore the home from a backup, "
        "or start from what the stores hold with `talos audit accept-lost-state`"
    )
    return error


# -- reading what the stores hold ----------------------------------------------------


def marks_of(audit: AuditView, capabilities: int, keys: int) -> Marks:
    """The marks of the stores as they are: the last sealed block, the generation, the keys."""
    blocks = audit.block_count
    size, root = 0, EMPTY_ROOT
    if blocks:
        last = audit.block(blocks - 1)
        size, root = last.tree_size, last.root
    return Marks(keys, size, root, blocks, capabilities)


def load_watermark(home: AgentHome, keylog: KeyLog) -> Watermark | None:
    """The home's verified watermark, or None if it has none.

    Raises:
        StoreCorrupted, StateLost: as :meth:`Watermark.from_bytes`.
        StorageError: the file cannot be read.
    """
    path = home.path / WATERMARK_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"could not read {path}: {exc.strerror or exc}") from exc
    return Watermark.from_bytes(data, keylog, path)


def longest_keylog(home: AgentHome, identity: Identity) -> tuple[KeyLog, int | None]:
    """The longer of the public and the key file's key log; the public one's length."""
    public = home.load_public_keylog()
    if public is None:
        return identity.keylog, None
    longest = public if len(public.events) > len(identity.keylog.events) else identity.keylog
    return longest, len(public.events)


# -- keeping it ------------------------------------------------------------------------


class WatermarkKeeper:
    """Writes the watermark forward as the stores grow (thread-safe, never backwards)."""

    def __init__(self, home: AgentHome, identity: Identity, marks: Marks) -> None:
        self._path = home.path / WATERMARK_FILE
        self._identity = identity
        self._marks = marks
        self._lock = threading.Lock()

    @property
    def marks(self) -> Marks:
        return self._marks

    def block_sealed(self, block: Block) -> None:
        """A block was committed: record its size, root and height."""
        marks = replace(
            self._marks,
            audit_size=block.tree_size,
            audit_root=block.root,
            audit_blocks=block.height + 1,
        )
        self.advance(marks)

    def capabilities_written(self, generation: int) -> None:
        """A write to the capabilities store committed at ``generation``."""
        self.advance(replace(self._marks, capabilities=generation))

    def advance(self, marks: Marks) -> None:
        """Write ``marks`` merged with the recorded ones, if that changes anything.

        A write that fails is logged (``watermark_not_written``), not raised:
        the store change it follows is committed, and a lagging watermark is
        only less protection, brought forward at the next start.
        """
        with self._lock:
            merged = self._marks.merged(marks)
            if merged == self._marks:
                return
            try:
                self.write(merged)
            except StorageError as exc:
                _log.warning(
                    "watermark not written: %s", exc, extra={"event": "watermark_not_written"}
                )

    def write(self, marks: Marks) -> None:
        """Sign and atomically write exactly ``marks`` (0600).

        Raises:
            StorageError: the file cannot be written.
        """
        identity = self._identity
        watermark = Watermark(identity.agent_id, identity.sequence, marks)
        atomic_write(self._path, watermark.to_bytes(identity))
        self._marks = marks


def accept_current(
    home: AgentHome, identity: Identity, audit: AuditView, capabilities: int
) -> Marks:
    """Record the stores as they are now, even if that lowers the watermark.

    Only for an explicit operator decision (``talos audit accept-lost-state``),
    which audits it first. Rewrites a missing public key log from the key file.

    Raises:
        StorageError: a file cannot be written.
    """
    if not home.keylog_path.exists():
        atomic_write(home.keylog_path, identity.keylog.to_bytes())
    keylog, _ = longest_keylog(home, identity)
    marks = marks_of(audit, capabilities, len(keylog.events))
    WatermarkKeeper(home, identity, marks).write(marks)
    return marks


def start_watermark(home: AgentHome, identity: Identity, *, archive: Path | None = None) -> None:
    """Write the first watermark of a new identity (``talos init``).

    A watermark of a previous identity is moved to ``archive`` (where
    ``init --new-identity`` put that identity) first. The marks are zero:
    the first start adopts whatever the stores hold.

    Raises:
        StorageError: the file cannot be written or moved.
    """
    path = home.path / WATERMARK_FILE
    if archive is not None and path.exists():
        try:
            path.replace(archive / WATERMARK_FILE)
        except OSError as exc:
            raise StorageError(f"could not archive {path}: {exc.strerror or exc}") from exc
    marks = Marks(len(identity.keylog.events), 0, EMPTY_ROOT, 0, 0)
    WatermarkKeeper(home, identity, marks).write(marks)
