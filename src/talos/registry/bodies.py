"""The registry API's documented shapes: JSON answers, binary bodies, refusals per route.

What ``/openapi.json`` shows: the pydantic models of every JSON answer, and
helpers that document binary (``application/cbor``) bodies and the refusals a
route may answer. The routes are in :mod:`talos.registry.api`.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel

__all__ = [
    "CBOR",
    "MAX_BODY",
    "PUT_ERRORS",
    "DuplicateInstance",
    "DuplicateList",
    "DuplicateReport",
    "ErrorBody",
    "Instance",
    "KeyLogAccepted",
    "PrekeyStatus",
    "PrekeysAccepted",
    "RecordAccepted",
    "RevocationsAccepted",
    "TimeBody",
    "binary_ok",
    "body_doc",
    "error_docs",
]

#: Media type of every binary body.
CBOR: Final = "application/cbor"
#: Largest accepted request body (a key log or revocation list is at most 1 MiB).
MAX_BODY: Final = 1 << 20


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


def body_doc(what: str) -> dict[str, Any]:
    """OpenAPI for a required binary request body holding ``what``."""
    return {"requestBody": {"required": True, "description": what, "content": {CBOR: _BINARY}}}


def error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for the refusals (``statuses``) a route may answer."""
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


#: What a submission (``PUT``) may answer besides 200.
PUT_ERRORS: Final = (400, 403, 409, 413, 415, 422, 503)


def binary_ok(what: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a binary answer holding ``what``."""
    return {200: {"description": what, "content": {CBOR: _BINARY}}}
