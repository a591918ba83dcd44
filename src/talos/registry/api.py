"""HTTP routes of the registry (``/v1``), and the mapping of refusals to 4xx answers.

Binary bodies (key logs, prekey uploads and bundles, peer records, revocation
lists) are ``application/cbor``, exactly the canonical bytes of the core
objects; small answers are JSON. Every refusal is JSON
``{"error": <Talos exception or rule>, "reason": <text>}`` with a 4xx status:

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
block), so the event loop keeps serving while they run.

Besides ``/v1``, ``GET /metrics`` answers the Prometheus text of
:class:`~talos.registry.metrics.RegistryMetrics` (left out of the schema: it
is for scrapers, not clients). Refused submissions are logged at INFO as
``registry_rejected`` events and counted; see ``docs/metrics.md``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from talos.core.agent_id import check_agent_id
from talos.core.clock import Clock, time_ms
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.ratelimit import RateLimiter
from talos.core.revocation import RevocationList
from talos.errors import (
    KeyLogInvalid,
    PeerNotFound,
    SignatureInvalid,
    StorageError,
    TalosError,
)
from talos.registry.metrics import CONTENT_TYPE, RegistryMetrics
from talos.registry.store import DuplicateStatus, Refused, RegistryStore

__all__ = [
    "CBOR",
    "MAX_BODY",
    "PrekeyLimiter",
    "install_error_handlers",
    "metrics_router",
    "router",
]

#: Media type of every binary body.
CBOR: Final = "application/cbor"
#: Largest accepted request body (a key log or revocation list is at most 1 MiB).
MAX_BODY: Final = 1 << 20

log = logging.getLogger("talos.registry")
router = APIRouter(prefix="/v1")
metrics_router = APIRouter()

#: Route templates of submissions, by the kind label of their rejections.
_SUBMISSIONS: Final = {
    "/v1/agents/{agent_id}/keylog": "keylog",
    "/v1/agents/{agent_id}/prekeys": "prekeys",
    "/v1/agents/{agent_id}/record": "record",
    "/v1/revocations/{issuer}": "revocations",
}


# -- documented shapes --------------------------------------------------------------


class ErrorBody(BaseModel):
    """Why a request was refused."""

    error: str
    reason: str


class TimeBody(BaseModel):
    """The registry's wall clock, for clock-skew checks."""

    time_ms: int


class KeyLogAccepted(BaseModel):
    changed: bool
    sequence: int


class PrekeysAccepted(BaseModel):
    sequence: int
    one_time_prekeys: int


class PrekeyStatus(BaseModel):
    sequence: int
    one_time_prekeys: int


class RecordAccepted(BaseModel):
    sequence: int


class RevocationsAccepted(BaseModel):
    outcome: str
    version: int


class Instance(BaseModel):
    """A live instance of an agent; ``record`` is the signed peer record (hex) to verify."""

    instance_id: str
    endpoint: str
    sequence: int
    issued_ms: int
    expires_ms: int
    record: str


class DuplicateInstance(BaseModel):
    """A live instance in a duplicate report; ``first_seen_ms`` is the registry's clock."""

    instance_id: str
    endpoint: str
    first_seen_ms: int
    issued_ms: int
    expires_ms: int


class DuplicateReport(BaseModel):
    """Whether the agent runs as overlapping instances (split brain), and its live instances."""

    agent_id: str
    duplicate: bool
    instances: list[DuplicateInstance]


class DuplicateList(BaseModel):
    """Duplicated identities by agent id; ``truncated`` when more exist than are listed."""

    duplicates: list[DuplicateReport]
    truncated: bool


_BINARY: Final = {"schema": {"type": "string", "format": "binary"}}


def _body_doc(what: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": what, "content": {CBOR: _BINARY}}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "malformed or unsupported bytes, or the path names another agent",
        403: "bad signature",
        404: "nothing stored for this agent",
        409: "stale sequence, fork, rollback, unknown agent or not the current key",
        413: f"body larger than {MAX_BODY} bytes",
        415: f"body is not {CBOR}",
        422: "invalid key log, or expired / future-dated record",
        503: "registry storage failure",
    }
    return {s: {"model": ErrorBody, "description": text[s]} for s in statuses}


_PUT_ERRORS: Final = (400, 403, 409, 413, 415, 422, 503)


def _binary_ok(what: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": what, "content": {CBOR: _BINARY}}}


# -- plumbing -----------------------------------------------------------------------


class PrekeyLimiter:
    """How many one-time prekeys a client may take: ``per_agent`` per minute of each
    agent's pool, and ten times that per minute across all agents.

    The second bucket bounds how fast one client can cycle through agents, so
    it cannot push its own per-agent buckets out of the bounded table to start
    them afresh; requests for unknown agents :meth:`forget` theirs.
    """

    def __init__(self, per_agent: int) -> None:
        self._pairs = RateLimiter(rate=per_agent / 60, burst=per_agent, max_keys=65_536)
        self._clients = RateLimiter(rate=10 * per_agent / 60, burst=10 * per_agent, max_keys=16_384)

    def allow(self, client: str, agent: str, now: float) -> bool:
        return self._clients.allow(client, now) and self._pairs.allow((client, agent), now)

    def forget(self, client: str, agent: str) -> None:
        self._pairs.forget((client, agent))


def _client_key(request: Request) -> str:
    """Who is asking, for rate limits: the address uvicorn reports (an IPv6 client
    by its /64, which one host holds whole). That is the TCP peer's, or the
    forwarded one when the peer is a proxy uvicorn trusts (``FORWARDED_ALLOW_IPS``,
    by default only this host): a client's own forwarding header counts for
    nothing."""
    host = request.client.host if request.client is not None else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return (
        str(address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else host
    )


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
    if path != found:
        raise Refused(400, "AgentMismatch", f"body is for {found}, the path names {path}")


async def _read_body(request: Request) -> bytes:
    """The request body, bounded by :data:`MAX_BODY` and required to be CBOR.

    Raises:
        Refused: 415 wrong media type, 413 too large, 400 a bad length or a
            client that went away.
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != CBOR:
        raise Refused(415, "UnsupportedMediaType", f"send the body as {CBOR}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, "MalformedFrame", "invalid Content-Length")
        if int(declared) > MAX_BODY:
            raise Refused(413, "PayloadTooLarge", f"body exceeds {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise Refused(413, "PayloadTooLarge", f"body exceeds {MAX_BODY} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refused(400, "ClientDisconnect", "the body was not received") from None
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
    responses=_errors(*_PUT_ERRORS),
    openapi_extra=_body_doc("the whole key event log (KeyLog bytes)"),
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
    responses={**_binary_ok("KeyLog bytes: verify them"), **_errors(400, 404, 503)},
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
    responses=_errors(*_PUT_ERRORS),
    openapi_extra=_body_doc("a signed PrekeyUpload"),
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
    responses=_errors(400, 404, 503),
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
        **_binary_ok("PrekeyBundle bytes; without one-time prekey when none is left"),
        **_errors(400, 404, 503),
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
    limiter: PrekeyLimiter | None = request.app.state.prekey_limiter
    one_time = limiter is None or limiter.allow(address, agent, clock.monotonic())
    bundle = await run_in_threadpool(functools.partial(store.take_bundle, agent, one_time=one_time))
    if bundle is None:
        if limiter is not None:
            limiter.forget(address, agent)  # unknown agents must not push real buckets out
        raise PeerNotFound(f"no prekeys for {agent_id}")
    _metrics(request).bundle_served(
        with_one_time_prekey=bundle.one_time_prekey_id is not None, withheld=not one_time
    )
    if not one_time and request.app.state.prekey_warnings.allow(address, clock.monotonic()):
        log.warning(
            "withholding one-time prekeys of %s from %s: it took its share",
            agent,
            address,
            extra={"event": "one_time_prekeys_withheld", "peer_id": agent, "address": address},
        )
    return _cbor(bundle.to_bytes())


@router.put(
    "/agents/{agent_id}/record",
    summary="Announce where an agent instance listens",
    responses=_errors(*_PUT_ERRORS),
    openapi_extra=_body_doc("a signed PeerRecord"),
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
    responses={**_binary_ok("PeerRecord bytes: verify them"), **_errors(400, 404, 503)},
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
    responses=_errors(400, 503),
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
    responses=_errors(400, 503),
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
    responses=_errors(503),
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
    responses=_errors(*_PUT_ERRORS),
    openapi_extra=_body_doc("a signed RevocationList"),
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
    responses={**_binary_ok("RevocationList bytes: verify them"), **_errors(400, 404, 503)},
)
async def get_revocations(issuer: str, request: Request) -> Response:
    """The list in use for ``issuer``."""
    store, _ = _context(request)
    data = await run_in_threadpool(store.revocations, _agent(issuer))
    if data is None:
        raise PeerNotFound(f"no revocation list for {issuer}")
    return _cbor(data)


@metrics_router.get("/metrics", include_in_schema=False)
async def get_metrics(request: Request) -> Response:
    """The registry's Prometheus metrics (the gauges read the database)."""
    text = await run_in_threadpool(_metrics(request).render)
    return Response(content=text, media_type=CONTENT_TYPE)


# -- error answers ------------------------------------------------------------------


def _answer(status: int, error: str, reason: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "reason": reason})


def _status_of(error: TalosError) -> int:
    if isinstance(error, PeerNotFound):
        return 404
    if isinstance(error, SignatureInvalid):
        return 403
    if isinstance(error, KeyLogInvalid):
        return 422
    if isinstance(error, StorageError):
        return 503
    return 400


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    """The JSON answer for any failure (registered once per exception family)."""
    if isinstance(exc, Refused):
        return _refusal(request, exc.status, exc.kind, exc.reason)
    if isinstance(exc, TalosError):
        status = _status_of(exc)
        if status == 503:
            _metrics(request).storage_failed()
            log.error(
                "storage failure: %s",
                exc,
                extra={"event": "registry_storage_failure", "peer_id": None},
            )
            return _answer(503, type(exc).__name__, "registry storage failure; try again later")
        return _refusal(request, status, type(exc).__name__, str(exc))
    if isinstance(exc, StarletteHTTPException):
        kinds = {404: "NotFound", 405: "MethodNotAllowed"}
        return _answer(exc.status_code, kinds.get(exc.status_code, "HTTPError"), str(exc.detail))
    if isinstance(exc, RequestValidationError):
        return _answer(422, "ValidationError", "request does not match the API")
    log.error("unexpected error", exc_info=exc)
    return _answer(500, "InternalError", "unexpected registry error")


def _refusal(request: Request, status: int, error: str, reason: str) -> JSONResponse:
    """A 4xx answer; a refused submission is also logged and counted."""
    route = getattr(request.scope.get("route"), "path", None)
    kind = _SUBMISSIONS.get(route) if request.method == "PUT" and route else None
    if kind is not None:
        _metrics(request).submission_rejected(kind, error)
        peer = _path_agent(request)
        log.info(
            "refused %s submission for %s: %s (%s)",
            kind,
            peer or "an invalid agent id",
            error,
            reason,
            extra={
                "event": "registry_rejected",
                "peer_id": peer,
                "kind": kind,
                "reason": error,
                "status": status,
            },
        )
    return _answer(status, error, reason)


def _path_agent(request: Request) -> str | None:
    """The agent id in the path, if it is one (never an arbitrary string into the logs)."""
    candidate = request.path_params.get("agent_id", request.path_params.get("issuer"))
    if not isinstance(candidate, str):
        return None
    try:
        return check_agent_id(candidate)
    except TalosError:
        return None


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure a JSON ``{"error", "reason"}`` answer with the right status."""
    for family in (Refused, TalosError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(family, _on_error)
