"""HTTP plumbing of the registry client: one request, its bounded answer, failures as Talos errors.

:class:`RegistryHttp` owns the connection pool to one registry. It sends a
request with the CBOR/JSON content headers, reads at most
:data:`MAX_RESPONSE` bytes of the answer, and maps every failure to a Talos
error (the table is in :mod:`talos.discovery.registry_client`). It never
retries: an unreachable registry is reported at once, and a refused
submission would be refused again. What the answer means is the typed
operations' business (:class:`~talos.discovery.registry_client.RegistryClient`).
"""

from __future__ import annotations

import json
from typing import Final

import httpx

from talos.errors import (
    ConfigurationError,
    MalformedFrame,
    PeerNotFound,
    PeerRejected,
    RegistryUnavailable,
)

__all__ = ["DEFAULT_TIMEOUT", "MAX_RESPONSE", "RegistryHttp", "RegistryRejected"]

DEFAULT_TIMEOUT: Final = 5.0
#: Largest answer read from the registry (a key log or revocation list is at most 1 MiB).
MAX_RESPONSE: Final = (1 << 20) + 4096
_CBOR: Final = "application/cbor"


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


class RegistryHttp:
    """Requests to one registry at ``base_url``; ``transport`` replaces the network."""

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

    async def get(self, path: str) -> bytes:
        """The body of a 2xx answer to ``GET path``; raises as :meth:`request`."""
        return await self.request("GET", path)

    async def put(self, path: str, body: bytes) -> bytes:
        """The body of a 2xx answer to ``PUT path`` with a CBOR body; raises as :meth:`request`."""
        return await self.request("PUT", path, body)

    async def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
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
