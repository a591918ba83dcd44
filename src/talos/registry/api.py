"""HTTP routes of the registry (``/v1``): decode, check the path, call the store, answer.

Binary bodies (key logs, prekey uploads and bundles, peer records, revocation
lists) are ``application/cbor``, exactly the canonical bytes of the core
objects; small answers are JSON (:mod:`talos.registry.bodies`). Every refusal
is JSON ``{"error": <Talos exception or rule>, "reason": <text>}`` with a 4xx
status (:mod:`talos.registry.answers` holds the table):

=====  =====================================================================
400    malformed or unsupported bytes, a path that names another agent
403    a bad signature (unsigned, or signed by a key the log does not name)
404    nothing stored for this agent or issuer (or no such route)
409    stale sequence or version, fork or rollback, unknown agent, old key
413    body larger than :data:`MAX_BODY`
415    body not ``application/cbor``
422    an invalid key log, an expired or future-dated peer record
503    the registry's database failed (clients treat it as unavailable)
=====  =====================================================================

Handlers decode and verify in a worker thread (signature checks and SQLite
block), so the event loop keeps serving while they run. Bundles are handed
out under the per-address shares of :mod:`talos.registry.drain`.

Besides ``/v1``, ``GET /metrics`` answers the Prometheus text of
:class:`~talos.registry.metrics.RegistryMetrics` (left out of the schema: it
is for scrapers, not clients). Refused submissions are logged at INFO as
``registry_rejected`` events and counted; see ``docs/metrics.md``.
"""

from __future__ import annotations

import functools
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from talos.core.agent_id import check_agent_id
from talos.core.clock import Clock, time_ms
from talos.core.contact import Contact
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import RevocationList
from talos.core.x3dh import PrekeyBundle
from talos.errors import PeerNotFound
from talos.registry.admission import Refusal, RefusalKind, Refused, check_same_agent
from talos.registry.answers import install_error_handlers, request_logs
from talos.registry.backend import DrainShares
from talos.registry.bodies import (
    CBOR,
    MAX_BODY,
    PUT_ERRORS,
    DuplicateInstance,
    DuplicateList,
    DuplicateReport,
    Instance,
    KeyLogAccepted,
    PrekeysAccepted,
    PrekeyStatus,
    RecordAccepted,
    RevocationsAccepted,
    TimeBody,
    binary_ok,
    body_doc,
    error_docs,
)
from talos.registry.drain import PrekeyLimiter, client_key
from talos.registry.metrics import CONTENT_TYPE, RegistryMetrics
from talos.registry.store import DuplicateStatus, RegistryStore

__all__ = [
    "CBOR",
    "MAX_BODY",
    "PrekeyLimiter",
    "install_error_handlers",
    "metrics_router",
    "router",
]

log = logging.getLogger("talos.registry")
router = APIRouter(prefix="/v1")
metrics_router = APIRouter()


# -- plumbing -----------------------------------------------------------------------


def _client_key(request: Request) -> str:
    """Who is asking, for rate limits: the address uvicorn reports (an IPv6 client
    by its /64, which one host holds whole). That is the TCP peer's, or the
    forwarded one when the peer is a proxy uvicorn trusts (``FORWARDED_ALLOW_IPS``,
    by default only this host): a client's own forwarding header counts for
    nothing."""
    return client_key(request.client.host if request.client is not None else "")


def _context(request: Request) -> tuple[RegistryStore, Clock]:
    state = request.app.state
    return state.store, state.clock


def _metrics(request: Request) -> RegistryMetrics:
    metrics: RegistryMetrics = request.app.state.metrics
    return metrics


def _agent(agent_id: str) -> str:
    """Raises: MalformedFrame: the path does not hold an agent id."""
    return check_agent_id(agent_id)


def _same_agent(path: str, found: str) -> None:
    """Raises: Refused: the body is for another agent than the path names."""
    refusal = check_same_agent(path, found)
    if refusal is not None:
        raise Refused(refusal)


def _refused(kind: RefusalKind, reason: str) -> Refused:
    return Refused(Refusal(kind, reason))


async def _read_body(request: Request) -> bytes:
    """The request body, bounded by :data:`MAX_BODY` and required to be CBOR.

    Raises:
        Refused: not CBOR, too large, a bad length or a client that went away.
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != CBOR:
        raise _refused(RefusalKind.UNSUPPORTED_MEDIA_TYPE, f"send the body as {CBOR}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise _refused(RefusalKind.MALFORMED, "invalid Content-Length")
        if int(declared) > MAX_BODY:
            raise _refused(RefusalKind.TOO_LARGE, f"body exceeds {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise _refused(RefusalKind.TOO_LARGE, f"body exceeds {MAX_BODY} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _refused(RefusalKind.BODY_NOT_RECEIVED, "the body was not received") from None
    return b"".join(chunks)


def _cbor(data: bytes) -> Response:
    return Response(content=data, media_type=CBOR)


# -- routes -------------------------------------------------------------------------


@router.get("/time", summary="The registry's clock")
async def get_time(request: Request) -> TimeBody:
    """Wall-clock milliseconds, so agents can detect clock skew before it bites."""
    _, clock = _context(request)
    return TimeBody(time_ms=time_ms(clock))


@router.put(
    "/agents/{agent_id}/keylog",
    summary="Publish or extend an agent's key event log",
    responses=error_docs(*PUT_ERRORS),
    openapi_extra=body_doc("the whole key event log (KeyLog bytes)"),
)
async def put_keylog(agent_id: str, request: Request) -> KeyLogAccepted:
    """Store a verified log; a known agent's log may only be extended.

    A fork is refused with 409 and recorded as a security event; a shorter
    copy (rollback) is refused with 409.
    """
    store, clock = _context(request)
    body = await _read_body(request)

    def work() -> KeyLogAccepted:
        offered = KeyLog.from_bytes(body)
        _same_agent(_agent(agent_id), offered.agent_id)
        changed = store.put_keylog(offered, now_ms=time_ms(clock))
        return KeyLogAccepted(changed=changed, sequence=offered.state.sequence)

    return await run_in_threadpool(work)


@router.get(
    "/agents/{agent_id}/keylog",
    summary="Fetch an agent's key event log",
    response_class=Response,
    responses={**binary_ok("KeyLog bytes: verify them"), **error_docs(400, 404, 503)},
)
async def get_keylog(agent_id: str, request: Request) -> Response:
    """The stored log. Clients verify it (and that it extends what they knew)."""
    store, _ = _context(request)
    data = await run_in_threadpool(store.keylog, _agent(agent_id))
    if data is None:
        raise PeerNotFound(f"no key log for {agent_id}")
    return _cbor(data)


@router.put(
    "/agents/{agent_id}/prekeys",
    summary="Publish the signed prekey and a pool of one-time prekeys",
    responses=error_docs(*PUT_ERRORS),
    openapi_extra=body_doc("a signed PrekeyUpload"),
)
async def put_prekeys(agent_id: str, request: Request) -> PrekeysAccepted:
    """Replace the agent's prekeys. Signed by its current key; the sequence must increase."""
    store, clock = _context(request)
    body = await _read_body(request)

    def work() -> PrekeysAccepted:
        upload = PrekeyUpload.from_bytes(body)
        _same_agent(_agent(agent_id), upload.agent_id)
        pool = store.put_prekeys(upload, now_ms=time_ms(clock))
        return PrekeysAccepted(sequence=upload.sequence, one_time_prekeys=pool)

    return await run_in_threadpool(work)


@router.get(
    "/agents/{agent_id}/prekeys",
    summary="How many one-time prekeys are left",
    responses=error_docs(400, 404, 503),
)
async def get_prekey_status(agent_id: str, request: Request) -> PrekeyStatus:
    """The accepted upload sequence and the one-time prekeys still to hand out (to refill)."""
    store, _ = _context(request)
    status = await run_in_threadpool(store.prekey_status, _agent(agent_id))
    if status is None:
        raise PeerNotFound(f"no prekeys for {agent_id}")
    return PrekeyStatus(sequence=status[0], one_time_prekeys=status[1])


@router.get(
    "/agents/{agent_id}/bundle",
    summary="Take a prekey bundle (consumes one one-time prekey)",
    response_class=Response,
    responses={
        **binary_ok("PrekeyBundle bytes; without one-time prekey when none is left"),
        **error_docs(400, 404, 503),
    },
)
async def get_bundle(agent_id: str, request: Request) -> Response:
    """A bundle with one unused one-time prekey, handed out once (atomically).

    One client address takes at most its share of an agent's one-time
    prekeys (``create_app(one_time_prekeys_per_minute=...)``); past it, the
    bundle carries none, so the X3DH that follows starts from the signed
    prekey alone and the pool is kept for everyone else.
    """
    store, clock = _context(request)
    agent = _agent(agent_id)
    address = _client_key(request)
    limiter: DrainShares | None = request.app.state.prekey_limiter
    one_time = limiter is None or await run_in_threadpool(limiter.allow, address, agent, clock)
    bundle = await run_in_threadpool(functools.partial(store.take_bundle, agent, one_time=one_time))
    if bundle is None:
        if limiter is not None:  # unknown agents must not push real buckets out
            await run_in_threadpool(limiter.forget, address, agent)
        raise PeerNotFound(f"no prekeys for {agent_id}")
    _bundle_served(request, agent, address, bundle, one_time=one_time)
    return _cbor(bundle.to_bytes())


def _bundle_served(
    request: Request, agent: str, address: str, bundle: PrekeyBundle, *, one_time: bool
) -> None:
    """Count a bundle handed out, and warn (rate-limited) when its one-time prekey was
    withheld because ``address`` took its share."""
    _, clock = _context(request)
    _metrics(request).bundle_served(
        with_one_time_prekey=bundle.one_time_prekey_id is not None, withheld=not one_time
    )
    if not one_time and request.app.state.prekey_warnings.allow(address, clock.monotonic()):
        request_logs(request).warning(
            "one_time_prekeys_withheld",
            "withholding one-time prekeys of %s from %s: it took its share",
            agent,
            address,
            source=address,
            peer_id=agent,
            address=address,
        )


@router.get(
    "/agents/{agent_id}/contact",
    summary="What a first contact needs: key log, a prekey bundle, the live record",
    response_class=Response,
    responses={
        **binary_ok(
            "a first-contact map (talos.core.contact): the key log, a bundle taken as "
            "/bundle takes it (null without prekeys), the live record (null without one)"
        ),
        **error_docs(400, 404, 503),
    },
)
async def get_contact(agent_id: str, request: Request) -> Response:
    """``/keylog``, ``/bundle`` and ``/record`` in one answer, for an agent meeting
    this one for the first time (one request instead of three).

    The bundle is taken exactly as ``/bundle`` takes it, under the same
    one-time prekey shares. Clients decode and verify each part as they would
    the separate answers. An agent without a key log is a 404.
    """
    store, clock = _context(request)
    agent = _agent(agent_id)
    address = _client_key(request)
    limiter: DrainShares | None = request.app.state.prekey_limiter

    def work() -> tuple[bytes, PrekeyBundle | None, bool, bytes | None] | None:
        log = store.keylog(agent)
        if log is None:
            return None
        one_time = limiter is None or limiter.allow(address, agent, clock)
        bundle = store.take_bundle(agent, one_time=one_time)
        if bundle is None and limiter is not None:
            limiter.forget(address, agent)
        return log, bundle, one_time, store.record(agent, now_ms=time_ms(clock))

    found = await run_in_threadpool(work)
    if found is None:
        raise PeerNotFound(f"no key log for {agent_id}")
    log, bundle, one_time, record = found
    if bundle is not None:
        _bundle_served(request, agent, address, bundle, one_time=one_time)
    contact = Contact(log=log, bundle=None if bundle is None else bundle.to_bytes(), record=record)
    return _cbor(contact.to_bytes())


@router.put(
    "/agents/{agent_id}/record",
    summary="Announce where an agent instance listens",
    responses=error_docs(*PUT_ERRORS),
    openapi_extra=body_doc("a signed PeerRecord"),
)
async def put_record(agent_id: str, request: Request) -> RecordAccepted:
    """Store a record signed by the current key, unexpired, with a higher sequence.

    A record that shows the agent running as overlapping instances is
    accepted like any other, and logged and counted as a duplicate.
    """
    store, clock = _context(request)
    body = await _read_body(request)

    def work() -> RecordAccepted:
        record = PeerRecord.from_bytes(body)
        _same_agent(_agent(agent_id), record.agent_id)
        if store.put_record(record, now=clock.time()):
            _metrics(request).duplicate_detected()
        return RecordAccepted(sequence=record.sequence)

    return await run_in_threadpool(work)


@router.get(
    "/agents/{agent_id}/record",
    summary="Fetch the live peer record with the highest sequence",
    response_class=Response,
    responses={**binary_ok("PeerRecord bytes: verify them"), **error_docs(400, 404, 503)},
)
async def get_record(agent_id: str, request: Request) -> Response:
    """The newest unexpired record; 404 when none is live."""
    store, clock = _context(request)
    data = await run_in_threadpool(store.record, _agent(agent_id), now_ms=time_ms(clock))
    if data is None:
        raise PeerNotFound(f"no live peer record for {agent_id}")
    return _cbor(data)


@router.get(
    "/agents/{agent_id}/instances",
    summary="List an agent's live instances (split-brain detection)",
    responses=error_docs(400, 503),
)
async def get_instances(agent_id: str, request: Request) -> list[Instance]:
    """Every live instance id with its newest record; two at once means a duplicate agent."""
    store, clock = _context(request)
    live = await run_in_threadpool(store.instances, _agent(agent_id), now_ms=time_ms(clock))
    return [
        Instance(
            instance_id=i.instance_id.hex(),
            endpoint=i.endpoint,
            sequence=i.sequence,
            issued_ms=i.issued_ms,
            expires_ms=i.expires_ms,
            record=i.record.hex(),
        )
        for i in live
    ]


@router.get(
    "/agents/{agent_id}/duplicates",
    summary="Whether an agent runs as two overlapping instances (split brain)",
    responses=error_docs(400, 503),
)
async def get_duplicates(agent_id: str, request: Request) -> DuplicateReport:
    """The agent's live instances and whether any two kept announcing concurrently.

    A restart leaves the old instance live for up to an hour, but it never
    announces again, so it is not a duplicate. An unknown agent is not a
    duplicate and has no instances.
    """
    store, clock = _context(request)
    status = await run_in_threadpool(
        store.duplicate_status, _agent(agent_id), now_ms=time_ms(clock)
    )
    return _report(status)


@router.get(
    "/duplicates",
    summary="Every agent running as overlapping instances",
    responses=error_docs(503),
)
async def get_all_duplicates(request: Request) -> DuplicateList:
    """Duplicated identities by agent id: at most 1000 (``truncated`` says when cut short)."""
    store, clock = _context(request)
    statuses, truncated = await run_in_threadpool(
        lambda: store.duplicate_statuses(now_ms=time_ms(clock))
    )
    return DuplicateList(duplicates=[_report(s) for s in statuses], truncated=truncated)


def _report(status: DuplicateStatus) -> DuplicateReport:
    return DuplicateReport(
        agent_id=status.agent_id,
        duplicate=status.duplicate,
        instances=[
            DuplicateInstance(
                instance_id=i.instance_id.hex(),
                endpoint=i.endpoint,
                first_seen_ms=i.first_seen_ms,
                issued_ms=i.issued_ms,
                expires_ms=i.expires_ms,
            )
            for i in status.instances
        ],
    )


@router.put(
    "/revocations/{issuer}",
    summary="Publish an issuer's revocation list",
    responses=error_docs(*PUT_ERRORS),
    openapi_extra=body_doc("a signed RevocationList"),
)
async def put_revocations(issuer: str, request: Request) -> RevocationsAccepted:
    """Merge the list with the stored one; older (stale), forked or shrinking lists get 409."""
    store, clock = _context(request)
    body = await _read_body(request)

    def work() -> RevocationsAccepted:
        offered = RevocationList.from_bytes(body)
        _same_agent(_agent(issuer), offered.issuer)
        outcome = store.put_revocations(offered, now_ms=time_ms(clock))
        return RevocationsAccepted(outcome=outcome.value, version=offered.version)

    return await run_in_threadpool(work)


@router.get(
    "/revocations/{issuer}",
    summary="Fetch an issuer's revocation list",
    response_class=Response,
    responses={**binary_ok("RevocationList bytes: verify them"), **error_docs(400, 404, 503)},
)
async def get_revocations(issuer: str, request: Request) -> Response:
    """The list in use for ``issuer``."""
    store, _ = _context(request)
    data = await run_in_threadpool(store.revocations, _agent(issuer))
    if data is None:
        raise PeerNotFound(f"no revocation list for {issuer}")
    return _cbor(data)


@metrics_router.get("/health", include_in_schema=False)
async def get_health(request: Request) -> dict[str, str]:
    """200 when this replica reaches its database, else 503 (``StorageError``): what a
    load balancer's health check asks before sending it requests."""
    store, _ = _context(request)
    await run_in_threadpool(store.ping)
    return {"status": "ok"}


@metrics_router.get("/metrics", include_in_schema=False)
async def get_metrics(request: Request) -> Response:
    """The registry's Prometheus metrics (the gauges read the database)."""
    text = await run_in_threadpool(_metrics(request).render)
    return Response(content=text, media_type=CONTENT_TYPE)
