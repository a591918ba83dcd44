"""Audit mirrors in a running agent: copying our log out, keeping others' (docs/design/mirrors.md).

Two roles, one driver:

* **Origin.** For each peer in ``audit_config["mirror_to"]`` a loop sends our
  entries from what that mirror acknowledged, in batches of at most
  :data:`~talos.core.mirror.MAX_BATCH_ENTRIES`, each with a checkpoint of
  the tree at its end signed by our current key, over a link this agent
  opened, and waits for the ACK. The acknowledged size is persisted per
  mirror (:meth:`MirrorStore.set_progress`), so a restart resumes there;
  ``talos_audit_mirror_lag_entries{mirror}`` is how far behind it is (read at each scrape). A
  refusal is logged (``mirror_batch_refused``) and counted; a mirror that
  lost what it held (``gap``) is sent everything again. Each BATCH carries a
  fresh random request id (``rq``) and only an answer echoing the id of the
  batch outstanding to that mirror counts: a replayed or stale ACK/REFUSED
  is dropped, counted and logged (``mirror_answer_unmatched``).
* **Mirror**, only for the origins its operator listed
  (``audit_config["mirror_for"]``, ``talos run --audit-mirror-for``): a BATCH
  from a listed peer whose key log we verified is checked and stored by
  :meth:`MirrorStore.accept` (quota per origin, ``mirror_quota_mb``; 0 turns
  the role off); answered ACK or REFUSED, echoing its request id. Any other
  origin is refused ``not_mirroring`` (logged, counted). A BATCH or FETCH is
  answered only when fresh: its timestamp within :data:`FETCH_FRESHNESS`
  seconds and its envelope id not seen before, so a captured one replayed
  gets ``stale``. A FETCH is answered only to its signer about its own log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Final

from talos.audit import AuditLog, Checkpoint
from talos.audit.mirror_store import MirrorRefused, MirrorStore
from talos.audit.store import EntryPruned
from talos.client.control import Signer
from talos.client.own_keys import OwnIdentity, audit_signer
from talos.client.timing import sleep, wait_first
from talos.core import mirror, wire
from talos.core.clock import Clock, time_ms
from talos.core.keylog import KeyLog
from talos.core.rng import Rng
from talos.errors import MalformedFrame, TalosError, UnsupportedVersion
from talos.logs import LimitedLog
from talos.metrics import AgentMetrics
from talos.transport import Link

__all__ = ["ACK_TIMEOUT", "FETCH_FRESHNESS", "POLL_INTERVAL", "Mirroring"]

_log = logging.getLogger("talos.audit")

#: Seconds between looks at whether our log grew past what a mirror holds.
POLL_INTERVAL: Final = 1.0
#: Seconds to wait for a mirror's answer to a batch.
ACK_TIMEOUT: Final = 15.0
#: Longest wait between retries to an unreachable or refusing mirror.
MAX_BACKOFF: Final = 60.0
#: A FETCH older or newer than this many seconds is refused as stale.
FETCH_FRESHNESS: Final = 120.0
_SEEN_FETCHES: Final = 4096


class Mirroring:
    """Sends our audit log to the mirrors we chose; keeps and serves the logs of others."""

    def __init__(
        self,
        *,
        own: OwnIdentity,
        log: AuditLog,
        store: MirrorStore,
        mirror_to: Sequence[str],
        serve: bool,
        mirror_for: Sequence[str] = (),
        rng: Rng | None = None,
        signer: Signer,
        link: Callable[[str], Awaitable[Link]],
        metrics: AgentMetrics,
        clock: Clock,
        closed: Callable[[], bool],
    ) -> None:
        self._own, self._log, self._store = own, log, store
        self._mirror_to = tuple(dict.fromkeys(m for m in mirror_to if m != own.agent_id))
        self._serve, self._signer, self._link = serve, signer, link
        self._metrics, self._clock, self._closed = metrics, clock, closed
        #: The origins this agent agreed to mirror for (its operator's list).
        self._mirror_for = frozenset(mirror_for)
        self._rng = rng
        #: Batches outstanding: request id -> (the mirror asked, its answer to come).
        self._waiting: dict[bytes, tuple[str, asyncio.Future[mirror.Body]]] = {}
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._logs = LimitedLog(_log, clock)
        self._tasks: list[asyncio.Task[None]] = []
        if self._mirror_to:
            # From construction on (before the anchoring driver's first pruning step):
            # what the mirrors have not acknowledged keeps its payload.
            log.hold_pruning(self.mirrored_everywhere)

    def start(self) -> None:
        """Start one loop per chosen mirror. A mirror recorded as holding more than the
        log has (the log was restored or rebuilt shorter) is taken back to the log's
        size: it will refuse the new history as ``inconsistent`` (its copy is evidence
        of what was lost), and pruning never counts on entries it does not hold."""
        for peer in self._mirror_to:
            if self._store.progress(peer) > self._log.size:
                self._store.set_progress(peer, self._log.size)
            self._metrics.track_mirror_lag(peer, partial(self._lag, peer))
            self._tasks.append(asyncio.create_task(self._run(peer), name=f"talos-mirror-{peer}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    # -- origin -----------------------------------------------------------------------

    def _lag(self, peer: str) -> int:
        """``talos_audit_mirror_lag_entries{mirror=peer}``, read at each scrape."""
        return max(0, self._log.size - self._store.progress(peer))

    def mirrored_everywhere(self) -> int:
        """The size every chosen mirror has acknowledged (the smallest), never more than
        the log holds."""
        acked = min(self._store.progress(peer) for peer in self._mirror_to)
        return min(acked, self._log.size)

    async def _run(self, peer: str) -> None:
        backoff = 1.0
        while not self._closed():
            acked = self._store.progress(peer)
            size = self._log.size  # the lag is read at each scrape (_lag)
            if size <= acked:
                await sleep(self._clock, POLL_INTERVAL)
                continue
            try:
                answer = await self._send_batch(peer, acked, size)
            except EntryPruned as exc:
                # Pruned before this mirror held it (pruning for space ignores the
                # mirrors): it can never catch up from here. Said, not retried in a loop.
                self._logs.warning(
                    "mirror_behind_pruning",
                    "audit mirror %s cannot catch up: entries from %d were pruned before it "
                    "acknowledged them (%s); choose another mirror or accept the gap",
                    peer,
                    acked,
                    exc,
                    source=peer,
                    peer_id=peer,
                )
                await sleep(self._clock, MAX_BACKOFF)
                continue
            except (TalosError, OSError) as exc:
                self._logs.warning(
                    "mirror_unreachable",
                    "audit mirror %s not reached (retrying in %.0fs): %s",
                    peer,
                    backoff,
                    exc,
                    source=peer,
                    peer_id=peer,
                )
                answer = None
            end = min(size, acked + mirror.MAX_BATCH_ENTRIES)  # what the batch covered
            wait = self._follow(peer, acked, answer, end)
            if wait:
                await sleep(self._clock, backoff if wait < 0 else wait)
                backoff = min(backoff * 2, MAX_BACKOFF)
            else:
                backoff = 1.0

    def _follow(self, peer: str, acked: int, answer: mirror.Body | None, end: int) -> float:
        """Act on a mirror's answer; 0 to go on at once, else seconds to wait (-1: backoff).

        An ACK counts only for what the batch covered (``acked`` to ``end``): a replayed
        or bogus one can neither move the progress back nor past entries this batch
        sent (which pruning would then drop); a mirror that already held more is
        credited with the batch's end, and the next batch goes on from there.
        """
        if isinstance(answer, mirror.Ack) and answer.size < acked:
            self._logs.warning(
                "mirror_batch_refused",
                "audit mirror %s acknowledged size %d for a batch from %d: ignored",
                peer,
                answer.size,
                acked,
                source=peer,
                peer_id=peer,
                code="bad_ack",
            )
            return -1
        if isinstance(answer, mirror.Ack):
            done = min(answer.size, end)
            self._store.set_progress(peer, done)
            self._metrics.mirror_batch_sent()
            return 0 if done > acked else -1
        if isinstance(answer, mirror.Refused):
            self._metrics.mirror_batch_refused_by_peer(answer.code)
            self._logs.warning(
                "mirror_batch_refused",
                "audit mirror %s refused our batch from entry %d: %s (%s)",
                peer,
                acked,
                answer.code,
                answer.reason,
                source=peer,
                peer_id=peer,
                code=str(answer.code),
            )
            if answer.code is mirror.RefusalCode.GAP:
                self._store.set_progress(peer, 0)  # it lost what it held: send it all again
                return 0
            return MAX_BACKOFF if answer.code is mirror.RefusalCode.QUOTA else -1
        return -1

    async def _send_batch(self, peer: str, start: int, size: int) -> mirror.Body | None:
        end = min(size, start + mirror.MAX_BATCH_ENTRIES)
        entries = tuple(entry.to_bytes() for entry in self._log.entries(start, end))
        checkpoint = Checkpoint.sign(audit_signer(self._own.current), end, self._log.root_at(end))
        request = self._request_id()
        body = mirror.Batch(start, entries, checkpoint, request)
        link = await self._link(peer)
        answer: asyncio.Future[mirror.Body] = asyncio.get_running_loop().create_future()
        self._waiting[request] = (peer, answer)
        try:
            await self._send(link, peer, body)
            await wait_first(self._clock, self._clock.monotonic() + ACK_TIMEOUT, [answer])
            return answer.result() if answer.done() else None
        finally:
            self._waiting.pop(request, None)
            answer.cancel()

    def _request_id(self) -> bytes:
        if self._rng is None:
            raise TalosError("mirroring our log needs a source of randomness")
        return self._rng.bytes(mirror.REQUEST_ID_SIZE)

    def _answered(self, sender: str, body: mirror.Ack | mirror.Refused) -> None:
        """An ACK or REFUSED from ``sender``: it settles the batch whose request id it
        echoes, if that batch went to ``sender`` and is still outstanding; any other
        answer (replayed, stale, for a batch already settled, or with no id) is
        dropped, counted and logged."""
        waiting = None if body.request is None else self._waiting.get(body.request)
        if waiting is not None and waiting[0] == sender and not waiting[1].done():
            waiting[1].set_result(body)
            return
        self._metrics.mirror_answer_unmatched()
        self._logs.warning(
            "mirror_answer_unmatched",
            "dropping a mirror answer from %s that matches no batch we sent it: %s",
            sender,
            "no request id" if body.request is None else "unknown or settled request id",
            source=sender,
            peer_id=sender,
        )

    async def _send(self, link: Link, peer: str, body: mirror.Body) -> None:
        await self._signer.send(
            link,
            peer,
            wire.EnvelopeType.MIRROR,
            mirror_kind=mirror.kind_of(body),
            mirror_body=mirror.encode_body(body),
        )

    # -- every MIRROR envelope ----------------------------------------------------------

    async def on_mirror(self, link: Link, envelope: wire.Envelope, keys: KeyLog) -> None:
        """A MIRROR envelope whose signature verified under ``keys`` (its sender's log)."""
        sender = envelope.sender
        kind = envelope.mirror_kind
        try:
            assert kind is not None  # noqa: S101 -- wire.decode fills it for MIRROR
            body = mirror.decode_body(kind, envelope.mirror_body or b"")
        except (MalformedFrame, UnsupportedVersion) as exc:
            self._metrics.mirror_batch_refused("malformed")
            self._logs.warning(
                "mirror_malformed",
                "malformed mirror body from %s: %s",
                sender,
                exc,
                source=sender,
                peer_id=sender,
            )
            if kind in (mirror.MirrorKind.BATCH, mirror.MirrorKind.FETCH):
                await self._refuse(link, sender, mirror.RefusalCode.MALFORMED, str(exc))
            return
        if isinstance(body, mirror.Batch):
            await self._keep(link, envelope, body, keys)
        elif isinstance(body, mirror.Fetch):
            await self._answer_fetch(link, envelope, body)
        elif isinstance(body, mirror.Ack | mirror.Refused):
            self._answered(sender, body)
        # ENTRIES only ever answer `talos audit rebuild --from-peers`: ignored here.

    async def _refuse(
        self,
        link: Link,
        peer: str,
        code: mirror.RefusalCode,
        why: str,
        request: bytes | None = None,
    ) -> None:
        reason = "".join(c for c in why if c.isprintable())[: mirror.MAX_REASON] or str(code)
        await self._send(link, peer, mirror.Refused(code, reason, request))

    def _fresh(self, envelope: wire.Envelope) -> bool:
        """Whether a request envelope is fresh: sent within :data:`FETCH_FRESHNESS`
        seconds of our clock and its id not seen before (then remembered)."""
        age = abs(time_ms(self._clock) - envelope.timestamp_ms) / 1000
        seen = envelope.sender.encode() + envelope.message_id
        if age > FETCH_FRESHNESS or seen in self._seen:
            return False
        self._seen[seen] = None
        while len(self._seen) > _SEEN_FETCHES:
            self._seen.popitem(last=False)
        return True

    def _refusal(self, sender: str) -> tuple[mirror.RefusalCode, str] | None:
        """Why a BATCH from ``sender`` is refused before it is looked at, if it is."""
        if not self._serve:
            return mirror.RefusalCode.NOT_MIRRORING, "this agent keeps no mirrors"
        if sender not in self._mirror_for:
            return (
                mirror.RefusalCode.NOT_MIRRORING,
                "this agent does not mirror for you: its operator must list your agent id "
                "(talos run --audit-mirror-for, audit_config mirror_for)",
            )
        return None

    async def _keep(
        self, link: Link, envelope: wire.Envelope, batch: mirror.Batch, keys: KeyLog
    ) -> None:
        sender, request = envelope.sender, batch.request
        refusal = self._refusal(sender)
        if refusal is None and not self._fresh(envelope):
            refusal = mirror.RefusalCode.STALE, "stale or replayed batch"
        if refusal is not None:
            self._metrics.mirror_batch_refused(refusal[0])
            self._logs.warning(
                "mirror_batch_refused",
                "refusing the audit batch %s sent from entry %d: %s (%s)",
                sender,
                batch.start,
                refusal[0],
                refusal[1],
                source=sender,
                peer_id=sender,
                code=str(refusal[0]),
            )
            await self._refuse(link, sender, *refusal, request)
            return
        held = self._store.origin(sender).size
        try:
            size = await asyncio.to_thread(
                self._store.accept, sender, batch, keys.state.signing_key
            )
        except MirrorRefused as exc:
            self._metrics.mirror_batch_refused(exc.code)
            if "not signed" in exc.reason:  # mirror_store: the checkpoint's signature fails
                self._metrics.signature_failed("bad_signature", "mirror_batch")
            self._logs.warning(
                "mirror_batch_refused",
                "refusing the audit batch %s sent from entry %d: %s (%s)",
                sender,
                batch.start,
                exc.code,
                exc.reason,
                source=sender,
                peer_id=sender,
                code=str(exc.code),
            )
            await self._refuse(link, sender, exc.code, exc.reason, request)
            return
        except TalosError as exc:
            self._logs.warning(
                "mirror_store_failed",
                "could not store the audit batch of %s: %s",
                sender,
                exc,
                source=sender,
                peer_id=sender,
            )
            await self._refuse(
                link, sender, mirror.RefusalCode.UNAVAILABLE, "store failed", request
            )
            return
        if size > held:
            link.mark_verified(sender)  # a verified, new batch: the origin holds this link
            self._metrics.mirror_batch_stored(size - held)
            _log.info(
                "holding %d audit entries of %s (%d new)",
                size,
                sender,
                size - held,
                extra={"event": "mirror_batch_stored", "peer_id": sender, "size": size},
            )
        await self._send(link, sender, mirror.Ack(size, request))

    async def _answer_fetch(self, link: Link, envelope: wire.Envelope, fetch: mirror.Fetch) -> None:
        sender, request = envelope.sender, fetch.request
        if not self._fresh(envelope):
            self._metrics.mirror_fetch_refused()
            self._logs.warning(
                "mirror_fetch_refused",
                "refusing a stale or replayed fetch signed by %s",
                sender,
                source=sender,
                peer_id=sender,
            )
            await self._refuse(
                link, sender, mirror.RefusalCode.STALE, "stale or replayed fetch", request
            )
            return
        link.mark_verified(sender)
        try:
            answer = self._store.serve(sender, fetch.start, fetch.limit)
        except TalosError as exc:
            _log.warning(
                "mirror store cannot serve %s: %s",
                sender,
                exc,
                extra={"event": "mirror_store_failed", "peer_id": sender},
            )
            await self._refuse(
                link, sender, mirror.RefusalCode.UNAVAILABLE, "store failed", request
            )
            return
        self._metrics.mirror_entries_served(len(answer.entries))
        _log.info(
            "served %d audit entries from %d back to their origin %s",
            len(answer.entries),
            fetch.start,
            sender,
            extra={"event": "mirror_served", "peer_id": sender, "start": fetch.start},
        )
        await self._send(link, sender, mirror.with_request(answer, request))
