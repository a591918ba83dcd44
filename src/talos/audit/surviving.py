"""Witness cosignatures that survive in a damaged audit log (docs/design/audit-recovery.md).

The cosignatures an agent received are its ``CHECKPOINT_COSIGNED`` audit
entries, in the very database ``rebuild --from-peers`` replaces. When that
database is damaged rather than gone, its intact prefix still holds them
(read as the local rebuild reads it: :func:`talos.audit.rebuild.read_intact`,
or page by page with :func:`~talos.audit.rebuild.salvage_intact` for a file
that must not be mapped). Each is the witness's own signature over a head of
the log: the caller checks it under the witness's key log
(:func:`talos.core.audit.head_query.check_cosigned`), so nothing of the
damaged file is trusted.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

from talos.audit.rebuild import read_intact, salvage_intact
from talos.core.audit.cosignature import Cosignature
from talos.core.audit.entry import AuditEntry, AuditKind
from talos.errors import MalformedFrame, TalosError, UnsupportedVersion
from talos.storage.lmdb import DATA_FILE

__all__ = ["MAX_KEPT", "Kept", "surviving_cosignatures"]

#: Most witnesses whose kept cosignature is looked at.
MAX_KEPT: Final = 16

#: (size, root, cosignature) of one witness's newest cosignature.
Kept = tuple[int, bytes, Cosignature]


def surviving_cosignatures(path: Path, *, mappable: bool) -> dict[str, Kept]:
    """The newest cosignature of each witness kept in the damaged log at ``path``
    (not yet checked). A file that cannot be read gives none, never an error."""
    if not (path / DATA_FILE).is_file():
        return {}
    try:
        if mappable:
            _, entries, _, close = read_intact(path)
            try:
                return _newest(entries)
            finally:
                close()
        return _newest(salvage_intact(path)[1])
    except TalosError:
        return {}


def _newest(entries: Iterable[bytes]) -> dict[str, Kept]:
    found: dict[str, Kept] = {}
    for raw in entries:
        try:
            entry = AuditEntry.from_bytes(raw)
        except (MalformedFrame, UnsupportedVersion):
            continue
        witness = entry.peer
        if entry.kind != AuditKind.CHECKPOINT_COSIGNED or witness is None:
            continue
        data = entry.data
        try:
            size, root = int(data["size"]), bytes(data["root"])
            cosig = Cosignature(witness, int(data["ks"]), int(data["ts"]), bytes(data["sig"]))
        except (KeyError, TypeError, ValueError):
            continue
        if len(root) != 32 or (witness not in found and len(found) >= MAX_KEPT):
            continue
        if witness not in found or size >= found[witness][0]:
            found[witness] = (size, root, cosig)
    return found
