"""Audit mirrors on the wire: the bodies of MIRROR envelopes (docs/design/mirrors.md).

An agent may copy its audit entries to peers it chose (its *mirrors*); a
MIRROR envelope (:data:`talos.core.wire.EnvelopeType.MIRROR`) carries one
:class:`MirrorKind` and a body, a canonical CBOR map decoded here, strictly:

* ``BATCH`` (origin → mirror): entries ``start .. start+n`` of the origin's
  log, their raw bytes as the log hashed them, and the origin's signed
  checkpoint of the tree of ``start+n`` entries.
* ``ACK`` (mirror → origin): the mirror now holds ``size`` entries.
* ``FETCH`` (origin → mirror): entries from ``start``, at most ``limit``;
  answered only to the origin itself (the envelope is signed by its key).
* ``ENTRIES`` (mirror → origin): a stored stretch and the checkpoint that
  covers its end; ``held`` is how many entries the mirror holds in all.
* ``REFUSED`` (either way): a :class:`RefusalCode` and a short reason.

Every body may also carry ``rq``, a request id (:data:`REQUEST_ID_SIZE`
random bytes; 8..32 accepted): a request (BATCH, FETCH) names itself, and
its answer (ACK, ENTRIES, REFUSED) echoes the id inside its signed body, so
the asker drops any answer that matches no request it has outstanding (a
replayed or stale answer). The field is optional on decoding (a body without
it decodes as before, ``request=None``) and is added last.

Rules: every body is a versioned map with exactly its fields; counts and
sizes are bounded (:data:`MAX_BATCH_ENTRIES`, :data:`MAX_BODY_SIZE`);
anything else raises :class:`~talos.errors.MalformedFrame` (an unknown
version :class:`~talos.errors.UnsupportedVersion`). Nothing here verifies a
signature or a root: :mod:`talos.audit.mirror_store` and
:mod:`talos.audit.peer_rebuild` do, with :func:`leaves_root`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from talos.core.audit.checkpoint import MAX_NOTE_SIZE, Checkpoint
from talos.core.audit.entry import MAX_ENTRY_SIZE
from talos.core.audit.merkle import EMPTY_ROOT, fold_subtrees, leaf_hash, node_hash
from talos.core.encoding import canonical_dumps, check_versioned_map, strict_loads
from talos.errors import MalformedFrame

__all__ = [
    "BODY_VERSION",
    "MAX_BATCH_ENTRIES",
    "MAX_BODY_SIZE",
    "MAX_REASON",
    "REQUEST_ID_SIZE",
    "Ack",
    "Batch",
    "Body",
    "Entries",
    "Fetch",
    "MirrorKind",
    "Refused",
    "RefusalCode",
    "TreeBorder",
    "decode_body",
    "encode_body",
    "kind_of",
    "leaves_root",
    "with_request",
]

BODY_VERSION: Final = 1
#: Most entries one BATCH or ENTRIES body carries (128 x 4 KiB fits a frame).
MAX_BATCH_ENTRIES: Final = 128
#: Largest body: a full batch of the largest entries and a checkpoint note.
MAX_BODY_SIZE: Final = MAX_BATCH_ENTRIES * (MAX_ENTRY_SIZE + 8) + MAX_NOTE_SIZE + 256
#: Longest refusal reason, in characters.
MAX_REASON: Final = 200
_MAX_U64: Final = 2**64 - 1
#: Bytes of a request id this agent makes (``rq``); ids of 8..32 bytes are accepted.
REQUEST_ID_SIZE: Final = 16
_REQUEST_SIZES: Final = range(8, 33)


class MirrorKind(enum.IntEnum):
    """What a MIRROR envelope carries (key ``"mk"``)."""

    BATCH = 1
    ACK = 2
    FETCH = 3
    ENTRIES = 4
    REFUSED = 5


class RefusalCode(enum.StrEnum):
    """Why a mirror (or an origin) refused a MIRROR body."""

    QUOTA = "quota"  #: the origin's quota on this mirror is used up
    NOT_MIRRORING = "not_mirroring"  #: this agent does not mirror for that origin
    GAP = "gap"  #: the batch does not start at or before what is held
    INCONSISTENT = "inconsistent"  #: entries differ from held ones, or miss the root
    BAD_CHECKPOINT = "bad_checkpoint"  #: not the origin's, or its signature fails
    STALE = "stale"  #: a FETCH outside the freshness window, or seen before
    MALFORMED = "malformed"  #: the body does not decode
    UNAVAILABLE = "unavailable"  #: the mirror's store failed; try later


@dataclass(frozen=True, slots=True)
class Batch:
    start: int
    entries: tuple[bytes, ...]
    checkpoint: Checkpoint
    #: The request id: a request's own, or the one of the request answered.
    request: bytes | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    size: int
    #: The request id: a request's own, or the one of the request answered.
    request: bytes | None = None


@dataclass(frozen=True, slots=True)
class Fetch:
    start: int
    limit: int
    #: The request id: a request's own, or the one of the request answered.
    request: bytes | None = None


@dataclass(frozen=True, slots=True)
class Entries:
    start: int
    entries: tuple[bytes, ...]
    checkpoint: Checkpoint | None
    held: int
    #: The request id: a request's own, or the one of the request answered.
    request: bytes | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    code: RefusalCode
    reason: str
    #: The request id: a request's own, or the one of the request answered.
    request: bytes | None = None


Body = Batch | Ack | Fetch | Entries | Refused

_FIELDS: Final = {
    MirrorKind.BATCH: frozenset({"v", "start", "e", "cp"}),
    MirrorKind.ACK: frozenset({"v", "size"}),
    MirrorKind.FETCH: frozenset({"v", "start", "limit"}),
    MirrorKind.ENTRIES: frozenset({"v", "start", "e", "cp", "held"}),
    MirrorKind.REFUSED: frozenset({"v", "code", "why"}),
}
_KINDS: Final = {
    Batch: MirrorKind.BATCH,
    Ack: MirrorKind.ACK,
    Fetch: MirrorKind.FETCH,
    Entries: MirrorKind.ENTRIES,
    Refused: MirrorKind.REFUSED,
}


def kind_of(body: Body) -> MirrorKind:
    return _KINDS[type(body)]


def encode_body(body: Body) -> bytes:
    """The canonical CBOR of ``body`` (checked as a receiver would check it).

    Raises:
        MalformedFrame: a field is out of its bounds.
    """
    raw: dict[str, Any] = {"v": BODY_VERSION}
    if isinstance(body, Batch):
        raw.update(start=body.start, e=list(body.entries), cp=body.checkpoint.to_text().encode())
    elif isinstance(body, Ack):
        raw["size"] = body.size
    elif isinstance(body, Fetch):
        raw.update(start=body.start, limit=body.limit)
    elif isinstance(body, Entries):
        note = None if body.checkpoint is None else body.checkpoint.to_text().encode()
        raw.update(start=body.start, e=list(body.entries), cp=note, held=body.held)
    else:
        raw.update(code=str(body.code), why=body.reason)
    if body.request is not None:
        raw["rq"] = body.request
    data = canonical_dumps(raw)
    decode_body(kind_of(body), data)
    return data


def decode_body(kind: MirrorKind, data: bytes) -> Body:
    """Decode the body of a MIRROR envelope of ``kind``, strictly.

    Raises:
        MalformedFrame: not exactly a body of that kind within its bounds.
        UnsupportedVersion: another body version.
    """
    fields = _FIELDS.get(kind)
    if fields is None:
        raise MalformedFrame(f"unknown mirror kind {kind!r}")
    value = strict_loads(data, max_size=MAX_BODY_SIZE)
    if type(value) is dict and "rq" in value:
        fields = fields | {"rq"}
    raw = check_versioned_map(value, fields=fields, version=BODY_VERSION, what="mirror body")
    return with_request(_decode_fields(kind, raw), _request(raw.get("rq")))


def with_request(body: Body, request: bytes | None) -> Body:
    """``body`` carrying the request id ``request``."""
    return body if body.request == request else dataclasses.replace(body, request=request)


def _request(value: Any) -> bytes | None:
    if value is None:
        return None
    if type(value) is not bytes or len(value) not in _REQUEST_SIZES:
        raise MalformedFrame("mirror request id must be 8..32 bytes")
    return bytes(value)


def _decode_fields(kind: MirrorKind, raw: dict[str, Any]) -> Body:
    if kind is MirrorKind.BATCH:
        entries = _entries(raw["e"], minimum=1)
        start = _uint(raw["start"], "start", limit=_MAX_U64 - len(entries))
        checkpoint = _checkpoint(raw["cp"])
        if checkpoint.size != start + len(entries):
            raise MalformedFrame("a batch's checkpoint must cover exactly its last entry")
        return Batch(start, entries, checkpoint)
    if kind is MirrorKind.ACK:
        return Ack(_uint(raw["size"], "size"))
    if kind is MirrorKind.FETCH:
        limit = _uint(raw["limit"], "limit")
        if not 1 <= limit <= MAX_BATCH_ENTRIES:
            raise MalformedFrame(f"fetch limit must be 1..{MAX_BATCH_ENTRIES}")
        return Fetch(_uint(raw["start"], "start"), limit)
    if kind is MirrorKind.ENTRIES:
        return _decode_entries(raw)
    return _decode_refused(raw)


def _decode_entries(raw: dict[str, Any]) -> Entries:
    entries = _entries(raw["e"], minimum=0)
    start = _uint(raw["start"], "start", limit=_MAX_U64 - len(entries))
    held = _uint(raw["held"], "held")
    checkpoint = None if raw["cp"] is None else _checkpoint(raw["cp"])
    if entries and (checkpoint is None or checkpoint.size != start + len(entries)):
        raise MalformedFrame("served entries need the checkpoint covering their last one")
    if not entries and checkpoint is not None:
        raise MalformedFrame("an empty answer carries no checkpoint")
    if start + len(entries) > held:
        raise MalformedFrame("served entries go past what the mirror says it holds")
    return Entries(start, entries, checkpoint, held)


def _decode_refused(raw: dict[str, Any]) -> Refused:
    code, why = raw["code"], raw["why"]
    try:
        parsed = RefusalCode(code) if type(code) is str else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise MalformedFrame("unknown mirror refusal code")
    if type(why) is not str or len(why) > MAX_REASON or not why.isprintable():
        raise MalformedFrame(f"refusal reason must be printable text of at most {MAX_REASON}")
    return Refused(parsed, why)


def _uint(value: Any, name: str, *, limit: int = _MAX_U64) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise MalformedFrame(f"mirror {name} must be a uint64")
    return int(value)


def _entries(value: Any, *, minimum: int) -> tuple[bytes, ...]:
    if type(value) is not list or not minimum <= len(value) <= MAX_BATCH_ENTRIES:
        raise MalformedFrame(f"mirror entries must be a list of {minimum}..{MAX_BATCH_ENTRIES}")
    for item in value:
        if type(item) is not bytes or not 1 <= len(item) <= MAX_ENTRY_SIZE:
            raise MalformedFrame(f"each mirrored entry must be 1..{MAX_ENTRY_SIZE} bytes")
    return tuple(value)


def _checkpoint(value: Any) -> Checkpoint:
    if type(value) is not bytes:
        raise MalformedFrame("mirror checkpoint must be the signed note's bytes")
    return Checkpoint.parse(value)


# -- the tree of mirrored entries ---------------------------------------------------


@dataclass(slots=True)
class TreeBorder:
    """The right border of an RFC 9162 tree (its perfect subtrees, largest first).

    Enough to extend a tree leaf by leaf and to fold its root, so a mirror
    keeps O(log n) hashes per origin rather than re-reading every entry.
    """

    size: int
    stack: list[bytes]

    @classmethod
    def empty(cls) -> TreeBorder:
        return cls(0, [])

    def copy(self) -> TreeBorder:
        return TreeBorder(self.size, list(self.stack))

    def append(self, leaf: bytes) -> None:
        """Add the leaf hash of the next entry."""
        value, bits = leaf, self.size
        while bits & 1:
            value = node_hash(self.stack.pop(), value)
            bits >>= 1
        self.stack.append(value)
        self.size += 1

    def root(self) -> bytes:
        return fold_subtrees(self.stack) if self.stack else EMPTY_ROOT


def leaves_root(border: TreeBorder, entries: Sequence[bytes]) -> tuple[TreeBorder, bytes]:
    """Extend a copy of ``border`` by ``entries`` (raw entry bytes); the copy and its root."""
    grown = border.copy()
    for raw in entries:
        grown.append(leaf_hash(raw))
    return grown, grown.root()
