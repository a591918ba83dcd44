"""What comes back for the messages an agent sent: ACKs and refusals.

An ACK names ids; those the outbox still holds for the sender are removed
one commit per batch of ACKs, with their MESSAGE_DELIVERED entries: a large
batch in a worker thread (LMDB releases the GIL while it syncs, so frames
arriving meanwhile are verified and decrypted instead of waiting behind the
fsync), a small one on the event-loop thread.
Only then are their senders released (persist before release). A signed
ERROR either asks for the message again (rule 3 of
:mod:`talos.core.delivery`) or refuses it for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable

from talos.audit import AuditKind
from talos.client.clocks import ClockWatch
from talos.client.sessions import Sessions
from talos.core import wire
from talos.core.clock import Clock
from talos.core.delivery import Delivery, Outcome, Pending
from talos.errors import LocalProtocolError, PeerRejected, TalosError
from talos.metrics import AgentMetrics
from talos.storage.agent_state import AgentState

_log = logging.getLogger("talos.client")

#: Batches of acknowledged messages smaller than this are removed from the outbox
#: on the event-loop thread (see Acknowledgements._removal_loop).
INLINE_REMOVALS = 8


class Acknowledgements:
    """Handles ACKs and ERRORs for this agent's messages."""

    def __init__(
        self,
        *,
        core: Delivery,
        state: AgentState,
        sessions: Sessions,
        metrics: AgentMetrics,
        clocks: ClockWatch,
        clock: Clock,
        finish: Callable[..., None],  # Deliverer.finish
        wake: Callable[[set[str]], None],
        closed: Callable[[], bool],
    ) -> None:
        self._core, self._state, self._sessions = core, state, sessions
        self._metrics, self._clocks, self._clock = metrics, clocks, clock
        self._finish, self._wake, self._closed = finish, wake, closed
        self._remover: asyncio.Task[None] | None = None

    def on_ack(self, envelope: wire.Envelope) -> None:
        """Note every id ``envelope`` acknowledges that we queued for its sender and
        still wait on; they are removed from the outbox together (see _removal_loop)."""
        fresh = [ref for ref in envelope.ref_ids or () if not self._core.being_removed(ref)]
        try:
            queued = self._state.queued_for(envelope.sender, fresh) if fresh else set()
        except LocalProtocolError:
            queued = set()  # not a peer id this agent could have queued for
        self._core.acked(envelope, [ref for ref in fresh if ref in queued])
        if self._core.has_removals() and not self._closed():
            if self._remover is None or self._remover.done():
                self._remover = asyncio.create_task(self._removal_loop())

    async def _removal_loop(self) -> None:
        """Remove acknowledged messages from the outbox, one commit per batch of ACKs,
        in a worker thread; ACKs that arrive meanwhile form the next batch.

        A batch of fewer than :data:`INLINE_REMOVALS` messages (the common case when
        messages go one at a time, as in a request and its answer) commits on this
        thread instead: the hand-over to a worker thread and back costs more CPU
        and GIL hand-offs than the fsync it would overlap, and there is nothing
        else to overlap it with (measured: benchmarks/README.md, "Paired runs,
        ninth session")."""
        while self._core.has_removals():
            acks = self._core.start_removal()
            if len(acks) < INLINE_REMOVALS:
                self._remove_now(acks)
                await asyncio.sleep(0)  # ACKs that arrived meanwhile form the next batch
                continue
            commit = asyncio.ensure_future(asyncio.to_thread(self._remove_acked, acks))
            try:
                # A thread cannot be cancelled: whatever happens to this task, the
                # outcome of its commit is acted on once it is known.
                await asyncio.wait({commit})
            except asyncio.CancelledError:
                commit.add_done_callback(functools.partial(self._removal_done, acks))
                raise
            self._removal_done(acks, commit)

    def _removal_done(self, acks: dict[bytes, wire.Envelope], commit: asyncio.Future[bool]) -> None:
        self._core.removal_committed()
        if commit.cancelled():
            removed = False
        elif (error := commit.exception()) is not None:
            _log.error("removing acknowledged messages failed: %r", error)
            removed = False
        else:
            removed = commit.result()
        self._after_removal(acks, removed=removed)

    def flush(self) -> None:
        """Remove the acknowledged messages not yet removed now, on this thread (close)."""
        if self._core.has_removals():
            self._remove_now(self._core.start_removal())

    def _remove_now(self, acks: dict[bytes, wire.Envelope]) -> None:
        """Commit the removal of ``acks`` on this thread and act on its outcome (a
        failure is handled as a worker thread's is, in :meth:`_removal_done`)."""
        try:
            removed = self._remove_acked(acks)
        except Exception as error:
            _log.error("removing acknowledged messages failed: %r", error)
            removed = False
        self._core.removal_committed()
        self._after_removal(acks, removed=removed)

    def _remove_acked(self, acks: dict[bytes, wire.Envelope]) -> bool:
        """One commit removing ``acks`` from the outbox with their audit entries."""
        try:
            self._state.remove_many(
                [
                    (
                        ref,
                        [
                            (
                                AuditKind.MESSAGE_DELIVERED,
                                {"id": ref, "status": int(ack.status or 0)},
                                ack.sender,
                            )
                        ],
                    )
                    for ref, ack in acks.items()
                ]
            )
        except TalosError as exc:
            # Still queued: the retry is answered DUPLICATE and removal is tried again.
            _log.warning("acknowledged messages not removed from the outbox: %s", exc)
            return False
        return True

    def _after_removal(self, acks: dict[bytes, wire.Envelope], *, removed: bool) -> None:
        """Release the senders of removed messages; wake the delivery loops either way."""
        if not removed:
            self._wake(self._core.removal_failed(acks))
            return
        by_ack: dict[int, tuple[wire.Envelope, list[Pending | None]]] = {}
        for ref, ack in acks.items():
            record = self._core.get(ref)
            self._finish(ref, Outcome.DELIVERED, None, peer=ack.sender)
            self._metrics.message_delivered()
            by_ack.setdefault(id(ack), (ack, []))[1].append(record)
        for ack, records in by_ack.values():
            try:
                self._delivered(ack, records)
            except TalosError as exc:  # removed and released already; the rest goes on
                _log.warning("after an ACK from %s: %s", ack.sender, exc)
        self._wake({ack.sender for ack, _ in by_ack.values()})

    def _delivered(self, ack: wire.Envelope, records: list[Pending | None]) -> None:
        """Note what an ACK (for messages removed and released) proves about the
        session and the peer's clock."""
        known = [record for record in records if record is not None]
        self._clocks.sample_ack(ack, [r.sent_at for r in known if r.sent_at is not None])
        handshakes: set[bytes | None] = {r.handshake for r in known}
        if len(known) < len(records):
            handshakes.add(None)
        self._sessions.confirm(ack.sender, handshakes)

    async def on_error(self, envelope: wire.Envelope) -> None:
        ref, peer = envelope.ref_id, envelope.sender
        if ref is None or not self._queued_for(ref, peer):
            return
        action = self._core.refused(ref, peer, envelope.error_code, self._clock.time())
        if action.reset_session:
            self._metrics.session_failed("peer_refused")
            self._metrics.session_reset()
            self._sessions.reset(peer, "peer could not decrypt")
        if not action.final:
            if action.retry:
                self._wake({peer})  # the delivery loop retries (with a fresh session)
            return
        code = envelope.error_code
        reason = envelope.reason or code.name if code else "refused"
        self._metrics.message_rejected(code or "other")
        self._state.remove(
            ref,
            audit=[(AuditKind.PEER_REJECTED, {"id": ref, "reason": str(reason)[:200]}, peer)],
        )
        self._finish(
            ref,
            Outcome.REFUSED,
            PeerRejected(f"{peer} refused the message: {reason}"),
            peer=peer,
            reason=f"refused by the peer: {reason}",
        )
        self._wake({peer})

    def _queued_for(self, ref: bytes, peer: str) -> bool:
        """Whether ``ref`` is a message we queued for ``peer`` and still wait on."""
        try:
            return self._state.is_queued_for(ref, peer)
        except LocalProtocolError:
            return False  # not an id (or peer id) this agent could have queued

    async def stop(self) -> None:
        """Let a removal in progress finish (its thread cannot be cancelled)."""
        if self._remover is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._remover)
