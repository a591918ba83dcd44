"""RegistryClient.duplicates / all_duplicates: round trips and strict validation of answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from registry_fixtures import Agent, Served

from talos.discovery import RegistryClient, RegistryRejected
from talos.discovery.registry_client import DuplicateInstance, DuplicateReport
from talos.errors import MalformedFrame, PeerNotFound, RegistryUnavailable
from talos.testing import FakeClock

pytestmark = pytest.mark.asyncio

A, B = b"\x0a" * 16, b"\x0b" * 16


def fake(handler: Callable[[httpx.Request], httpx.Response]) -> RegistryClient:
    return RegistryClient("http://registry", transport=httpx.MockTransport(handler))


def answering(body: Any, status: int = 200) -> RegistryClient:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return fake(lambda request: httpx.Response(status, content=content))


def instance(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "instance_id": A.hex(),
        "endpoint": "ws://127.0.0.1:9000",
        "first_seen_ms": 1,
        "issued_ms": 2,
        "expires_ms": 3,
    }
    entry.update(changes)
    return entry


def report(agent: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "agent_id": agent,
        "duplicate": True,
        "instances": [instance(), instance(instance_id=B.hex())],
    }
    body.update(changes)
    return body


async def test_round_trip_through_the_real_app(
    served: Served, alice: Agent, bob: Agent, clock: FakeClock
) -> None:
    async with RegistryClient("http://registry", transport=served.transport) as registry:
        await registry.publish_keylog(alice.identity.keylog)
        assert await registry.duplicates(alice.agent_id) == DuplicateReport(
            alice.agent_id, False, ()
        )
        await registry.publish_record(alice.record(instance=A, endpoint="ws://10.0.0.1:1"))
        clock.advance(60)
        await registry.publish_record(alice.record(instance=B, endpoint="ws://10.0.0.2:1"))
        assert not (await registry.duplicates(alice.agent_id)).duplicate
        assert await registry.all_duplicates() == []
        clock.advance(60)
        again = alice.record(instance=A, endpoint="ws://10.0.0.1:1")
        await registry.publish_record(again)
        found = await registry.duplicates(alice.agent_id)
        start_ms = int((clock.time() - 120) * 1000)
        assert found == DuplicateReport(
            alice.agent_id,
            True,
            (
                DuplicateInstance(
                    A.hex(), "ws://10.0.0.1:1", start_ms, again.issued_ms, again.expires_ms
                ),
                DuplicateInstance(
                    B.hex(),
                    "ws://10.0.0.2:1",
                    start_ms + 60_000,
                    start_ms + 60_000,
                    start_ms + 60_000 + 300_000,
                ),
            ),
        )
        assert await registry.all_duplicates() == [found]
        assert not (await registry.duplicates(bob.agent_id)).duplicate


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        [],
        {"agent_id": None},
        "ALICE",  # another agent's report
        {"extra": 1},
        {"duplicate": "yes"},
        {"duplicate": 1},
        {"instances": {}},
        {"instances": [instance()]},  # a duplicate needs two instances
        {"instances": [instance(), instance()]},  # the same instance twice
        {"instances": [instance(), instance(instance_id=B.hex().upper())]},
        {"instances": [instance(), instance(instance_id=B.hex()[:-2])]},
        {"instances": [instance(), instance(instance_id=B.hex() + "\n")]},
        {"instances": [instance(), instance(instance_id=7)]},
        {"instances": [instance(), instance(instance_id=B.hex(), endpoint="")]},
        {"instances": [instance(), instance(instance_id=B.hex(), endpoint="ws://" + "x" * 300)]},
        {"instances": [instance(), instance(instance_id=B.hex(), issued_ms=-1)]},
        {"instances": [instance(), instance(instance_id=B.hex(), expires_ms=True)]},
        {"instances": [instance(), instance(instance_id=B.hex(), first_seen_ms=1.5)]},
        {"instances": [instance(), instance(instance_id=B.hex(), first_seen_ms=2**64)]},
        {"instances": [instance(), {"instance_id": B.hex()}]},
        {"instances": [instance(), {**instance(instance_id=B.hex()), "record": "00"}]},
    ],
)
async def test_bad_reports_are_malformed(alice: Agent, bob: Agent, body: Any) -> None:
    if isinstance(body, dict):
        body = report(alice.agent_id, **body)
    elif body == "ALICE":
        body = report(bob.agent_id)
    async with answering(body) as registry:
        with pytest.raises(MalformedFrame):
            await registry.duplicates(alice.agent_id)


@pytest.mark.parametrize(
    "body",
    [
        b"[",
        [],
        {"duplicates": []},
        {"duplicates": [], "truncated": "no"},
        {"duplicates": {}, "truncated": False},
        {"duplicates": [], "truncated": False, "more": 1},
        {"duplicates": ["ALICE", "ALICE"], "truncated": False},  # one identity twice
        {"duplicates": ["NOT DUPLICATED"], "truncated": False},
        {"duplicates": ["BAD ID"], "truncated": False},
    ],
)
async def test_bad_listings_are_malformed(alice: Agent, body: Any) -> None:
    if isinstance(body, dict) and isinstance(body.get("duplicates"), list):
        entries = {
            "ALICE": report(alice.agent_id),
            "NOT DUPLICATED": report(alice.agent_id, duplicate=False),
            "BAD ID": report("did:talos:znope"),
        }
        body["duplicates"] = [entries[name] for name in body["duplicates"]]
    async with answering(body) as registry:
        with pytest.raises(MalformedFrame):
            await registry.all_duplicates()


async def test_a_truncated_listing_is_returned_with_a_warning(
    alice: Agent, bob: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"duplicates": [report(alice.agent_id), report(bob.agent_id)], "truncated": True}
    with caplog.at_level(logging.WARNING, logger="talos.discovery"):
        async with answering(body) as registry:
            reports = await registry.all_duplicates()
    assert [r.agent_id for r in reports] == [alice.agent_id, bob.agent_id]
    assert reports[0].instances[1].instance_id == B.hex()
    assert "only 2 duplicated identities" in caplog.text


async def test_failures_are_the_documented_errors(alice: Agent) -> None:
    for method, args in (("duplicates", (alice.agent_id,)), ("all_duplicates", ())):
        async with answering(b"overloaded", 503) as registry:
            with pytest.raises(RegistryUnavailable):
                await getattr(registry, method)(*args)
        refusal = {"error": "NotFound", "reason": "old registry"}
        async with answering(refusal, 404) as registry:
            with pytest.raises(PeerNotFound, match="old registry"):
                await getattr(registry, method)(*args)
        async with answering({"error": "Nope", "reason": "refused"}, 403) as registry:
            with pytest.raises(RegistryRejected, match="refused"):
                await getattr(registry, method)(*args)
    async with answering(report(alice.agent_id)) as registry:
        with pytest.raises(MalformedFrame):  # never put in a URL
            await registry.duplicates("did:talos:z../../v1/time")
