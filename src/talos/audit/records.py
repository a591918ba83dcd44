"""Records on their way into the audit log: checked and encoded before any lock is taken.

A record is ``(kind, data, peer)``. :func:`prepare` validates it and encodes
everything of the entry that does not depend on its sequence number or time
(:func:`talos.core.audit.entry.entry_middle`), plus the prefixes of its index
rows, so a bad record fails only its own caller and the write transaction
does no validation at all.

Imported by the modules of :mod:`talos.audit`; :class:`AuditRecord` is public
(``talos.audit.AuditRecord``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

from talos.audit.store import index_key
from talos.core.audit.entry import check_kind, check_peer, encode_data, entry_middle

__all__ = ["AuditRecord", "PreparedRecord", "prepare"]


class AuditRecord(NamedTuple):
    """One entry to append: what :meth:`AuditLog.append_many` takes."""

    kind: str
    data: Mapping[str, Any]
    peer: str | None = None


class PreparedRecord(NamedTuple):
    """A validated record: its seq-independent bytes and its index key prefixes."""

    middle: bytes
    kind_key: bytes
    peer_key: bytes | None


def prepare(kind: str, data: Mapping[str, Any], peer: str | None) -> PreparedRecord:
    """Validate and encode a record before any lock is taken (worst-case size check).

    Raises:
        LocalProtocolError: invalid kind, peer or data.
    """
    # The caches below take plain text: anything else (an AuditKind, a bad
    # type) is checked, and turned into a plain ``str`` or refused, first.
    if type(kind) is not str:
        kind = check_kind(kind)
    if peer is not None and type(peer) is not str:
        peer = check_peer(peer)
    kind, kind_key = _kind_key(kind)
    peer_key = None
    if peer is not None:
        peer, peer_key = _peer_key(peer)
    return PreparedRecord(entry_middle(kind, peer, encode_data(data)), kind_key, peer_key)


# A process logs few kinds and a bounded working set of peers: checking and
# encoding each once saves a regex match and two key encodings per append.
@functools.lru_cache(maxsize=256)
def _kind_key(kind: str) -> tuple[str, bytes]:
    """The checked kind (a plain ``str``) and its index key prefix."""
    kind = check_kind(kind)
    return kind, index_key(b"k", kind, 0)[:-8]


@functools.lru_cache(maxsize=4096)
def _peer_key(peer: str) -> tuple[str, bytes]:
    """The checked peer (a plain ``str``) and its index key prefix."""
    check_peer(peer)
    peer = str(peer)
    return peer, index_key(b"p", peer, 0)[:-8]
