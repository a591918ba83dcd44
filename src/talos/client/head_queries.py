"""Asking witnesses which head of our audit log they hold, with the agent stopped.

``talos audit rebuild --from-peers`` runs this beside the mirror fetch
(:mod:`talos.client.mirror_fetch`): the home's identity signs a head query
(:mod:`talos.core.audit.head_query`: a CHECKPOINT envelope whose note is
``HEAD_QUERY``) to each witness, over the real transport; each answer is
checked under the witness's key log (the envelope, then the cosignature of
the head it names). A checked answer is a root of our log that someone
other than us vouches for: the rebuilt tree must have it at that size.
A witness that cannot be reached, holds no head of ours or answers
something that does not verify is named (``witness_head_unusable``) and
skipped: one witness's silence is never a reason to refuse the rebuild,
only the lack of any trust root is (docs/design/audit-recovery.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from talos.core import wire
from talos.core.audit.cosignature import Cosignature
from talos.core.audit.head_query import (
    HEAD_QUERY,
    NO_HEAD,
    WitnessedRoot,
    check_cosigned,
    check_head_answer,
)
from talos.core.clock import Clock, time_ms
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.replay import DEFAULT_MAX_SKEW_MS
from talos.core.rng import Rng
from talos.errors import (
    MalformedFrame,
    RemoteProtocolError,
    SignatureInvalid,
    TalosError,
    UnsupportedVersion,
)
from talos.peers import PeerDirectory
from talos.transport import Link, Transport

__all__ = ["ANSWER_TIMEOUT", "WitnessAnswers", "ask_witnesses", "check_kept"]

_log = logging.getLogger("talos.audit")

#: Seconds to wait for a witness's answer.
ANSWER_TIMEOUT: Final = 10.0
#: An answer must be signed no earlier than this before the query was sent: a
#: recorded older answer (an older head) replayed by someone on the path is ignored.
FRESH_MS: Final = DEFAULT_MAX_SKEW_MS
#: Most witnesses asked in one rebuild.
MAX_WITNESSES: Final = 16


@dataclass
class WitnessAnswers:
    """What the witnesses said: the heads they vouch for, and who could not help."""

    heads: list[WitnessedRoot] = field(default_factory=list)
    #: (witness, why) for each witness whose answer could not be used.
    unusable: list[tuple[str, str]] = field(default_factory=list)


class _Unusable(TalosError):
    """The witness's answer could not be used."""


class _Asker:
    def __init__(self, identity: Identity, peer: str, keys: KeyLog, rng: Rng) -> None:
        self._identity, self._peer, self._keys = identity, peer, keys
        self._rng = rng
        self.answer: asyncio.Future[wire.Envelope] = asyncio.get_running_loop().create_future()
        #: When the query was signed (Unix ms); answers older than it are not ours.
        self.asked_ms = 0

    async def on_frame(self, link: Link, frame: bytes) -> None:
        try:
            unverified = wire.decode(frame)
            if (
                unverified.type is not wire.EnvelopeType.COSIGNATURE
                or unverified.sender != self._peer
                or unverified.recipient != self._identity.agent_id
            ):
                return
            envelope = wire.verify(unverified, self._keys.state.signing_key)
        except (RemoteProtocolError, SignatureInvalid, UnsupportedVersion):
            return
        if envelope.timestamp_ms < self.asked_ms - FRESH_MS:
            return  # signed before we asked: a replayed answer, not this one
        if not self.answer.done():
            self.answer.set_result(envelope)

    def query(self, clock: Clock) -> bytes:
        self.asked_ms = time_ms(clock)
        envelope = wire.Envelope(
            type=wire.EnvelopeType.CHECKPOINT,
            message_id=wire.new_message_id(self._rng),
            sender=self._identity.agent_id,
            sender_instance=wire.new_instance_id(self._rng),
            recipient=self._peer,
            timestamp_ms=self.asked_ms,
            checkpoint_note=HEAD_QUERY,
            old_size=0,
            consistency=(),
        )
        return wire.seal(envelope, self._identity.signing_key)


async def _ask(
    identity: Identity, peer: str, directory: PeerDirectory, *, clock: Clock, rng: Rng
) -> WitnessedRoot:
    """The head of our log ``peer`` holds, checked.

    Raises:
        _Unusable: not found, unreachable, silent, holds none, or a bad answer.
    """
    try:
        keys = await directory.keylog(peer)
        record = await directory.endpoint(peer)
    except TalosError as exc:
        raise _Unusable(f"not found: {exc}") from None
    asker = _Asker(identity, peer, keys, rng)
    transport = Transport(asker.on_frame, clock=clock)
    try:
        try:
            link = await transport.connect(record.endpoint)
            await link.send(asker.query(clock))
            answer = await asyncio.wait_for(asker.answer, ANSWER_TIMEOUT)
        except TimeoutError:
            raise _Unusable(f"no answer within {ANSWER_TIMEOUT:.0f}s") from None
        except (TalosError, OSError) as exc:
            raise _Unusable(f"unreachable: {exc}") from None
    finally:
        await transport.close()
    if answer.cosign_status is not wire.CosignStatus.COSIGNED or answer.cosignature is None:
        if answer.reason == NO_HEAD:
            raise _Unusable(f"holds no head of our log ({NO_HEAD})")
        raise _Unusable(f"refused: {answer.reason or 'no reason given'}")
    try:
        head = check_head_answer(
            identity.agent_id,
            keys,
            answer.tree_size or 0,
            answer.tree_root or b"",
            answer.cosignature,
        )
    except (MalformedFrame, SignatureInvalid) as exc:
        raise _Unusable(f"its cosignature does not verify: {exc}") from None
    if head.cosignature.timestamp * 1000 < asker.asked_ms - FRESH_MS:
        raise _Unusable("its cosignature was made before we asked (a replayed answer)")
    return head


async def ask_witnesses(
    identity: Identity,
    witnesses: Sequence[str],
    directory: PeerDirectory,
    *,
    clock: Clock,
    rng: Rng,
) -> WitnessAnswers:
    """Ask each of ``witnesses`` (at most :data:`MAX_WITNESSES`, at once) for the
    head of our log it holds; keep the answers that verify."""
    asked = [w for w in dict.fromkeys(witnesses) if w != identity.agent_id][:MAX_WITNESSES]
    results = await asyncio.gather(
        *(_ask(identity, peer, directory, clock=clock, rng=rng) for peer in asked),
        return_exceptions=True,
    )
    out = WitnessAnswers()
    for peer, result in zip(asked, results, strict=True):
        if isinstance(result, WitnessedRoot):
            out.heads.append(result)
            continue
        why = str(result) if isinstance(result, TalosError) else f"failed: {result!r}"
        out.unusable.append((peer, why))
        _log.warning(
            "witness %s could not vouch for a head of our audit log: %s",
            peer,
            why,
            extra={"event": "witness_head_unusable", "peer_id": peer, "reason": why},
        )
    return out


async def check_kept(
    identity: Identity,
    kept: Mapping[str, tuple[int, bytes, Cosignature]],
    directory: PeerDirectory,
) -> WitnessAnswers:
    """Check the cosignatures kept in the damaged log (:mod:`talos.audit.surviving`)
    under each witness's key log; keep those that verify."""
    out = WitnessAnswers()
    for witness, (size, root, cosig) in kept.items():
        try:
            keys = await directory.keylog(witness)
            out.heads.append(check_cosigned(identity.agent_id, keys, size, root, cosig))
        except TalosError as exc:
            why = f"its cosignature kept in the damaged log: {exc}"
            out.unusable.append((witness, why))
            _log.warning(
                "witness %s could not vouch for a head of our audit log: %s",
                witness,
                why,
                extra={"event": "witness_head_unusable", "peer_id": witness, "reason": why},
            )
    return out
