"""Rebuilding an audit log from what its mirrors served (docs/design/mirrors.md).

``talos audit rebuild --from-peers`` fetches the origin's entries back from
its mirrors (:mod:`talos.client.mirror_fetch`); this module decides what to
believe and writes the log:

* :class:`PeerLog` takes the stretches one mirror serves, in order, and
  keeps only what verifies: each stretch starts where the last ended, every
  entry decodes strictly and names its position, the checkpoint names the
  origin's log and is signed by a key of the origin's own key log, and the
  tree of everything so far has exactly the checkpoint's root. Anything else
  raises :class:`MirrorInvalid` naming the mirror and the position: the
  caller tries the next mirror.
* :class:`TrustedRoot` is one (size, root, source) the rebuilt tree must
  match: the newest checkpoint each mirror served, the watermark the agent
  signed, anchors on chain, witnesses' cosigned checkpoints (later).
  :func:`check_roots` checks them all; one that is past the rebuilt size is
  not a mismatch but a loss, reported by the caller.
* :func:`write_entries` writes a fresh log from verified entry bytes (the
  same bytes, so the same leaves, roots and proofs) into a new directory,
  and seals one block signed by the agent's current key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import lmdb

from talos.audit.log import AuditLog
from talos.audit.mirror_store import audit_origin
from talos.audit.records import prepare
from talos.audit.store import FORMAT_VERSION, AuditStore
from talos.core.audit.checkpoint import Checkpoint, LogSigner
from talos.core.audit.entry import AuditEntry
from talos.core.audit.merkle import EMPTY_ROOT, leaf_hash, node_hash
from talos.core.clock import Clock
from talos.core.crypto import VerifyKey
from talos.core.mirror import Entries, TreeBorder, leaves_root
from talos.errors import (
    LocalProtocolError,
    MalformedFrame,
    SignatureInvalid,
    UnsupportedVersion,
    VerificationError,
)
from talos.storage.environment import Environment
from talos.storage.lmdb import u64

__all__ = ["MirrorInvalid", "PeerLog", "TrustedRoot", "check_roots", "write_entries"]

_CHUNK: Final = 4096


class MirrorInvalid(VerificationError):
    """A mirror served something that does not verify; ``mirror`` and ``position`` name it."""

    def __init__(self, mirror: str, position: int, what: str) -> None:
        super().__init__(f"mirror {mirror} served a bad stretch at entry {position}: {what}")
        self.mirror, self.position, self.what = mirror, position, what


@dataclass(frozen=True, slots=True)
class TrustedRoot:
    """A root the rebuilt tree must have at ``size``, and who vouches for it."""

    size: int
    root: bytes
    source: str


@dataclass
class PeerLog:
    """The verified entries one mirror served so far, and the roots that vouch for them."""

    origin: str
    mirror: str
    keys: Sequence[VerifyKey]
    border: TreeBorder = field(default_factory=TreeBorder.empty)
    entries: list[bytes] = field(default_factory=list)
    roots: list[TrustedRoot] = field(default_factory=list)
    #: The sequence of the origin's current key (an index into ``keys``), if known.
    current: int | None = None
    #: The sequence of the key that signed the newest checkpoint served.
    signer: int | None = None

    @property
    def retired_end(self) -> str | None:
        """Why the copy may not be trusted as it ends (``None`` when it may): its
        newest checkpoint is signed by a key the origin rotated away from."""
        if self.current is None or self.signer is None or self.signer == self.current:
            return None
        return (
            f"its newest checkpoint (at {self.size} entries) is signed by key {self.signer}, "
            f"which the agent rotated away from (its current key is {self.current}); the "
            "rebuild only ends on a checkpoint signed by the current key"
        )

    @property
    def size(self) -> int:
        return self.border.size

    @property
    def root(self) -> bytes:
        return self.border.root()

    def add(self, served: Entries) -> None:
        """Verify one served stretch and keep it.

        Raises:
            MirrorInvalid: it does not continue what is held, an entry is bad,
                or the checkpoint is not the origin's or not its root.
        """
        position = self.border.size
        if served.start != position:
            raise self._bad(position, f"stretch starts at {served.start}, not {position}")
        checkpoint = served.checkpoint
        if not served.entries or checkpoint is None:
            raise self._bad(position, "an empty stretch")
        for offset, raw in enumerate(served.entries):
            try:
                entry = AuditEntry.from_bytes(raw)
            except (MalformedFrame, UnsupportedVersion) as exc:
                raise self._bad(position + offset, f"entry does not decode: {exc}") from None
            if entry.seq != position + offset:
                raise self._bad(position + offset, f"entry names position {entry.seq}")
        if checkpoint.origin != audit_origin(self.origin):
            raise self._bad(position, "checkpoint names another log")
        signer = next(
            (n for n, key in enumerate(self.keys) if _signed_by(checkpoint, key, self.origin)),
            None,
        )
        if signer is None:
            raise self._bad(position, "checkpoint is not signed by a key of the origin")
        grown, root = leaves_root(self.border, served.entries)
        if root != checkpoint.root:
            raise self._bad(
                position, f"entries do not hash to the signed root at {checkpoint.size}"
            )
        self.border = grown
        self.signer = signer
        self.entries.extend(served.entries)
        self.roots.append(TrustedRoot(grown.size, root, f"checkpoint served by {self.mirror}"))

    def _bad(self, position: int, what: str) -> MirrorInvalid:
        return MirrorInvalid(self.mirror, position, what)


def _signed_by(checkpoint: Checkpoint, key: VerifyKey, name: str) -> bool:
    try:
        checkpoint.verify(key, name)
    except SignatureInvalid:
        return False
    return True


def check_roots(
    roots: Iterable[TrustedRoot], size: int, root_at: Callable[[int], bytes]
) -> list[TrustedRoot]:
    """Check every trusted root within ``size``; return those beyond it (a loss).

    Raises:
        VerificationError: the rebuilt tree has another root at a trusted size.
    """
    beyond = []
    for trusted in roots:
        if trusted.size > size:
            beyond.append(trusted)
            continue
        if root_at(trusted.size) != trusted.root:
            raise VerificationError(
                f"the rebuilt log's root at {trusted.size} entries is not the one "
                f"{trusted.source} vouches for"
            )
    return beyond


def roots_of(entries: Sequence[bytes]) -> Callable[[int], bytes]:
    """``root_at(size)`` over raw entries (for :func:`check_roots` before writing)."""
    leaves = [leaf_hash(raw) for raw in entries]

    def root_at(size: int) -> bytes:
        border = TreeBorder.empty()
        for leaf in leaves[:size]:
            border.append(leaf)
        return border.root() if size else EMPTY_ROOT

    return root_at


def write_entries(
    path: Path,
    entries: Sequence[bytes],
    *,
    signer: LogSigner,
    clock: Clock,
    extra_databases: Sequence[str] = (),
) -> tuple[int, bytes]:
    """Write a new log in the empty or missing directory ``path`` from verified entry bytes.

    Entries, nodes, index rows and head are written as the log's writer
    would have (same bytes, so same leaves and roots), then one block is
    sealed and signed by ``signer``. Returns the size and root.

    Raises:
        LocalProtocolError: ``path`` holds a log already.
        MalformedFrame: an entry does not decode (callers pass verified ones).
        AuditFull, StorageError: it could not be written.
    """
    environment = Environment.open(path, extra_databases=extra_databases)
    try:
        store = AuditStore(environment)
        with store.read() as txn:
            if store.head(txn).size:
                raise LocalProtocolError(f"{path} already holds an audit log")
        border = TreeBorder.empty()
        last_time = 0
        for start in range(0, len(entries), _CHUNK):
            chunk = entries[start : start + _CHUNK]
            with store.write() as txn:
                for raw in chunk:
                    entry = AuditEntry.from_bytes(raw)
                    last_time = max(last_time, entry.time_ms)
                    _put_entry(txn, store, border, entry, raw)
                _put_head(txn, store, border, last_time)
    finally:
        environment.close()
    with AuditLog.open(path, signer=signer, clock=clock, extra_databases=extra_databases) as log:
        if log.size:
            log.seal_block()
        return log.size, log.root()


def _put_entry(
    txn: lmdb.Transaction[bytes],
    store: AuditStore,
    border: TreeBorder,
    entry: AuditEntry,
    raw: bytes,
) -> None:
    seq = border.size
    leaf = leaf_hash(raw)
    put = txn.put
    put(u64(seq), leaf + raw, db=store.entries)
    # Leaf ``seq`` completes one perfect subtree per trailing 1 bit (as the writer).
    stack_before = list(border.stack)
    border.append(leaf)
    level, bits = 0, seq
    value = leaf
    while bits & 1:
        value = node_hash(stack_before.pop(), value)
        bits >>= 1
        level += 1
        put(_node_key(seq, level), value, db=store.nodes)
    record = prepare(entry.kind, entry.data, entry.peer)
    put(record.kind_key + u64(seq), b"", db=store.index)
    if record.peer_key is not None:
        put(record.peer_key + u64(seq), b"", db=store.index)


def _node_key(last_leaf: int, level: int) -> bytes:
    return u64(last_leaf) + bytes((level,))


def _put_head(
    txn: lmdb.Transaction[bytes], store: AuditStore, border: TreeBorder, time_ms: int
) -> None:
    put = txn.put
    put(b"format", u64(FORMAT_VERSION), db=store.meta)
    put(b"size", u64(border.size), db=store.meta)
    put(b"root", border.root(), db=store.meta)
    put(b"time", u64(time_ms), db=store.meta)
