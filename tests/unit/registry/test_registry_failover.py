"""RegistryClient over several URLs: failover on no answer or 5xx, never on a 4xx.

The registry is the real app (over ASGI); a dead replica is a real loopback
port nobody listens on (connection refused); a failing one is an HTTP server
answering 503, as a replica that lost its database does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest
from registry_fixtures import Agent, Served

from talos.discovery import RegistryClient, RegistryRejected
from talos.discovery.failover import RETURN_AFTER
from talos.errors import ConfigurationError, PeerNotFound, RegistryUnavailable
from talos.metrics import AgentMetrics
from talos.testing import FakeClock
from talos.testing.processes import free_port

pytestmark = pytest.mark.asyncio

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def unavailable(scope: Scope, receive: Receive, send: Send) -> None:
    """A replica that lost its database: every request is a 503 StorageError."""
    body = json.dumps({"error": "StorageError", "reason": "database unreachable"}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Network(httpx.AsyncBaseTransport):
    """Hosts ``registry`` (the real app) and ``broken`` (503); anything else over real sockets."""

    def __init__(self, served: Served) -> None:
        self.hosts: dict[str, httpx.AsyncBaseTransport] = {
            "registry": served.transport,
            "broken": httpx.ASGITransport(app=unavailable),
        }
        self.real = httpx.AsyncHTTPTransport()
        self.asked: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(request.url.host)
        transport = self.hosts.get(request.url.host, self.real)
        return await transport.handle_async_request(request)

    def down(self, host: str) -> None:
        """``host`` stops answering (its requests go to a closed port)."""
        self.hosts.pop(host)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def client(urls: list[str], network: Network, clock: FakeClock, **kw: Any) -> RegistryClient:
    return RegistryClient(urls, transport=network, clock=clock, **kw)


async def test_a_dead_first_url_fails_over_and_stays_on_the_second(
    served: Served, alice: Agent, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    network = Network(served)
    dead = dead_url()
    caplog.set_level(logging.INFO, "talos.discovery")
    async with client([dead, "http://registry"], network, clock) as registry:
        await registry.publish_keylog(alice.identity.keylog)  # a write
        assert registry.current_url == "http://registry"
        assert (await registry.fetch_keylog(alice.agent_id)).agent_id == alice.agent_id  # a read
    assert network.asked == ["127.0.0.1", "registry", "registry"]
    events = [r.__dict__.get("event") for r in caplog.records]
    assert events.count("registry_failover") == 1
    line = next(r for r in caplog.records if r.__dict__.get("event") == "registry_failover")
    assert dead in line.getMessage()
    assert "http://registry" in line.getMessage()


async def test_a_503_fails_over(served: Served, alice: Agent, clock: FakeClock) -> None:
    network = Network(served)
    async with client(["http://broken", "http://registry"], network, clock) as registry:
        await registry.publish_keylog(alice.identity.keylog)
        assert registry.current_url == "http://registry"


async def test_a_refusal_or_not_found_is_an_answer_not_a_failure(
    served: Served, alice: Agent, clock: FakeClock
) -> None:
    network = Network(served)
    async with client(["http://registry", dead_url()], network, clock) as registry:
        with pytest.raises(PeerNotFound):
            await registry.fetch_keylog(alice.agent_id)
        with pytest.raises(RegistryRejected):  # prekeys of an unknown agent
            await registry.publish_prekeys(alice.upload(1))
        assert registry.current_url == "http://registry"
    assert network.asked == ["registry", "registry"]


async def test_none_answering_is_registry_unavailable(served: Served, clock: FakeClock) -> None:
    network = Network(served)
    async with client([dead_url(), "http://broken"], network, clock) as registry:
        with pytest.raises(RegistryUnavailable, match="503"):
            await registry.time_ms()


async def test_back_to_the_first_url_after_return_after(
    served: Served, alice: Agent, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    network = Network(served)
    network.hosts["first"] = network.hosts.pop("registry")
    network.hosts["second"] = network.hosts["first"]
    caplog.set_level(logging.INFO, "talos.discovery")
    async with client(["http://first", "http://second"], network, clock) as registry:
        network.down("first")
        await registry.time_ms()
        assert registry.current_url == "http://second"
        network.hosts["first"] = network.hosts["second"]  # repaired
        clock.advance(RETURN_AFTER - 1)
        await registry.time_ms()
        assert registry.current_url == "http://second"
        clock.advance(1)
        await registry.time_ms()
        assert registry.current_url == "http://first"
    assert network.asked == ["first", "second", "second", "first"]
    events = [r.__dict__.get("event") for r in caplog.records]
    assert events == ["registry_failover", "registry_failback"]


async def test_the_gauge_per_url_follows_each_contact(served: Served, clock: FakeClock) -> None:
    network = Network(served)
    dead = dead_url()
    urls = [dead, "http://user:s3cret@registry"]
    shown = [dead, "http://registry"]
    metrics = AgentMetrics(registry_urls=shown)

    def observe(url: str, answered: bool) -> None:
        metrics.set_registry_reachable(answered, url)

    async with client(urls, network, clock, observe=observe) as registry:
        assert registry.urls == tuple(shown)
        await registry.time_ms()
    text = metrics.render().decode()
    assert f'talos_registry_up{{url="{dead}"}} 0.0' in text
    assert 'talos_registry_up{url="http://registry"} 1.0' in text
    assert "s3cret" not in text


async def test_a_url_outside_the_configured_ones_is_not_a_label() -> None:
    metrics = AgentMetrics(registry_urls=["http://a"])
    metrics.set_registry_reachable(True, "http://elsewhere")
    assert "elsewhere" not in metrics.render().decode()


@pytest.mark.parametrize(
    "urls",
    [[], ["http://a", "http://a/"], ["ftp://a"], ["http://a", 3], ["http://u@a", "http://v@a"]],
)
async def test_bad_url_lists_are_refused(urls: list[Any]) -> None:
    with pytest.raises(ConfigurationError):
        RegistryClient(urls)


async def test_a_bad_url_error_shows_no_credentials() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RegistryClient(["http://a", "ftp://user:s3cret@b"])
    assert "s3cret" not in str(caught.value)
