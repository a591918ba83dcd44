"""Peers as witnesses of each other's audit logs (docs/design/witnesses.md).

Two roles, both in every agent:

1. **Origin.** On every link it opens, once on every incoming link a peer's
   frame verified on, and periodically to the peers configured as
   ``witnesses``, the agent sends a CHECKPOINT envelope: its newest signed
   checkpoint and the RFC 9162 consistency proof from the last size that peer
   cosigned (nothing when that peer already cosigned the current size). A
   COSIGNATURE answer is checked (the checkpoint we sent, the witness's key
   from its key log) and stored as a ``CHECKPOINT_COSIGNED`` audit entry. A
   conflict answer is read against our own log
   (:func:`~talos.core.audit.cosignature.origin_conflict`): ``stale`` is
   retried once from the witness's size; anything else means the witness
   accepted a head of our log that is not a head of the log we hold:
   ``AUDIT_EQUIVOCATION``, logged, counted.
2. **Witness.** A CHECKPOINT from a peer (its envelope verified under the
   peer's key log) is rate-limited per origin, parsed, its origin must be the
   sender's own log, its signature must verify under the sender's current
   key, and it is judged against the head stored for that origin
   (:func:`~talos.core.audit.cosignature.judge`). The new head is stored
   durably first, then cosigned (clone, then commit: a refused or failed
   checkpoint changes nothing). An equivocation is audited, logged, counted
   and answered with the head we hold.

   Heads are kept for at most ``witness_max_origins`` origins (one record of
   at most :data:`~talos.core.audit.cosignature.MAX_WITNESSED_RECORD` bytes
   each): a new origin past the cap takes the place of the stranger whose head
   was accepted longest ago; peers we have a session with and our configured
   witnesses are never evicted; when every head is theirs a new stranger is
   refused ``witness_full``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from talos.audit import AuditKind, AuditLog
from talos.client.control import Auditor, Signer
from talos.client.equivocations import Equivocations, explain_pause
from talos.client.head_answers import HeadAnswers
from talos.client.own_keys import OwnIdentity, audit_signer
from talos.client.timing import sleep
from talos.client.witness_heads import WitnessHeads
from talos.core import wire
from talos.core.audit.checkpoint import Checkpoint
from talos.core.audit.cosignature import (
    Accepted,
    Cosignature,
    Refused,
    WitnessedHead,
    judge,
    origin_conflict,
    origin_of,
)
from talos.core.audit.head_query import HEAD_QUERY
from talos.core.clock import Clock
from talos.core.keylog import KeyLog
from talos.core.ratelimit import RateLimiter
from talos.errors import MalformedFrame, SignatureInvalid, TalosError
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.storage.tokens import TokenStore
from talos.transport import Link

__all__ = ["WITNESS_BURST", "WITNESS_INTERVAL", "WITNESS_RATE", "Witnessing"]

_log = logging.getLogger("talos.client")

#: Checkpoints a witness accepts per origin: a burst, then this many per second.
WITNESS_BURST: Final = 4
WITNESS_RATE: Final = 4 / 60
#: Seconds between rounds to the configured witnesses (and the first retry delay).
WITNESS_INTERVAL: Final = 60.0
_RETRY: Final = 2.0
_NO_ROOT: Final = bytes(32)
#: Seconds an unanswered checkpoint is not sent again to the same peer.
_PENDING: Final = 30.0
#: Longest run of our own CHECKPOINT_COSIGNED entries looked at by _quiet().
_QUIET_SPAN: Final = 64


class Witnessing:
    """Sends this agent's checkpoints to witnesses and witnesses its peers' logs."""

    def __init__(
        self,
        *,
        own: OwnIdentity,
        log: AuditLog,
        tokens: TokenStore,
        signer: Signer,
        auditor: Auditor,
        metrics: AgentMetrics,
        clock: Clock,
        connect: Callable[[str], Awaitable[Link]],
        witnesses: tuple[str, ...] = (),
        max_origins: int = 1024,
        session_peers: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self._own, self._log, self._tokens = own, log, tokens
        self._signer, self._auditor, self._metrics, self._clock = signer, auditor, metrics, clock
        self._connect = connect
        self.witnesses = tuple(w for w in witnesses if w != own.agent_id)
        #: The largest size of our log each witness cosigned (loaded from the log).
        self._cosigned: dict[str, int] | None = None
        #: The checkpoint last sent to each peer, and whether a stale answer was retried.
        self._sent: dict[str, Checkpoint] = {}
        self._sent_at: dict[str, float] = {}
        self._retried: set[str] = set()
        self._answered: weakref.WeakSet[Link] = weakref.WeakSet()
        self._limit = RateLimiter(rate=WITNESS_RATE, burst=WITNESS_BURST)
        self._logs = LimitedLog(_log, clock)
        #: Equivocations on the record (audited once each) and witnesses we stopped
        #: sending to; repeats are logged at most once a minute per peer.
        self._equivocations = Equivocations(log)
        self._repeats = LimitedLog(_log, clock, per_source=(1 / 60, 1))
        self._heads = WitnessHeads(
            tokens,
            metrics,
            self._logs,
            max_origins=max_origins,
            protected=lambda: frozenset((*session_peers(), *self.witnesses)),
        )
        self._head_answers = HeadAnswers(
            own=own,
            tokens=tokens,
            clock=clock,
            answer=self._answer,
            metrics=metrics,
        )

    # -- origin: sending our checkpoints ------------------------------------------------

    def cosigned_sizes(self) -> dict[str, int]:
        """The largest size of our log each witness cosigned (read once from the log)."""
        if self._cosigned is None:
            sizes: dict[str, int] = {}
            for entry in self._log.query(kind=AuditKind.CHECKPOINT_COSIGNED):
                if entry.peer is not None:
                    sizes[entry.peer] = max(sizes.get(entry.peer, 0), int(entry.data["size"]))
            self._cosigned = sizes
        return self._cosigned

    async def offer(self, link: Link, peer: str, *, old: int | None = None) -> None:
        """Send our newest checkpoint to ``peer`` on ``link`` unless it cosigned it already."""
        if peer == self._own.agent_id:
            return
        size = self._log.size
        if old is None:
            if self._equivocations.paused(peer):
                _log.debug("not offering our checkpoint to %s: it holds a head we lack", peer)
                return
            old = self.cosigned_sizes().get(peer, 0)
            if size == 0 or old == size or self._pending(peer, size) or self._quiet(old, size):
                return
        if old > size:
            old = 0  # our log is shorter than what the witness cosigned: it will say so
        checkpoint = Checkpoint.sign(audit_signer(self._own.current), size, self._log.root_at(size))
        proof = self._log.prove_consistency(old, size).hashes if 0 < old < size else ()
        self._sent[peer] = checkpoint
        self._sent_at[peer] = self._clock.monotonic()
        await self._signer.send(
            link,
            peer,
            wire.EnvelopeType.CHECKPOINT,
            checkpoint_note=checkpoint.to_text().encode("utf-8"),
            old_size=old,
            consistency=tuple(proof),
        )

    def _pending(self, peer: str, size: int) -> bool:
        """A checkpoint of ``size`` went to ``peer`` recently and is not answered yet."""
        sent = self._sent.get(peer)
        if sent is None or sent.size != size:
            return False
        return self._clock.monotonic() - self._sent_at.get(peer, 0.0) < _PENDING

    def _quiet(self, old: int, size: int) -> bool:
        """Whether entries ``old..size`` are only our own CHECKPOINT_COSIGNED records
        (cosigning those would add one more each time: nothing new to witness)."""
        if not 0 < old < size or size - old > _QUIET_SPAN:
            return False
        return all(e.kind == AuditKind.CHECKPOINT_COSIGNED for e in self._log.entries(old, size))

    async def offer_safely(self, link: Link, peer: str, *, old: int | None = None) -> None:
        """:meth:`offer`, for paths that must go on without it (link set-up, the
        receive path): a log that cannot be read is logged, not raised."""
        try:
            await self.offer(link, peer, old=old)
        except TalosError as exc:
            _log.warning("audit checkpoint not offered to %s: %s", peer, exc)

    async def answer(self, link: Link, sender: str) -> None:
        """A frame from ``sender`` verified on ``link``: offer our checkpoint once on an
        incoming link (a link we opened gets it once the messages waiting for it
        are out, see Deliverer.on_settled)."""
        if link.outgoing or link in self._answered:
            return
        self._answered.add(link)
        await self.offer_safely(link, sender)

    async def run(self, closed: Callable[[], bool]) -> None:
        """Offer our checkpoint to every configured witness, every :data:`WITNESS_INTERVAL`."""
        delay = _RETRY
        while not closed():
            failed = False
            for peer in self.witnesses:
                try:
                    await self.offer(await self._connect(peer), peer)
                except TalosError as exc:
                    failed = True
                    self._logs.warning(
                        "witness_unreachable",
                        "witness %s not reached: %s",
                        peer,
                        exc,
                        source=peer,
                        peer_id=peer,
                    )
            delay = min(WITNESS_INTERVAL, delay * 2) if failed else WITNESS_INTERVAL
            await sleep(self._clock, delay)

    async def on_cosignature(self, link: Link, envelope: wire.Envelope, held: KeyLog) -> None:
        """A witness answered a checkpoint we sent (``held``: its verified key log)."""
        witness = envelope.sender
        sent = self._sent.get(witness)
        if sent is None or (sent.size, sent.root) != (envelope.tree_size, envelope.tree_root):
            _log.debug("ignoring an unsolicited cosignature answer from %s", witness)
            return
        status = envelope.cosign_status
        if status is wire.CosignStatus.COSIGNED:
            self._store_cosignature(sent, envelope, held)
        elif status is wire.CosignStatus.CONFLICT:
            try:
                await self._conflict(link, sent, envelope)
            except TalosError as exc:
                _log.warning("conflict answer of %s not read: %s", witness, exc)
        else:
            self._sent.pop(witness, None)
            self._logs.log(
                logging.INFO,
                "cosignature_refused",
                "witness %s refused our checkpoint of size %d: %s",
                witness,
                sent.size,
                envelope.reason,
                source=witness,
                peer_id=witness,
                reason=envelope.reason,
            )

    def _store_cosignature(self, sent: Checkpoint, envelope: wire.Envelope, held: KeyLog) -> None:
        witness = envelope.sender
        try:
            cosig = Cosignature.from_bytes(envelope.cosignature or b"")
            key = held.key_at(cosig.key_sequence)
            if cosig.witness != witness or key is None or held.revoked(cosig.key_sequence):
                raise SignatureInvalid("not signed by a valid key of the witness")
            cosig.verify(sent.body(), key)
        except (MalformedFrame, SignatureInvalid) as exc:
            self._metrics.checkpoint_refused("bad_cosignature")
            if isinstance(exc, SignatureInvalid):
                self._metrics.signature_failed("bad_signature", "cosignature")
            self._logs.warning(
                "cosignature_refused",
                "refusing the cosignature %s sent for our checkpoint of size %d: %s",
                witness,
                sent.size,
                exc,
                source=witness,
                peer_id=witness,
                reason="bad_cosignature",
            )
            return
        self._sent.pop(witness, None)
        self._retried.discard(witness)
        data = {
            "size": sent.size,
            "root": sent.root,
            "ks": cosig.key_sequence,
            "ts": cosig.timestamp,
            "sig": cosig.signature,
        }
        self._auditor.audit(AuditKind.CHECKPOINT_COSIGNED, data, witness)
        sizes = self.cosigned_sizes()
        sizes[witness] = max(sizes.get(witness, 0), sent.size)
        self._metrics.checkpoint_cosigned("origin")
        _log.info(
            "witness %s cosigned our audit checkpoint of size %d",
            witness,
            sent.size,
            extra={"event": "cosignature_received", "peer_id": witness, "size": sent.size},
        )

    async def _conflict(self, link: Link, sent: Checkpoint, envelope: wire.Envelope) -> None:
        witness = envelope.sender
        held_size, held_root = envelope.held_size or 0, envelope.held_root
        size = self._log.size
        ours = self._log.root_at(held_size) if held_size <= size else None
        reason = origin_conflict(size, ours, held_size, held_root)
        if reason == "stale":
            if witness not in self._retried:
                self._retried.add(witness)
                await self.offer_safely(link, witness, old=held_size)
            return
        self._sent.pop(witness, None)
        fields: dict[str, Any] = {
            "role": "origin",
            "reason": reason,
            "size": sent.size,
            "root": sent.root,
            "held_size": held_size,
            "held_root": held_root or _NO_ROOT,
        }
        text = (
            "witness %s holds a head of OUR audit log at size %d that is not in the log we "
            "hold (%s): our log was rolled back or rewritten, or our key signed another log"
        )
        self._equivocation(witness, fields, text, witness, held_size, reason)
        if self._equivocations.pause(witness, held_size, held_root or _NO_ROOT):
            explain_pause(self._logs, witness, held_size, reason)

    def _equivocation(self, peer: str, fields: dict[str, Any], text: str, *args: Any) -> None:
        role = fields["role"]
        if not self._equivocations.first(peer, fields):
            # The same conflict (same peer, same held head) again: on the record already.
            self._metrics.equivocation_repeated(role)
            self._repeats.log(
                logging.INFO,
                "audit_equivocation_repeated",
                "the equivocation with %s (role %s, held size %d) was seen again; "
                "recorded the first time, counted since",
                peer,
                role,
                fields["held_size"],
                source=peer,
                peer_id=peer,
                role=role,
            )
            return
        self._metrics.equivocation(role)
        self._auditor.audit_noisy(AuditKind.AUDIT_EQUIVOCATION, fields, peer)
        loggable: dict[str, Any] = {
            k: v.hex() if isinstance(v, bytes) else v for k, v in fields.items()
        }
        self._logs.log(
            logging.ERROR,
            "audit_equivocation",
            text,
            *args,
            source=peer,
            peer_id=peer,
            **loggable,
        )

    # -- witness: judging our peers' checkpoints ------------------------------------------

    async def on_checkpoint(self, link: Link, envelope: wire.Envelope, held: KeyLog) -> None:
        """A peer sent its checkpoint (the envelope verified under ``held``)."""
        if envelope.checkpoint_note == HEAD_QUERY:  # rebuild --from-peers asks what we hold
            await self._head_answers.answer(link, envelope)
            return
        origin = envelope.sender
        try:
            checkpoint = Checkpoint.parse(envelope.checkpoint_note or b"")
            if checkpoint.origin != origin_of(origin):
                raise MalformedFrame("a peer may only submit checkpoints of its own audit log")
        except MalformedFrame as exc:
            await self._refuse(link, envelope, None, "invalid", str(exc))
            return
        if not self._limit.allow(origin, self._clock.monotonic()):
            await self._refuse(link, envelope, checkpoint, "rate_limited", "too many checkpoints")
            return
        try:
            checkpoint.verify(held.state.signing_key, origin)
        except SignatureInvalid as exc:
            self._metrics.signature_failed("bad_signature", "checkpoint")
            await self._refuse(link, envelope, checkpoint, "bad_signature", str(exc))
            return
        try:
            stored = self._tokens.witnessed(origin)
            before = None if stored is None else WitnessedHead.from_bytes(stored)
        except (TalosError, MalformedFrame) as exc:
            await self._refuse(link, envelope, checkpoint, "storage", f"witness store: {exc}")
            return
        now_ms = int(self._clock.time() * 1000)
        outcome = judge(
            before,
            checkpoint,
            envelope.old_size or 0,
            envelope.consistency or (),
            now_ms=now_ms,
            sent_ms=envelope.timestamp_ms,
        )
        if isinstance(outcome, Refused):
            await self._conflict_found(link, envelope, checkpoint, outcome)
            return
        await self._cosign(link, envelope, checkpoint, outcome, new=before is None)

    async def _cosign(
        self,
        link: Link,
        envelope: wire.Envelope,
        checkpoint: Checkpoint,
        outcome: Accepted,
        *,
        new: bool = False,
    ) -> None:
        origin = envelope.sender
        if outcome.grew:
            try:
                stored = self._heads.store(origin, outcome.head.to_bytes(), new=new)
            except TalosError as exc:
                await self._refuse(link, envelope, checkpoint, "storage", "witness store full")
                _log.warning("checkpoint of %s not stored: %s", origin, exc)
                return
            if not stored:
                detail = "this witness keeps heads for its peers only at the moment"
                await self._refuse(link, envelope, checkpoint, "witness_full", detail)
                return
        identity = self._own.current
        cosig = Cosignature.sign(
            checkpoint.body(),
            witness=identity.agent_id,
            key_sequence=identity.sequence,
            key=identity.signing_key,
            timestamp=int(self._clock.time()),
        )
        self._metrics.checkpoint_cosigned("witness")
        _log.info(
            "cosigned the audit checkpoint of %s at size %d",
            origin,
            checkpoint.size,
            extra={"event": "checkpoint_cosigned", "peer_id": origin, "size": checkpoint.size},
        )
        await self._answer(
            link, envelope, checkpoint, wire.CosignStatus.COSIGNED, outcome.head, "", cosig
        )

    async def _conflict_found(
        self, link: Link, envelope: wire.Envelope, checkpoint: Checkpoint, outcome: Refused
    ) -> None:
        origin, held = envelope.sender, outcome.held
        self._metrics.checkpoint_refused(outcome.reason)
        if outcome.equivocation:
            fields: dict[str, Any] = {
                "role": "witness",
                "reason": outcome.reason,
                "size": checkpoint.size,
                "root": checkpoint.root,
                "held_size": held.size,
                "held_root": held.root,
            }
            text = (
                "%s signed a checkpoint of its audit log at size %d that is not consistent "
                "with the one we cosigned at size %d (%s): its log was rolled back or forked"
            )
            args = (origin, checkpoint.size, held.size, outcome.reason)
            self._equivocation(origin, fields, text, *args)
        else:
            self._logs.log(
                logging.INFO,
                "checkpoint_refused",
                "asking %s for a proof from size %d (it proved from %d)",
                origin,
                held.size,
                envelope.old_size,
                source=origin,
                peer_id=origin,
                reason=outcome.reason,
            )
        await self._answer(
            link, envelope, checkpoint, wire.CosignStatus.CONFLICT, held, outcome.reason
        )

    async def _refuse(
        self,
        link: Link,
        envelope: wire.Envelope,
        checkpoint: Checkpoint | None,
        reason: str,
        detail: str,
    ) -> None:
        """Refuse a checkpoint without judging it: nothing is stored."""
        origin = envelope.sender
        self._metrics.checkpoint_refused(reason)
        self._logs.warning(
            "checkpoint_refused",
            "refusing the checkpoint %s sent: %s (%s)",
            origin,
            reason,
            detail,
            source=origin,
            peer_id=origin,
            reason=reason,
        )
        await self._answer(link, envelope, checkpoint, wire.CosignStatus.REFUSED, None, reason)

    async def _answer(
        self,
        link: Link,
        envelope: wire.Envelope,
        checkpoint: Checkpoint | None,
        status: wire.CosignStatus,
        held: WitnessedHead | None,
        reason: str,
        cosig: Cosignature | None = None,
    ) -> None:
        await self._signer.send(
            link,
            envelope.sender,
            wire.EnvelopeType.COSIGNATURE,
            tree_size=0 if checkpoint is None else checkpoint.size,
            tree_root=_NO_ROOT if checkpoint is None else checkpoint.root,
            cosign_status=status,
            held_size=0 if held is None else held.size,
            held_root=None if held is None else held.root,
            cosignature=None if cosig is None else cosig.to_bytes(),
            reason=reason,
        )
