"""The session table: one owner for every ratchet session an agent holds.

A session with a peer is in one of three states, and only this table knows
which:

1. *Committed and confirmed*: durable, and the peer holds it too (it
   acknowledged a message sent in it). Messages carry no X3DH header.
2. *Committed, awaiting confirmation*: this agent opened it with X3DH and
   no ACK to a message sent with that handshake has arrived yet. Every
   message repeats the handshake (:attr:`SessionEntry.handshake`), and only
   an ACK to a message sent with *this* handshake confirms it (the session
   may have been reset and opened again since).
3. *Staged*: a received message advanced the session in memory, and the
   group commit that makes it durable has not run yet. Later messages from
   the same sender decrypt with the staged successor (so a batch chains),
   but nothing is sent with it: readers that send go through
   :meth:`SessionTable.committed` after the owner of the batch commits.

The table does no I/O. Its owner persists what :meth:`record` encodes, in
the same transaction as whatever else the change belongs to, then calls the
matching method here (persist before use: a session is never used to
encrypt before its state is durable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from talos.core.encoding import canonical_dumps, strict_versioned_map
from talos.core.ratchet import Session
from talos.core.rng import Rng
from talos.errors import MalformedFrame

__all__ = ["SessionEntry", "SessionTable", "decode_record", "encode_record"]

#: Fields of a stored session record (format version 1).
RECORD_FIELDS: Final = frozenset({"v", "s", "x"})
_MAX_RECORD: Final = 16 << 20


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """A committed session and, until the peer confirms it, the X3DH header that
    opened it (``None`` once confirmed, or for a session the peer opened)."""

    session: Session
    handshake: bytes | None = None

    @property
    def confirmed(self) -> bool:
        return self.handshake is None


def encode_record(entry: SessionEntry) -> bytes:
    """The stored form of ``entry`` (what the agent state seals and keeps)."""
    return canonical_dumps({"v": 1, "s": entry.session.to_bytes(), "x": entry.handshake})


def decode_record(data: bytes, rng: Rng) -> SessionEntry:
    """Parse a stored session record.

    Raises:
        MalformedFrame, UnsupportedVersion: not a session record.
    """
    raw = strict_versioned_map(
        data, max_size=_MAX_RECORD, fields=RECORD_FIELDS, version=1, what="session record"
    )
    if type(raw["s"]) is not bytes or not (raw["x"] is None or type(raw["x"]) is bytes):
        raise MalformedFrame("session record fields have the wrong types")
    return SessionEntry(Session.from_bytes(raw["s"], rng=rng), raw["x"])


class SessionTable:
    """Committed, awaiting-confirmation and staged sessions, by peer agent id.

    The committed map is a cache of the durable records: a peer missing from
    it may still have a stored session, which the owner loads and hands to
    :meth:`commit`.
    """

    __slots__ = ("_committed", "_staged")

    def __init__(self) -> None:
        self._committed: dict[str, SessionEntry] = {}
        self._staged: dict[str, Session] = {}

    # -- committed sessions ------------------------------------------------------------

    def committed(self, peer: str) -> SessionEntry | None:
        """The committed session with ``peer`` if it is cached (not the staged one)."""
        return self._committed.get(peer)

    def commit(self, peer: str, entry: SessionEntry) -> None:
        """``entry`` is durable now: it is the session with ``peer``."""
        self._committed[peer] = entry

    def drop(self, peer: str) -> None:
        """Forget ``peer``'s session (reset): committed and staged."""
        self._committed.pop(peer, None)
        self._staged.pop(peer, None)

    def confirmable(self, peer: str, handshakes: set[bytes | None]) -> SessionEntry | None:
        """The confirmed form of ``peer``'s session if an ACK to messages sent with
        ``handshakes`` confirms it, else ``None`` (nothing changes until the owner
        persists it and calls :meth:`commit`)."""
        entry = self._committed.get(peer)
        if entry is None or entry.handshake is None or entry.handshake not in handshakes:
            return None
        return SessionEntry(entry.session, None)

    def awaiting_confirmation(self, peer: str) -> bool:
        entry = self._committed.get(peer)
        return entry is not None and entry.handshake is not None

    def for_fast_send(self, peer: str) -> SessionEntry | None:
        """The session to encrypt with on the send fast path: committed and not
        advanced by a receive that is not committed yet. It may still await
        confirmation: then each message carries its handshake, one at a time."""
        entry = self._committed.get(peer)
        if entry is None or peer in self._staged:
            return None
        return entry

    # -- staged sessions -----------------------------------------------------------------

    def stage(self, peer: str, session: Session) -> None:
        """A received message advanced ``peer``'s session in memory (not durable yet)."""
        self._staged[peer] = session

    def staged(self, peer: str) -> Session | None:
        return self._staged.get(peer)

    def take_staged(self) -> dict[str, Session]:
        """Hand the staged sessions to the group commit (they are no longer staged)."""
        staged, self._staged = self._staged, {}
        return staged

    def discard_staged(self) -> None:
        """Forget staged sessions whose commit will not happen (they are decrypted again
        from the committed state when the senders retry)."""
        self._staged = {}
