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

import contextlib
import logging
import threading
from collections.abc import Callable
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
    "WATERMARK_NEXT_FILE",
    "AuditView",
    "Marks",
    "Watermark",
    "WatermarkKeeper",
    "accept_current",
    "load_watermark",
    "longest_keylog",
    "marks_of",
    "prepare_rotation",
    "resign_for_rotation",
    "start_watermark",
]

WATERMARK_FILE: Final = "watermark.cbor"
#: The watermark a rotation signs with its new key *before* the key file is
#: written (:func:`prepare_rotation`); it takes over only once the key log holds
#: that key, so a crash inside an emergency rotation never leaves the home with
#: nothing but a watermark under the revoked key.
WATERMARK_NEXT_FILE: Final = "watermark.next.cbor"
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
            StoreCorrupted: not a watermark, another agent's, a bad signature, or
                signed with a key an emergency rotation revoked.
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
        if keylog.revoked(watermark.key_seq):
            # Rotations re-sign the watermark at once (resign_for_rotation), so
            # this is a crash inside an emergency rotation or someone holding
            # the revoked key rewriting the marks: not trusted either way.
            raise _corrupted(
                path,
                f"is signed with key {watermark.key_seq}, which the emergency rotation to "
                f"key {keylog.state.revoked_below} revoked",
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

    A watermark a rotation prepared (:data:`WATERMARK_NEXT_FILE`) is used
    instead when it verifies under ``keylog`` (its key is in the log: the
    rotation committed) and is signed by a newer key than the main file, or
    the main file does not verify (a crash between the rotation's key file and
    the main file's rewrite). When both verify, each mark is the larger of the
    two: the main file may have advanced after the rotation prepared its copy.
    One that does not verify is ignored: a rotation that never committed.

    Raises:
        StoreCorrupted, StateLost: as :meth:`Watermark.from_bytes`.
        StorageError: a file cannot be read.
    """
    path = home.path / WATERMARK_FILE
    prepared = _prepared(home, keylog)
    try:
        data = _read_file(path)
        main = None if data is None else Watermark.from_bytes(data, keylog, path)
    except StateLost:
        raise
    except StoreCorrupted:
        if prepared is None:
            raise
        return prepared
    if prepared is None or (main is not None and prepared.key_seq <= main.key_seq):
        return main
    if main is None:
        return prepared
    # The main file kept advancing under the old key while the rotation was
    # under way: the prepared marks are older. Both verified, so the larger of
    # each mark stands; taking the prepared ones alone would lower the watermark.
    return replace(prepared, marks=prepared.marks.merged(main.marks))


def _prepared(home: AgentHome, keylog: KeyLog) -> Watermark | None:
    path = home.path / WATERMARK_NEXT_FILE
    data = _read_file(path)
    if data is None:
        return None
    try:
        return Watermark.from_bytes(data, keylog, path)
    except StoreCorrupted:  # StateLost too: its key is not (yet) in the log
        return None


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"could not read {path}: {exc.strerror or exc}") from exc


def longest_keylog(home: AgentHome, identity: Identity) -> tuple[KeyLog, int | None]:
    """The longer of the public and the key file's key log; the public one's length."""
    public = home.load_public_keylog()
    if public is None:
        return identity.keylog, None
    longest = public if len(public.events) > len(identity.keylog.events) else identity.keylog
    return longest, len(public.events)


# -- keeping it ------------------------------------------------------------------------


class WatermarkKeeper:
    """Writes the watermark forward as the stores grow (thread-safe, never backwards).

    ``identity`` is the identity that signs, or a callable giving the current
    one: a running agent passes its ``OwnIdentity``'s, so that after a rotation
    the watermark is signed by the new key, never by one the rotation revoked.
    """

    def __init__(
        self, home: AgentHome, identity: Identity | Callable[[], Identity], marks: Marks
    ) -> None:
        self._path = home.path / WATERMARK_FILE
        self._identity: Callable[[], Identity] = (
            identity if callable(identity) else (lambda: identity)
        )
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

    def key_log_grew(self, keys: int) -> None:
        """The agent rotated: record its key log's new length, signed by the new key
        (so the watermark is never left under a key the rotation revoked)."""
        self.advance(replace(self._marks, keys=keys))

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
        identity = self._identity()
        watermark = Watermark(identity.agent_id, identity.sequence, marks)
        atomic_write(self._path, watermark.to_bytes(identity))
        self._marks = marks
        _remove_prepared(self._path.parent, identity.sequence)

    def prepare_rotation(self, rotated: Identity) -> None:
        """Sign the watermark with ``rotated``'s key before its key file is written
        (:func:`prepare_rotation`).

        Raises:
            StorageError: the file cannot be written (the rotation should stop).
        """
        with self._lock:
            write_prepared(self._path.parent, rotated, self._marks)


def _remove_prepared(home_path: Path, sequence: int) -> None:
    """Drop a prepared watermark once the main file is signed by its key (or a newer
    one); one prepared by a rotation still under way (a newer key) stays."""
    path = home_path / WATERMARK_NEXT_FILE
    try:
        data = _read_file(path)
    except StorageError:
        data = b""
    if data is None:
        return
    try:
        outer = strict_versioned_map(
            data,
            max_size=_MAX_FILE,
            fields=frozenset({"v", "body", "sig"}),
            version=FORMAT_VERSION,
            what="watermark",
        )
        if _decode_body(outer["body"]).key_seq > sequence:
            return
    except (MalformedFrame, UnsupportedVersion):
        pass  # not a watermark at all: nothing worth keeping
    with contextlib.suppress(OSError):
        path.unlink()


def write_prepared(home_path: Path, rotated: Identity, marks: Marks) -> None:
    """Write the prepared watermark: ``marks`` with ``rotated``'s key log length,
    signed by ``rotated``'s key.

    Raises:
        StorageError: the file cannot be written.
    """
    keys = max(len(rotated.keylog.events), marks.keys)
    watermark = Watermark(rotated.agent_id, rotated.sequence, replace(marks, keys=keys))
    atomic_write(home_path / WATERMARK_NEXT_FILE, watermark.to_bytes(rotated))


def prepare_rotation(home: AgentHome, before: Watermark | None, rotated: Identity) -> None:
    """Before a stopped agent's rotation writes its key file: sign ``before`` (the
    watermark read under the key log *before* the rotation) with the new key,
    into :data:`WATERMARK_NEXT_FILE`. Nothing to do for a home without one.

    Raises:
        StorageError: the file cannot be written (nothing else changed yet).
    """
    if before is not None:
        write_prepared(home.path, rotated, before.marks)


def resign_for_rotation(home: AgentHome, before: Watermark | None, rotated: Identity) -> None:
    """After a stopped agent's rotation (its key file written): the main watermark
    file, re-signed with the new key, records the longer key log; the prepared
    one is dropped.

    Raises:
        StorageError: the file cannot be written (the prepared watermark,
            signed by the new key, stands in for it: :func:`load_watermark`).
    """
    if before is None:
        return
    keys = len(rotated.keylog.events)
    marks = replace(before.marks, keys=max(keys, before.marks.keys))
    WatermarkKeeper(home, rotated, marks).write(marks)


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
    for name in (WATERMARK_FILE, WATERMARK_NEXT_FILE):
        path = home.path / name
        if archive is not None and path.exists():
            try:
                path.replace(archive / name)
            except OSError as exc:
                raise StorageError(f"could not archive {path}: {exc.strerror or exc}") from exc
    marks = Marks(len(identity.keylog.events), 0, EMPTY_ROOT, 0, 0)
    WatermarkKeeper(home, identity, marks).write(marks)
