"""Async client of the registry server (``talos registry serve``).

The registry is trusted for availability only: every key log, record, bundle
and revocation list this client returns has been decoded strictly and, where
the caller supplies what is needed, verified. Failures are Talos errors and
nothing else:

==========================================  ==========================================
connection refused, reset, timeout, 5xx     :class:`~talos.errors.RegistryUnavailable`
404                                         :class:`~talos.errors.PeerNotFound`
any other 4xx (stale, fork, bad signature)  :class:`RegistryRejected` (a
                                            :class:`~talos.errors.PeerRejected`)
bytes that do not decode                    :class:`~talos.errors.MalformedFrame`
                                            (or ``UnsupportedVersion``)
a key log that does not verify or extend    :class:`~talos.errors.KeyLogInvalid`
a record or bundle badly signed             :class:`~talos.errors.SignatureInvalid`
an expired record                           :class:`~talos.errors.StaleMessage`
==========================================  ==========================================

A refused submission is not retried: the registry said why, and sending the
same bytes again gets the same answer.

Duplicate reports (split brain, :meth:`RegistryClient.duplicates`) are the
registry's own judgement and carry no signature; the signed records behind
them are in :meth:`RegistryClient.instances`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import httpx

from talos.core.agent_id import check_agent_id
from talos.core.keylog import KeyLog, KeyLookup
from talos.core.peer_record import INSTANCE_ID_SIZE, MAX_ENDPOINT_LENGTH, PeerRecord
from talos.core.prekeys import PrekeyUpload
from talos.core.revocation import RevocationList
from talos.core.x3dh import PrekeyBundle
from talos.errors import (
    ConfigurationError,
    KeyLogInvalid,
    LocalProtocolError,
    MalformedFrame,
    PeerNotFound,
    PeerRejected,
    RegistryUnavailable,
    SignatureInvalid,
    StaleMessage,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_RESPONSE",
    "DuplicateInstance",
    "DuplicateReport",
    "PrekeyStatus",
    "RegistryClient",
    "RegistryRejected",
]

DEFAULT_TIMEOUT: Final = 5.0
#: Largest answer read from the registry (a key log or revocation list is at most 1 MiB).
MAX_RESPONSE: Final = (1 << 20) + 4096
_CBOR: Final = "application/cbor"
_U64: Final = 2**64 - 1
_INSTANCE_HEX: Final = re.compile(f"[0-9a-f]{{{2 * INSTANCE_ID_SIZE}}}")
_INSTANCE_FIELDS: Final = frozenset(
    {"instance_id", "endpoint", "first_seen_ms", "issued_ms", "expires_ms"}
)
log = logging.getLogger("talos.discovery")


class RegistryRejected(PeerRejected):
    """The registry refused a request (4xx other than 404), with its reason.

    A :class:`~talos.errors.PeerRejected`: the other side received the request
    and refused it; sending it again will not help. ``status`` is the HTTP
    status, ``kind`` the registry's error name (``StaleSequence``,
    ``KeyLogInvalid``, ``SignatureInvalid``...), ``reason`` its explanation.
    """

    hint = (
        "the registry's reason says what to fix (e.g. a higher sequence, or a fork to investigate)"
    )

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(f"registry refused the request ({status} {kind}): {reason}")
        self.status = status
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PrekeyStatus:
    """What the registry holds of an agent's prekeys: the upload sequence and the pool left."""

    sequence: int
    one_time_prekeys: int


@dataclass(frozen=True, slots=True)
class DuplicateInstance:
    """A live instance of an agent in a :class:`DuplicateReport`.

    ``instance_id`` is lower-case hex; ``first_seen_ms`` is when the registry
    first accepted a record of the instance (its clock), ``issued_ms`` and
    ``expires_ms`` are those of the instance's newest record.
    """

    instance_id: str
    endpoint: str
    first_seen_ms: int
    issued_ms: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class DuplicateReport:
    """The registry's view of whether one identity runs as overlapping instances.

    ``duplicate`` is true when two live instances kept announcing
    concurrently (a restart is not a duplicate); ``instances`` are the live
    ones, newest first. See ``docs/design/registry.md`` ("Split brain").
    """

    agent_id: str
    duplicate: bool
    instances: tuple[DuplicateInstance, ...]


class RegistryClient:
    """Talks to one registry over HTTP. Use as ``async with RegistryClient(url) as registry``.

    ``transport`` replaces the network (tests pass an ``httpx.ASGITransport``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Raises: ConfigurationError: ``base_url`` is not an http(s) URL."""
        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigurationError(f"invalid registry URL {base_url!r}: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError(f"registry URL must be http(s)://host[:port]: {base_url!r}")
        self.base_url = str(url).rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, follow_redirects=False
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- time -------------------------------------------------------------------------

    async def time_ms(self) -> int:
        """The registry's wall clock in milliseconds (for clock-skew checks).

        Raises:
            RegistryUnavailable, RegistryRejected, MalformedFrame: see the module table.
        """
        answer = _json_object(await self._request("GET", "/v1/time"))
        value = answer.get("time_ms")
        if type(value) is not int or value < 0:
            raise MalformedFrame("registry time is not a non-negative integer")
        return value

    # -- key logs -----------------------------------------------------------------------

    async def publish_keylog(self, log: KeyLog) -> None:
        """Publish (or extend) this agent's key event log.

        Raises:
            RegistryRejected: the registry holds a log this one does not extend
                (kind ``KeyLogInvalid`` for a fork, ``KeyLogRollback``).
            RegistryUnavailable: see the module table.
        """
        await self._put(f"/v1/agents/{log.agent_id}/keylog", log.to_bytes())

    async def fetch_keylog(self, agent_id: str, known: KeyLog | None = None) -> KeyLog:
        """The agent's verified key log; with ``known``, only a log that extends it.

        Raises:
            PeerNotFound: the registry has no log for ``agent_id``.
            KeyLogInvalid: the log does not verify, is another agent's, or
                forks or rolls back ``known``.
            MalformedFrame, UnsupportedVersion: undecodable bytes.
            RegistryUnavailable: see the module table.
        """
        agent_id = _agent(agent_id)
        log = KeyLog.from_bytes(await self._request("GET", f"/v1/agents/{agent_id}/keylog"))
        if log.agent_id != agent_id:
            raise KeyLogInvalid(f"registry served another agent's key log for {agent_id}")
        if known is None:
            return log
        if known.agent_id != agent_id:
            raise ConfigurationError("the known key log belongs to another agent")
        return known.extend(log.events)

    # -- prekeys ------------------------------------------------------------------------

    async def publish_prekeys(self, upload: PrekeyUpload) -> int:
        """Publish the signed prekey and one-time prekey pool; returns the pool size kept.

        Raises:
            RegistryRejected: stale upload sequence, not the current key, bad
                signature, or the registry does not know the agent's key log.
            RegistryUnavailable, MalformedFrame: see the module table.
        """
        answer = _json_object(
            await self._put(f"/v1/agents/{upload.agent_id}/prekeys", upload.to_bytes())
        )
        return _json_int(answer, "one_time_prekeys")

    async def prekey_status(self, agent_id: str) -> PrekeyStatus:
        """How many one-time prekeys the registry still holds for ``agent_id`` (to refill).

        Raises:
            PeerNotFound: no prekeys published.
            RegistryUnavailable, MalformedFrame: see the module table.
        """
        agent_id = _agent(agent_id)
        answer = _json_object(await self._request("GET", f"/v1/agents/{agent_id}/prekeys"))
        return PrekeyStatus(_json_int(answer, "sequence"), _json_int(answer, "one_time_prekeys"))

    async def fetch_bundle(self, agent_id: str) -> PrekeyBundle:
        """Take a prekey bundle of ``agent_id`` (the registry hands its one-time prekey out once).

        The signed prekey signature is checked against the bundle's own
        keys; :func:`talos.core.x3dh.initiate` then checks those keys against
        the agent's verified key log.

        Raises:
            PeerNotFound: no prekeys published.
            SignatureInvalid: the signed prekey signature does not verify.
            MalformedFrame, UnsupportedVersion: not a bundle, or another agent's.
            RegistryUnavailable: see the module table.
        """
        agent_id = _agent(agent_id)
        data = await self._request("GET", f"/v1/agents/{agent_id}/bundle")
        bundle = PrekeyBundle.from_bytes(data)
        if bundle.agent_id != agent_id:
            raise MalformedFrame(f"registry served another agent's bundle for {agent_id}")
        bundle.verify()
        return bundle

    # -- peer records -------------------------------------------------------------------

    async def publish_record(self, record: PeerRecord) -> None:
        """Announce where this instance listens.

        Raises:
            RegistryRejected: stale sequence (kind ``StaleSequence``), expired,
                not signed by the current key, or unknown agent.
            RegistryUnavailable: see the module table.
        """
        await self._put(f"/v1/agents/{record.agent_id}/record", record.to_bytes())

    async def fetch_record(self, agent_id: str, keys: KeyLookup, now: float) -> PeerRecord:
        """The agent's newest live peer record, verified with ``keys`` at ``now``.

        Raises:
            PeerNotFound: no live record.
            SignatureInvalid: not signed by the agent (per ``keys``).
            StaleMessage: expired, or issued in the future beyond the clock skew.
            MalformedFrame, UnsupportedVersion: undecodable, or another agent's.
            RegistryUnavailable: see the module table.
        """
        agent_id = _agent(agent_id)
        record = PeerRecord.from_bytes(await self._request("GET", f"/v1/agents/{agent_id}/record"))
        if record.agent_id != agent_id:
            raise MalformedFrame(f"registry served another agent's record for {agent_id}")
        record.verify(keys, now=now)
        return record

    async def instances(
        self, agent_id: str, keys: KeyLookup | None = None, *, now: float | None = None
    ) -> list[PeerRecord]:
        """The records of the agent's live instances, newest sequence first.

        With ``keys`` only records that verify at ``now`` are returned, so a
        registry cannot invent a duplicate instance (split brain); without
        them the records are decoded but unverified.

        Raises:
            MalformedFrame: the answer or a record in it does not decode, or
                names another agent.
            RegistryUnavailable: see the module table.
            LocalProtocolError: ``keys`` without ``now``.
        """
        if keys is not None and now is None:
            raise LocalProtocolError("verifying instance records needs the current time")
        agent_id = _agent(agent_id)
        answer = _json(await self._request("GET", f"/v1/agents/{agent_id}/instances"))
        if type(answer) is not list:
            raise MalformedFrame("registry instances answer is not a list")
        records = [_instance_record(item, agent_id) for item in answer]
        if keys is None or now is None:
            return records
        checked = []
        for record in records:
            try:
                record.verify(keys, now=now)
            except (SignatureInvalid, StaleMessage):
                continue
            checked.append(record)
        return checked

    # -- split brain ----------------------------------------------------------------------

    async def duplicates(self, agent_id: str) -> DuplicateReport:
        """Whether ``agent_id`` runs as overlapping instances, and its live instances.

        An agent the registry knows nothing about is reported as not duplicated
        with no instances. The report is the registry's judgement, unsigned.

        Raises:
            MalformedFrame: the answer is not a report on ``agent_id`` in the
                documented shape.
            PeerNotFound: the registry is older than this route.
            RegistryUnavailable, RegistryRejected: see the module table.
        """
        agent_id = _agent(agent_id)
        answer = _json(await self._request("GET", f"/v1/agents/{agent_id}/duplicates"))
        report = _duplicate_report(answer)
        if report.agent_id != agent_id:
            raise MalformedFrame(f"registry answered another agent's report for {agent_id}")
        return report

    async def all_duplicates(self) -> list[DuplicateReport]:
        """Every identity the registry sees running as overlapping instances, by agent id.

        The registry lists at most 1000; when it had more, a warning is
        logged (``talos.discovery``) and the first ones are returned.

        Raises:
            MalformedFrame: the answer is not in the documented shape, or lists
                an identity twice or one that is not duplicated.
            PeerNotFound: the registry is older than this route.
            RegistryUnavailable, RegistryRejected: see the module table.
        """
        answer = _json_object(await self._request("GET", "/v1/duplicates"))
        if set(answer) != {"duplicates", "truncated"}:
            raise MalformedFrame("registry duplicates answer has unexpected fields")
        items, truncated = answer["duplicates"], answer["truncated"]
        if type(items) is not list or type(truncated) is not bool:
            raise MalformedFrame("registry duplicates answer has fields of the wrong type")
        reports = [_duplicate_report(item) for item in items]
        if not all(r.duplicate for r in reports):
            raise MalformedFrame("registry listed an identity that is not duplicated")
        if len({r.agent_id for r in reports}) != len(reports):
            raise MalformedFrame("registry listed an identity twice")
        if truncated:
            log.warning(
                "registry %s lists only %d duplicated identities; there are more",
                self.base_url,
                len(reports),
                extra={"event": "duplicates_truncated", "peer_id": None},
            )
        return reports

    # -- revocation lists ---------------------------------------------------------------

    async def publish_revocations(self, lst: RevocationList) -> str:
        """Publish an issuer's list; returns the registry's merge outcome (``adopted``...).

        Raises:
            RegistryRejected: an older version (``StaleSequence``), a fork
                (``RevocationListForked``) or a list dropping revocations
                (``RevocationListNotAppendOnly``), or a bad signature.
            RegistryUnavailable: see the module table.
        """
        answer = _json_object(await self._put(f"/v1/revocations/{lst.issuer}", lst.to_bytes()))
        outcome = answer.get("outcome")
        if type(outcome) is not str:
            raise MalformedFrame("registry answer has no outcome")
        return outcome

    async def fetch_revocations(
        self, issuer: str, keys: KeyLookup | None = None
    ) -> RevocationList | None:
        """The issuer's list, or ``None`` when the registry has none; verified with ``keys``.

        Raises:
            SignatureInvalid: ``keys`` given and the list is not signed by the issuer.
            MalformedFrame, UnsupportedVersion: undecodable, or another issuer's.
            RegistryUnavailable: see the module table.
        """
        issuer = _agent(issuer)
        try:
            data = await self._request("GET", f"/v1/revocations/{issuer}")
        except PeerNotFound:
            return None
        lst = RevocationList.from_bytes(data)
        if lst.issuer != issuer:
            raise MalformedFrame(f"registry served another issuer's revocation list for {issuer}")
        if keys is not None:
            lst.verify_signature(keys)
        return lst

    # -- transport ------------------------------------------------------------------------

    async def _put(self, path: str, body: bytes) -> bytes:
        return await self._request("PUT", path, body)

    async def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """Send one request; return the body of a 2xx answer.

        Raises:
            RegistryUnavailable: no answer (connection, timeout, protocol) or 5xx.
            PeerNotFound: 404.
            RegistryRejected: another 4xx (or an unexpected status).
            MalformedFrame: the answer is larger than :data:`MAX_RESPONSE`.
        """
        headers = {"accept": f"{_CBOR}, application/json"}
        if body is not None:
            headers["content-type"] = _CBOR
        try:
            request = self._http.build_request(method, path, content=body, headers=headers)
            response = await self._http.send(request, stream=True)
            try:
                data = await _read_bounded(response)
            finally:
                await response.aclose()
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise RegistryUnavailable(
                f"registry {self.base_url} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        return _check_status(response.status_code, data, self.base_url)


async def _read_bounded(response: httpx.Response) -> bytes:
    """Raises: MalformedFrame: the answer exceeds :data:`MAX_RESPONSE`."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise MalformedFrame(f"registry answer exceeds {MAX_RESPONSE} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_status(status: int, data: bytes, base_url: str) -> bytes:
    """The body of a 2xx answer; the documented error otherwise."""
    if 200 <= status < 300:
        return data
    kind, reason = _error_body(data)
    if status >= 500:
        raise RegistryUnavailable(f"registry {base_url} failed ({status} {kind}): {reason}")
    if status == 404:
        raise PeerNotFound(reason)
    raise RegistryRejected(status, kind, reason)


def _error_body(data: bytes) -> tuple[str, str]:
    """The registry's ``{"error", "reason"}``, or a placeholder for anything else."""
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):
        return "HTTPError", data[:200].decode("utf-8", "replace")
    if type(answer) is dict and type(answer.get("error")) is str:
        return answer["error"], str(answer.get("reason", ""))[:1000]
    return "HTTPError", data[:200].decode("utf-8", "replace")


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise MalformedFrame("registry answer is not JSON") from None


def _json_object(data: bytes) -> dict[str, Any]:
    answer = _json(data)
    if type(answer) is not dict:
        raise MalformedFrame("registry answer is not a JSON object")
    return answer


def _json_int(answer: dict[str, Any], key: str) -> int:
    value = answer.get(key)
    if type(value) is not int or value < 0:
        raise MalformedFrame(f"registry answer field {key!r} is not a non-negative integer")
    return value


def _instance_record(item: Any, agent_id: str) -> PeerRecord:
    if type(item) is not dict or type(item.get("record")) is not str:
        raise MalformedFrame("registry instance entry has no record")
    try:
        data = bytes.fromhex(item["record"])
    except ValueError:
        raise MalformedFrame("registry instance record is not hex") from None
    record = PeerRecord.from_bytes(data)
    if record.agent_id != agent_id:
        raise MalformedFrame(f"registry listed another agent's record for {agent_id}")
    return record


def _duplicate_report(item: Any) -> DuplicateReport:
    """Raises: MalformedFrame: not ``{"agent_id", "duplicate", "instances"}`` as documented."""
    if type(item) is not dict or set(item) != {"agent_id", "duplicate", "instances"}:
        raise MalformedFrame("registry duplicate report has unexpected fields")
    agent_id, duplicate, instances = item["agent_id"], item["duplicate"], item["instances"]
    if type(agent_id) is not str or type(duplicate) is not bool or type(instances) is not list:
        raise MalformedFrame("registry duplicate report has fields of the wrong type")
    listed = tuple(_duplicate_instance(i) for i in instances)
    if len({i.instance_id for i in listed}) != len(listed):
        raise MalformedFrame("registry duplicate report lists an instance twice")
    if duplicate and len(listed) < 2:
        raise MalformedFrame("registry reports a duplicate with fewer than two instances")
    return DuplicateReport(check_agent_id(agent_id), duplicate, listed)


def _duplicate_instance(item: Any) -> DuplicateInstance:
    """Raises: MalformedFrame: not an instance entry as documented."""
    if type(item) is not dict or set(item) != _INSTANCE_FIELDS:
        raise MalformedFrame("registry duplicate instance has unexpected fields")
    instance_id, endpoint = item["instance_id"], item["endpoint"]
    if type(instance_id) is not str or not _INSTANCE_HEX.fullmatch(instance_id):
        raise MalformedFrame(f"registry instance id is not {INSTANCE_ID_SIZE} bytes of hex")
    if type(endpoint) is not str or not 0 < len(endpoint) <= MAX_ENDPOINT_LENGTH:
        raise MalformedFrame("registry instance endpoint is not a short string")
    times = [item[key] for key in ("first_seen_ms", "issued_ms", "expires_ms")]
    if any(type(t) is not int or not 0 <= t <= _U64 for t in times):
        raise MalformedFrame("registry instance times are not unsigned 64-bit integers")
    return DuplicateInstance(instance_id, endpoint, times[0], times[1], times[2])


def _agent(agent_id: str) -> str:
    """Raises: MalformedFrame: not an agent id (it would be put in a URL path)."""
    return check_agent_id(agent_id)
