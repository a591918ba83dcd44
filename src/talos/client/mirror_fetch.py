"""Fetching our audit log back from its mirrors, with the agent stopped (docs/design/mirrors.md).

``talos audit rebuild --from-peers`` runs this: the home's identity signs
FETCH envelopes (a mirror answers only the origin itself), each with a fresh
request id (``rq``) that the answer must echo, a link is opened
to each mirror over the real transport (:class:`talos.client.asking.Asking`:
only answers signed by the mirror count), and every stretch it serves goes
through :class:`talos.audit.peer_rebuild.PeerLog`, which keeps only what
verifies. A mirror that is unreachable, refuses, serves a tampered stretch or
stops short of what it says it holds is named (``mirror_invalid``,
``mirror_unreachable``) and the next one is tried; the longest verified
copy wins.

Mirrors are found through a :class:`~talos.peers.PeerDirectory` whose cache
is the key logs the capabilities store holds and whose source is the
registry (the agent's own peer cache lives in the audit environment, which
is the thing that is damaged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from talos.audit.peer_rebuild import MirrorInvalid, PeerLog
from talos.client.asking import AskFailed, Asking, Read, Rejected, look_up
from talos.core import mirror, wire
from talos.core.clock import Clock, time_ms
from talos.core.crypto import VerifyKey
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.rng import Rng
from talos.errors import (
    KeyLogInvalid,
    MalformedFrame,
    RemoteProtocolError,
    TalosError,
    UnsupportedVersion,
)
from talos.peers import PeerDirectory

__all__ = ["ANSWER_TIMEOUT", "FetchOutcome", "MemoryPeerCache", "fetch_from_mirrors"]

_log = logging.getLogger("talos.audit")

#: Seconds to wait for each answer of a mirror.
ANSWER_TIMEOUT: Final = 15.0


class MemoryPeerCache:
    """A :class:`~talos.peers.PeerCache` in memory, seeded with key logs held elsewhere."""

    def __init__(self, keylogs: Sequence[bytes] = ()) -> None:
        self._keylogs: dict[str, bytes] = {}
        self._records: dict[str, bytes] = {}
        for data in keylogs:
            try:
                self._keylogs[KeyLog.from_bytes(data).agent_id] = data
            except (MalformedFrame, UnsupportedVersion, KeyLogInvalid):
                continue

    def keylog(self, agent_id: str, /) -> bytes | None:
        return self._keylogs.get(agent_id)

    def put_keylog(self, agent_id: str, data: bytes, /) -> None:
        self._keylogs[agent_id] = data

    def peer_record(self, agent_id: str, /) -> bytes | None:
        return self._records.get(agent_id)

    def put_peer_record(self, record: bytes, /) -> None:
        return None

    def put_contact(self, agent_id: str, keylog: bytes, record: bytes | None, /) -> None:
        self._keylogs[agent_id] = keylog


@dataclass
class FetchOutcome:
    """What the mirrors gave: the best verified copy, and why the others were set aside."""

    best: PeerLog | None = None
    #: Every verified copy, longest first.
    copies: list[PeerLog] = field(default_factory=list)
    #: Every mirror tried: (mirror, entries verified, what went wrong or "ok").
    tried: list[tuple[str, int, str]] = field(default_factory=list)
    #: Mirrors that served something that does not verify (tampered, truncated).
    lying: list[str] = field(default_factory=list)


class _Unavailable(TalosError):
    """The mirror could not be used (unreachable, refused, silent)."""


class _Session:
    """Signed FETCHes to one mirror over one link (:class:`talos.client.asking.Asking`)."""

    def __init__(self, identity: Identity, asking: Asking, *, clock: Clock, rng: Rng) -> None:
        self._identity, self._asking = identity, asking
        self._clock, self._rng = clock, rng
        self._instance = wire.new_instance_id(rng)

    async def fetch(self, peer: str, start: int) -> mirror.Body:
        """The mirror's answer to a FETCH from ``start``: ENTRIES or REFUSED.

        Raises:
            _Unavailable: no answer within :data:`ANSWER_TIMEOUT`, or the link failed.
        """
        request = self._rng.bytes(mirror.REQUEST_ID_SIZE)
        body = mirror.Fetch(start, mirror.MAX_BATCH_ENTRIES, request)
        envelope = wire.Envelope(
            type=wire.EnvelopeType.MIRROR,
            message_id=wire.new_message_id(self._rng),
            sender=self._identity.agent_id,
            sender_instance=self._instance,
            recipient=peer,
            timestamp_ms=time_ms(self._clock),
            mirror_kind=mirror.MirrorKind.FETCH,
            mirror_body=mirror.encode_body(body),
        )
        frame = wire.seal(envelope, self._identity.signing_key)
        try:
            return await self._asking.ask(frame, _answering(request), within=ANSWER_TIMEOUT)
        except AskFailed as exc:
            raise _Unavailable(str(exc)) from None


def _answering(request: bytes) -> Read[mirror.Body]:
    """Reads a verified MIRROR answer to the FETCH ``request``: ENTRIES or REFUSED
    echoing its request id (other kinds are not answers); a body the mirror signed
    that does not decode is its own refusal, ``MALFORMED``.

    An answer echoing another id, or none, is rejected: a copy of the answer to an
    earlier FETCH (stale, or replayed by someone on the path) is not this one's.
    """

    def read(envelope: wire.Envelope) -> mirror.Body | None:
        kind = envelope.mirror_kind
        if kind is None or kind not in (mirror.MirrorKind.ENTRIES, mirror.MirrorKind.REFUSED):
            return None
        try:
            body = mirror.decode_body(kind, envelope.mirror_body or b"")
        except (RemoteProtocolError, UnsupportedVersion) as exc:
            return mirror.Refused(mirror.RefusalCode.MALFORMED, f"bad answer: {exc}"[:200])
        if body.request != request:
            raise Rejected("an answer to another request (a stale copy)")
        return body

    return read


async def _fetch_one(
    identity: Identity,
    peer: str,
    directory: PeerDirectory,
    origin_keys: Sequence[VerifyKey],
    *,
    clock: Clock,
    rng: Rng,
    current: int | None = None,
) -> PeerLog:
    """Everything ``peer`` holds of our log, verified.

    Raises:
        _Unavailable: not found, unreachable, refused or silent.
        MirrorInvalid: it served something that does not verify.
    """
    copy = PeerLog(identity.agent_id, peer, origin_keys, current=current)
    try:
        found = await look_up(directory, peer)
        async with Asking(
            found, me=identity.agent_id, kind=wire.EnvelopeType.MIRROR, clock=clock
        ) as asking:
            session = _Session(identity, asking, clock=clock, rng=rng)
            while True:
                answer = await session.fetch(peer, copy.size)
                if isinstance(answer, mirror.Refused):
                    if answer.code is mirror.RefusalCode.MALFORMED:
                        raise MirrorInvalid(peer, copy.size, answer.reason)
                    raise _Unavailable(f"refused: {answer.code} ({answer.reason})")
                assert isinstance(answer, mirror.Entries)  # noqa: S101 -- only these are read
                if not answer.entries:
                    if answer.held > copy.size:
                        raise MirrorInvalid(
                            peer, copy.size, f"says it holds {answer.held} but serves no more"
                        )
                    return copy
                copy.add(answer)
    except AskFailed as exc:
        raise _Unavailable(str(exc)) from None


async def fetch_from_mirrors(
    identity: Identity,
    mirrors: Sequence[str],
    directory: PeerDirectory,
    origin_keys: Sequence[VerifyKey],
    *,
    clock: Clock,
    rng: Rng,
    current: int | None = None,
) -> FetchOutcome:
    """Fetch our log from each of ``mirrors`` in turn; keep the longest verified copy.

    ``current`` is the sequence of our current key (``origin_keys[current]``):
    each copy records whether its newest checkpoint is signed by it
    (:attr:`PeerLog.retired_end`)."""
    outcome = FetchOutcome()
    for peer in mirrors:
        try:
            copy = await _fetch_one(
                identity, peer, directory, origin_keys, clock=clock, rng=rng, current=current
            )
        except MirrorInvalid as exc:
            outcome.lying.append(peer)
            outcome.tried.append((peer, exc.position, f"INVALID: {exc.what}"))
            _log.warning(
                "mirror %s served audit entries that do not verify (at entry %d): %s",
                peer,
                exc.position,
                exc.what,
                extra={"event": "mirror_invalid", "peer_id": peer, "position": exc.position},
            )
            continue
        except (_Unavailable, TalosError, OSError) as exc:
            outcome.tried.append((peer, 0, f"unavailable: {exc}"))
            _log.warning(
                "mirror %s could not be used: %s",
                peer,
                exc,
                extra={"event": "mirror_unreachable", "peer_id": peer},
            )
            continue
        outcome.tried.append((peer, copy.size, "ok"))
        outcome.copies.append(copy)
    outcome.copies.sort(key=lambda copy: -copy.size)
    outcome.best = outcome.copies[0] if outcome.copies else None
    return outcome
