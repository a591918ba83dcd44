"""Asking witnesses which head of our audit log they hold, with the agent stopped.

``talos audit rebuild --from-peers`` runs this beside the mirror fetch
(:mod:`talos.client.mirror_fetch`): the home's identity signs a head query
(:mod:`talos.core.audit.head_query`: a CHECKPOINT envelope whose note is
``HEAD_QUERY``) to each witness, over the real transport; each answer is
checked under the witness's key log (the envelope, then the cosignature of
the head it names; the exchange is :func:`talos.client.asking.ask_once`).
A checked answer is a root of our log that someone other than us vouches
for: the rebuilt tree must have it at that size.
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

from talos.client.asking import AskFailed, Read, Rejected, ask_once, look_up
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
from talos.core.replay import DEFAULT_MAX_SKEW_MS
from talos.core.rng import Rng
from talos.errors import MalformedFrame, SignatureInvalid, TalosError
from talos.peers import PeerDirectory

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


def _query(identity: Identity, peer: str, rng: Rng, asked_ms: int) -> bytes:
    """The signed head query to ``peer``, as of ``asked_ms``."""
    envelope = wire.Envelope(
        type=wire.EnvelopeType.CHECKPOINT,
        message_id=wire.new_message_id(rng),
        sender=identity.agent_id,
        sender_instance=wire.new_instance_id(rng),
        recipient=peer,
        timestamp_ms=asked_ms,
        checkpoint_note=HEAD_QUERY,
        old_size=0,
        consistency=(),
    )
    return wire.seal(envelope, identity.signing_key)


def _fresh(asked_ms: int) -> Read[wire.Envelope]:
    """Accept an answer signed no earlier than :data:`FRESH_MS` before ``asked_ms``."""

    def read(envelope: wire.Envelope) -> wire.Envelope:
        if envelope.timestamp_ms < asked_ms - FRESH_MS:
            raise Rejected("signed before we asked: a replayed answer, not this one")
        return envelope

    return read


async def _ask(
    identity: Identity, peer: str, directory: PeerDirectory, *, clock: Clock, rng: Rng
) -> WitnessedRoot:
    """The head of our log ``peer`` holds, checked.

    Raises:
        _Unusable: not found, unreachable, silent, holds none, or a bad answer.
    """
    try:
        found = await look_up(directory, peer)
        asked_ms = time_ms(clock)
        answer = await ask_once(
            found,
            _query(identity, peer, rng, asked_ms),
            _fresh(asked_ms),
            me=identity.agent_id,
            kind=wire.EnvelopeType.COSIGNATURE,
            within=ANSWER_TIMEOUT,
            clock=clock,
        )
    except AskFailed as exc:
        raise _Unusable(str(exc)) from None
    if answer.cosign_status is not wire.CosignStatus.COSIGNED or answer.cosignature is None:
        if answer.reason == NO_HEAD:
            raise _Unusable(f"holds no head of our log ({NO_HEAD})")
        raise _Unusable(f"refused: {answer.reason or 'no reason given'}")
    try:
        head = check_head_answer(
            identity.agent_id,
            found.keys,
            answer.tree_size or 0,
            answer.tree_root or b"",
            answer.cosignature,
        )
    except (MalformedFrame, SignatureInvalid) as exc:
        raise _Unusable(f"its cosignature does not verify: {exc}") from None
    if head.cosignature.timestamp * 1000 < asked_ms - FRESH_MS:
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
