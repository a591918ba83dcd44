"""How the registry answers what it will not do: refusals and failures as JSON with a status.

Every refusal is ``{"error": <Talos exception or rule name>, "reason": <text>}``
with a 4xx status. :data:`REFUSAL_STATUS` is the one table that gives a
:class:`~talos.registry.admission.RefusalKind` its status; a Talos exception
raised while decoding or verifying a body gets the status of its family
(:data:`EXCEPTION_STATUS`, 400 for the rest); a storage failure is a 503
without details (those go to the log). A refused submission (a ``PUT``) is
also logged at INFO as ``registry_rejected`` and counted. Anyone can send
requests, so every line a request causes goes through the app's
:class:`~talos.logs.LimitedLog` (:func:`request_logs`: per client address and
per event), which reports what it suppressed.
"""

from __future__ import annotations

import logging
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from talos.core.agent_id import check_agent_id
from talos.errors import KeyLogInvalid, PeerNotFound, SignatureInvalid, StorageError, TalosError
from talos.logs import LimitedLog
from talos.registry.admission import RefusalKind, Refused
from talos.registry.drain import client_key
from talos.registry.metrics import RegistryMetrics
from talos.system import SYSTEM_CLOCK

__all__ = ["EXCEPTION_STATUS", "REFUSAL_STATUS", "install_error_handlers", "request_logs"]

log = logging.getLogger("talos.registry")

#: The HTTP status of each kind of refusal.
REFUSAL_STATUS: Final[dict[RefusalKind, int]] = {
    RefusalKind.MALFORMED: 400,
    RefusalKind.AGENT_MISMATCH: 400,
    RefusalKind.BODY_NOT_RECEIVED: 400,
    RefusalKind.BAD_SIGNATURE: 403,
    RefusalKind.UNKNOWN_AGENT: 409,
    RefusalKind.NOT_CURRENT_KEY: 409,
    RefusalKind.STALE_SEQUENCE: 409,
    RefusalKind.KEYLOG_ROLLBACK: 409,
    RefusalKind.KEYLOG_FORK: 409,
    RefusalKind.REVOCATION_FORK: 409,
    RefusalKind.REVOCATION_NOT_APPEND_ONLY: 409,
    RefusalKind.TOO_LARGE: 413,
    RefusalKind.UNSUPPORTED_MEDIA_TYPE: 415,
    RefusalKind.STALE_MESSAGE: 422,
}

#: The HTTP status of a Talos exception, by family (the first that matches); others 400.
EXCEPTION_STATUS: Final[tuple[tuple[type[TalosError], int], ...]] = (
    (PeerNotFound, 404),
    (SignatureInvalid, 403),
    (KeyLogInvalid, 422),
    (StorageError, 503),
)

#: Route templates of submissions, by the kind label of their rejections.
_SUBMISSIONS: Final = {
    "/v1/agents/{agent_id}/keylog": "keylog",
    "/v1/agents/{agent_id}/prekeys": "prekeys",
    "/v1/agents/{agent_id}/record": "record",
    "/v1/revocations/{issuer}": "revocations",
}


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure a JSON ``{"error", "reason"}`` answer with the right status."""
    for family in (Refused, TalosError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(family, _on_error)


def request_logs(request: Request) -> LimitedLog:
    """The app's rate-limited log for lines a request causes (made on first use,
    on the app's clock)."""
    state = request.app.state
    logs: LimitedLog | None = getattr(state, "request_logs", None)
    if logs is None:
        logs = LimitedLog(log, getattr(state, "clock", SYSTEM_CLOCK))
        state.request_logs = logs
    return logs


def _source(request: Request) -> str:
    return client_key(request.client.host if request.client is not None else "")


def _answer(status: int, error: str, reason: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "reason": reason})


def _status_of(error: TalosError) -> int:
    return next((status for family, status in EXCEPTION_STATUS if isinstance(error, family)), 400)


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    """The JSON answer for any failure (registered once per exception family)."""
    if isinstance(exc, Refused):
        return _refusal(request, REFUSAL_STATUS[exc.kind], exc.kind.value, exc.reason)
    if isinstance(exc, TalosError):
        status = _status_of(exc)
        if status == 503:
            _metrics(request).storage_failed()
            request_logs(request).log(
                logging.ERROR,
                "registry_storage_failure",
                "storage failure: %s",
                exc,
                source=_source(request),
                peer_id=None,
            )
            return _answer(503, type(exc).__name__, "registry storage failure; try again later")
        return _refusal(request, status, type(exc).__name__, str(exc))
    if isinstance(exc, StarletteHTTPException):
        kinds = {404: "NotFound", 405: "MethodNotAllowed"}
        return _answer(exc.status_code, kinds.get(exc.status_code, "HTTPError"), str(exc.detail))
    if isinstance(exc, RequestValidationError):
        return _answer(422, "ValidationError", "request does not match the API")
    request_logs(request).log(
        logging.ERROR,
        "registry_unexpected_error",
        "unexpected error: %s",
        type(exc).__name__,
        source=_source(request),
        exc_info=exc,
    )
    return _answer(500, "InternalError", "unexpected registry error")


def _refusal(request: Request, status: int, error: str, reason: str) -> JSONResponse:
    """A 4xx answer; a refused submission is also logged and counted."""
    route = getattr(request.scope.get("route"), "path", None)
    kind = _SUBMISSIONS.get(route) if request.method == "PUT" and route else None
    if kind is not None:
        _metrics(request).submission_rejected(kind, error)
        peer = _path_agent(request)
        request_logs(request).log(
            logging.INFO,
            "registry_rejected",
            "refused %s submission for %s: %s (%s)",
            kind,
            peer or "an invalid agent id",
            error,
            reason,
            source=_source(request),
            peer_id=peer,
            kind=kind,
            reason=error,
            status=status,
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


def _metrics(request: Request) -> RegistryMetrics:
    metrics: RegistryMetrics = request.app.state.metrics
    return metrics
