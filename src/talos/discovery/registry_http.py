"""HTTP plumbing of the registry client: one request, its bounded answer, failures as Talos errors.

:class:`RegistryHttp` owns one connection pool per registry URL (replicas of
one registry): :class:`talos.discovery.http1.Http1Pool` (kept-alive HTTP/1.1
connections, a third of httpx's CPU per request) where it behaves as httpx
would (:func:`talos.discovery.http1.usable`: no proxy configured, no
credentials in the URL), an httpx client otherwise, and always when a
``transport`` replaces the network. It sends a request with the CBOR/JSON content headers, reads
at most :data:`MAX_RESPONSE` bytes of the answer, and maps every failure to a
Talos error (the table is in :mod:`talos.discovery.registry_client`). A URL
that does not answer (no connection, timeout, 5xx) is replaced by the next
one the failover policy names (:mod:`talos.discovery.failover`); when none
answers, :class:`~talos.errors.RegistryUnavailable` is raised. A 4xx is an
answer: a refused submission would be refused again, by any replica. What
the answer means is the typed operations' business
(:class:`~talos.discovery.registry_client.RegistryClient`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Final

import h11
import httpx

from talos.core.clock import Clock
from talos.discovery.failover import Failover, Switch, public_url
from talos.discovery.http1 import AnswerTooLarge, Http1Pool, usable
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

log = logging.getLogger("talos.discovery")

#: Told the outcome of every contact: (public URL, answered).
Observer = Callable[[str, bool], None]


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
    """Requests to the registry at ``base_url`` (one URL, or several replicas of one registry).

    ``transport`` replaces the network; ``clock`` times the return to the
    first URL (:mod:`talos.discovery.failover`); ``observe`` is told the
    outcome of every contact with each URL (the per-URL gauge).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
        observe: Observer | None = None,
    ) -> None:
        """Raises: ConfigurationError: no URL, a URL that is not http(s), or one given twice."""
        urls = check_urls(base_url)
        self.urls = tuple(public_url(url) for url in urls)
        self.base_url = self.urls[0]
        self._pools = [
            Http1Pool(url, timeout=timeout) if transport is None and usable(url) else None
            for url in urls
        ]
        self._clients = [
            None
            if pool is not None
            else httpx.AsyncClient(
                base_url=url, timeout=timeout, transport=transport, follow_redirects=False
            )
            for url, pool in zip(urls, self._pools, strict=True)
        ]
        self._failover = Failover(len(urls))
        self._clock = clock
        self._observe = observe

    @property
    def current_url(self) -> str:
        """The URL requests go to first now (without credentials)."""
        return self.urls[self._failover.current]

    async def aclose(self) -> None:
        """Close the connection pools."""
        for pool in self._pools:
            if pool is not None:
                await pool.aclose()
        for client in self._clients:
            if client is not None:
                await client.aclose()

    async def get(self, path: str) -> bytes:
        """The body of a 2xx answer to ``GET path``; raises as :meth:`request`."""
        return await self.request("GET", path)

    async def put(self, path: str, body: bytes) -> bytes:
        """The body of a 2xx answer to ``PUT path`` with a CBOR body; raises as :meth:`request`."""
        return await self.request("PUT", path, body)

    async def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """Send one request, to each URL in the failover order until one answers.

        Raises:
            RegistryUnavailable: no URL answered (connection, timeout, protocol, 5xx);
                the message names the last failure.
            PeerNotFound: 404.
            RegistryRejected: another 4xx (or an unexpected status).
            MalformedFrame: the answer is larger than :data:`MAX_RESPONSE`.
        """
        failure: RegistryUnavailable | None = None
        for index in self._failover.order(self._now()):
            try:
                answer = await self._send(index, method, path, body)
            except RegistryUnavailable as exc:
                self._failover.failed(index, self._now())
                self._tell(index, answered=False)
                failure = exc
                continue
            self._tell(index, answered=True)
            self._switched(self._failover.answered(index, self._now()), failure)
            return answer.result()
        assert failure is not None  # noqa: S101 -- order() names at least one URL
        raise failure

    async def _send(self, index: int, method: str, path: str, body: bytes | None) -> _Answer:
        """One request to URL ``index``. Raises: RegistryUnavailable: no answer, or 5xx."""
        headers = {"accept": f"{_CBOR}, application/json"}
        if body is not None:
            headers["content-type"] = _CBOR
        client, url = self._clients[index], self.urls[index]
        pool = self._pools[index]
        if pool is not None:
            try:
                status, data = await pool.request(
                    method, path, headers=list(headers.items()), body=body, limit=MAX_RESPONSE
                )
            except AnswerTooLarge:
                raise MalformedFrame(f"registry answer exceeds {MAX_RESPONSE} bytes") from None
            except (OSError, TimeoutError, h11.ProtocolError) as exc:
                raise RegistryUnavailable(
                    f"registry {url} unreachable: {type(exc).__name__}: {exc}"
                ) from None
            if status >= 500:
                kind, reason = _error_body(data)
                raise RegistryUnavailable(f"registry {url} failed ({status} {kind}): {reason}")
            return _Answer(status, data, url)
        assert client is not None  # noqa: S101 -- a URL has a pool or an httpx client
        try:
            request = client.build_request(method, path, content=body, headers=headers)
            response = await client.send(request, stream=True)
            try:
                data = await _read_bounded(response)
            finally:
                await response.aclose()
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise RegistryUnavailable(
                f"registry {url} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        status = response.status_code
        if status >= 500:
            kind, reason = _error_body(data)
            raise RegistryUnavailable(f"registry {url} failed ({status} {kind}): {reason}")
        return _Answer(status, data, url)

    def _now(self) -> float:
        return 0.0 if self._clock is None else self._clock.time()

    def _tell(self, index: int, *, answered: bool) -> None:
        if self._observe is not None:
            self._observe(self.urls[index], answered)

    def _switched(self, switch: Switch | None, failure: RegistryUnavailable | None) -> None:
        """Log a change of the current URL (``registry_failover``, ``registry_failback``)."""
        if switch is None:
            return
        old, new = self.urls[switch.old], self.urls[switch.new]
        if switch.failback:
            log.info(
                "back to the first registry %s (was using %s)",
                new,
                old,
                extra={"event": "registry_failback", "peer_id": None},
            )
        else:
            log.warning(
                "registry %s not answering (%s); using %s",
                old,
                failure,
                new,
                extra={"event": "registry_failover", "peer_id": None},
            )


class _Answer:
    """An answer that is not a 5xx: its body, or the error its status means."""

    def __init__(self, status: int, data: bytes, url: str) -> None:
        self.status, self.data, self.url = status, data, url

    def result(self) -> bytes:
        return _check_status(self.status, self.data, self.url)


def check_urls(base_url: str | Sequence[str]) -> tuple[str, ...]:
    """The registry URLs, normalized (one string is one URL).

    Raises:
        ConfigurationError: no URL, a URL that is not http(s)://host[:port], or
            the same URL twice.
    """
    given = (base_url,) if isinstance(base_url, str) else tuple(base_url)
    if not given:
        raise ConfigurationError("registry_url: give at least one registry URL")
    urls = tuple(_check_url(url) for url in given)
    if len({public_url(url) for url in urls}) != len(urls):  # also the label and log name
        raise ConfigurationError("registry_url: the same registry URL is given twice")
    return urls


def _check_url(base_url: object) -> str:
    """Raises: ConfigurationError: not an http(s) URL."""
    if not isinstance(base_url, str):
        raise ConfigurationError(f"a registry URL must be a string, not {type(base_url).__name__}")
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise ConfigurationError(f"invalid registry URL {public_url(base_url)!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            f"registry URL must be http(s)://host[:port]: {public_url(str(url))!r}"
        )
    return str(url).rstrip("/")


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
