"""Asking one peer: a fresh link, one signed frame, the first verified answer, a deadline.

Three parts of Talos ask a peer a question outside any session, each over a
link of its own that lives for the question only: the head query of
``rebuild --from-peers`` (:mod:`talos.client.head_queries`), the FETCHes of
the same rebuild (:mod:`talos.client.mirror_fetch`, several questions on one
link) and the PRESENCE challenge of ``diagnose --check-duplicates``
(:mod:`talos.cli.diagnose.presence`). This module is that exchange, once.

Rules, in order, for every frame that arrives on the link:

1. A frame is an *answer* only if it decodes, is of the expected envelope
   type, comes from :attr:`Peer.agent_id` to the asker, and its signature
   verifies under :attr:`Peer.keys` (the current key). Anything else is set
   aside: never accepted, its reason kept (at most :data:`MAX_SET_ASIDE`).
2. The caller's ``read`` judges each answer: it returns the result, ``None``
   (not an answer to this question: ignored), or raises :class:`Rejected`
   (an answer that fails the question's own checks: set aside, reason kept).
3. The first answer ``read`` accepts is returned. A frame set aside never
   ends the wait: a frame injected by someone on the path cannot pre-empt
   the real answer, only the deadline ends it (:class:`NoAnswer`,
   which carries what was set aside, so a caller may still tell "silent"
   from "answered, wrongly").
4. The link is closed when the exchange ends, however it ends.

A *replayed* answer (a genuine frame of the peer, from an earlier exchange)
is refused only if ``read`` ties answers to the question: the mirror fetch
and PRESENCE do (the request id, the nonce); the witness head query only
requires an answer signed no earlier than the allowed clock skew (60 s)
before the query, so an answer the witness gave within that minute can be
replayed ahead of the real one (it names a true, possibly older, head; see
:mod:`talos.client.head_queries`).

Errors are typed (:class:`AskFailed` and its three kinds); their messages
name the peer's failure for an operator, never a secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self, TypeVar

from talos.core import wire
from talos.core.clock import Clock
from talos.core.keylog import KeyLog
from talos.errors import (
    RemoteProtocolError,
    SignatureInvalid,
    TalosError,
    UnsupportedVersion,
)
from talos.peers import PeerDirectory
from talos.transport import Link, Transport

__all__ = [
    "MAX_SET_ASIDE",
    "AskFailed",
    "Asking",
    "NoAnswer",
    "NotFound",
    "Peer",
    "Read",
    "Rejected",
    "Unreachable",
    "ask_once",
    "look_up",
]

T = TypeVar("T")

#: Frames waiting to be judged on one link; more are dropped (a flood is not an answer).
QUEUE_SIZE: Final = 16
#: Reasons kept of the frames set aside on one link.
MAX_SET_ASIDE: Final = 8


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is asked: whose answers count (``agent_id``, ``keys``) and where (``endpoint``)."""

    agent_id: str
    keys: KeyLog
    endpoint: str


class AskFailed(TalosError):
    """The question got no usable answer; ``str()`` says why, for an operator."""


class NotFound(AskFailed):
    """The peer's key log or endpoint could not be found."""


class Unreachable(AskFailed):
    """The link could not be opened, or the question not sent."""


class NoAnswer(AskFailed):
    """No answer was accepted before the deadline.

    Attributes:
        timeout: the seconds waited.
        set_aside: why each frame that came instead was not accepted (empty: silence).
    """

    def __init__(self, timeout: float, set_aside: tuple[str, ...]) -> None:
        self.timeout, self.set_aside = timeout, set_aside
        text = f"no answer within {timeout:.0f}s"
        if set_aside:
            text += f" ({len(set_aside)} set aside: {set_aside[0]})"
        super().__init__(text)


class Rejected(TalosError):
    """Raised by a ``read``: a verified answer that fails the question's own checks."""


#: Judges a verified answer: the result, ``None`` to ignore it, or :class:`Rejected`.
Read = Callable[[wire.Envelope], T | None]


async def look_up(directory: PeerDirectory, agent_id: str) -> Peer:
    """``agent_id``'s verified key log and its endpoint.

    Raises:
        NotFound: either could not be found (the message says why).
    """
    try:
        keys = await directory.keylog(agent_id)
        record = await directory.endpoint(agent_id)
    except TalosError as exc:
        raise NotFound(f"not found: {exc}") from None
    return Peer(agent_id, keys, record.endpoint)


class Asking:
    """One link to one peer, for questions of one envelope type (``async with``).

    ``me`` is the asker's agent id: answers must be addressed to it.
    """

    def __init__(self, peer: Peer, *, me: str, kind: wire.EnvelopeType, clock: Clock) -> None:
        self._peer, self._me, self._kind = peer, me, kind
        self._transport = Transport(self._on_frame, clock=clock)
        self._link: Link | None = None
        self._answers: asyncio.Queue[wire.Envelope] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._set_aside: list[str] = []

    async def __aenter__(self) -> Self:
        """Open the link.

        Raises:
            Unreachable: it could not be opened.
        """
        try:
            self._link = await self._transport.connect(self._peer.endpoint)
        except (TalosError, OSError) as exc:
            await self._transport.close()
            raise Unreachable(f"unreachable: {exc}") from None
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._transport.close()

    @property
    def set_aside(self) -> tuple[str, ...]:
        """Why each frame set aside on this link so far was not accepted."""
        return tuple(self._set_aside)

    async def ask(self, frame: bytes, read: Read[T], *, within: float) -> T:
        """Send ``frame`` (sealed by the caller) and return what ``read`` makes of the
        first answer it accepts.

        Raises:
            Unreachable: the frame could not be sent.
            NoAnswer: nothing accepted within ``within`` seconds.
        """
        if self._link is None:
            raise Unreachable("unreachable: the link is not open")
        try:
            await self._link.send(frame)
        except (TalosError, OSError) as exc:
            raise Unreachable(f"unreachable: {exc}") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                envelope = await asyncio.wait_for(self._answers.get(), deadline - loop.time())
            except TimeoutError:
                raise NoAnswer(within, self.set_aside) from None
            try:
                result = read(envelope)
            except Rejected as exc:
                self._aside(f"{type(exc).__name__}: {exc}")
                continue
            if result is not None:
                return result

    async def _on_frame(self, link: Link, frame: bytes) -> None:
        """Rule 1: queue a frame that is a verified answer, set aside anything else."""
        try:
            unverified = wire.decode(frame)
            if unverified.type is not self._kind:
                raise RemoteProtocolError(f"answered with a {unverified.type.name} frame")
            if unverified.sender != self._peer.agent_id or unverified.recipient != self._me:
                raise RemoteProtocolError("an envelope between other agents")
            envelope = wire.verify(unverified, self._peer.keys.state.signing_key)
        except (RemoteProtocolError, SignatureInvalid, UnsupportedVersion) as exc:
            self._aside(f"{type(exc).__name__}: {exc}")
            return
        if not self._answers.full():
            self._answers.put_nowait(envelope)

    def _aside(self, why: str) -> None:
        if len(self._set_aside) < MAX_SET_ASIDE:
            self._set_aside.append(why)


async def ask_once(
    peer: Peer,
    frame: bytes,
    read: Read[T],
    *,
    me: str,
    kind: wire.EnvelopeType,
    within: float,
    clock: Clock,
) -> T:
    """Open a link to ``peer``, send ``frame``, return the first answer ``read``
    accepts (rules 1-3 of this module), close the link.

    Raises:
        Unreachable: the link could not be opened or the frame not sent.
        NoAnswer: nothing accepted within ``within`` seconds.
    """
    async with Asking(peer, me=me, kind=kind, clock=clock) as asking:
        return await asking.ask(frame, read, within=within)
