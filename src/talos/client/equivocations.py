"""Equivocations already on the record, and the witnesses an origin stopped sending to.

(docs/design/witnesses.md, "The same conflict again".) An equivocation is
identified by the role that saw it, the peer, and the head the witness holds
(``held_size``, ``held_root``): as long as that head stands, every later
checkpoint of a restored or forked log conflicts with it again, and nothing
new is learnt. So:

* :meth:`Equivocations.first` is True only the first time a conflict is seen
  (then it is audited, counted and alerted on); a repeat is counted apart
  and logged at most once a minute per peer. The memory is the log itself:
  the ``AUDIT_EQUIVOCATION`` entries (``role``, ``held_size``,
  ``held_root``), read once, so a restart does not audit the same conflict
  again.
* :meth:`Equivocations.paused` says whether an origin must not send its
  checkpoints to a witness: the witness holds a head of our log (recorded in
  an ``AUDIT_EQUIVOCATION`` entry of role ``origin``) that the log we hold
  does not contain. The pause ends by itself once the log contains that head
  again (e.g. after ``talos audit rebuild --from-peers`` brought back the
  witnessed history).
"""

from __future__ import annotations

from typing import Any

from talos.audit import AuditKind, AuditLog
from talos.errors import TalosError
from talos.logs import LimitedLog

__all__ = ["Equivocations", "explain_pause"]

#: role, peer, held size, held root
_Key = tuple[str, str, int, bytes]


class Equivocations:
    """The equivocations this agent recorded, read once from its audit log."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self._known: set[_Key] | None = None
        #: Per witness, the head of our log it holds that our log does not contain.
        self._conflicts: dict[str, tuple[int, bytes]] = {}

    def _load(self) -> set[_Key]:
        if self._known is None:
            known: set[_Key] = set()
            try:
                entries = self._log.query(kind=AuditKind.AUDIT_EQUIVOCATION)
            except TalosError:
                entries = []
            for entry in entries:
                key = _key(entry.data, entry.peer)
                if key is not None:
                    known.add(key)
                    if key[0] == "origin":
                        self._conflicts[key[1]] = (key[2], key[3])
            self._known = known
        return self._known

    def first(self, peer: str, fields: dict[str, Any]) -> bool:
        """Whether this conflict (``fields``: role, held_size, held_root) is new;
        it is remembered from now on."""
        key = _key(fields, peer)
        known = self._load()
        if key is None or key in known:
            return False
        known.add(key)
        return True

    def pause(self, witness: str, held_size: int, held_root: bytes) -> bool:
        """Stop sending to ``witness`` while our log lacks its head; whether this is
        a new pause (to be explained once in the log)."""
        self._load()
        new = self._conflicts.get(witness) != (held_size, held_root)
        self._conflicts[witness] = (held_size, held_root)
        return new

    def paused(self, witness: str) -> bool:
        """Whether our checkpoints must not go to ``witness`` (see the module doc)."""
        self._load()
        conflict = self._conflicts.get(witness)
        if conflict is None:
            return False
        size, root = conflict
        try:
            resolved = size <= self._log.size and self._log.root_at(size) == root
        except TalosError:
            resolved = False
        if resolved:
            del self._conflicts[witness]
        return not resolved


def explain_pause(logs: LimitedLog, witness: str, held_size: int, reason: str) -> None:
    """The one line that says why our checkpoints no longer go to ``witness``."""
    logs.warning(
        "witness_conflict_paused",
        "no longer sending audit checkpoints to witness %s: it cosigned our log at "
        "size %d, which the log we hold does not contain (%s). If this log was "
        "restored from an older backup, `talos audit rebuild --from-peers` brings "
        "back the witnessed history from the mirrors; sending resumes by itself "
        "once the log contains that head (docs/operations.md, Audit equivocation)",
        witness,
        held_size,
        reason,
        source=witness,
        peer_id=witness,
        held_size=held_size,
    )


def _key(data: Any, peer: str | None) -> _Key | None:
    role, size, root = data.get("role"), data.get("held_size"), data.get("held_root")
    if peer is None or type(role) is not str or type(size) is not int or type(root) is not bytes:
        return None
    return role, peer, size, root
