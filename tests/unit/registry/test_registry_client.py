"""RegistryClient against the real app over ASGI, and against misbehaving servers."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import httpx
import pytest
from registry_fixtures import Agent, Served

from talos.core.contact import Contact
from talos.core.keylog import IssuerKeys
from talos.discovery import RegistryClient, RegistryRejected
from talos.errors import (
    ConfigurationError,
    KeyLogInvalid,
    MalformedFrame,
    PeerNotFound,
    PeerRejected,
    RegistryUnavailable,
    SignatureInvalid,
    StaleMessage,
)
from talos.testing import FakeClock

pytestmark = pytest.mark.asyncio


def client_for(served: Served) -> RegistryClient:
    return RegistryClient("http://registry", transport=served.transport)


async def test_round_trips(served: Served, alice: Agent, clock: FakeClock) -> None:
    async with client_for(served) as registry:
        assert await registry.time_ms() == int(clock.time() * 1000)
        await registry.publish_keylog(alice.identity.keylog)
        known = await registry.fetch_keylog(alice.agent_id)
        alice.rotate()
        await registry.publish_keylog(alice.identity.keylog)
        extended = await registry.fetch_keylog(alice.agent_id, known)
        assert len(extended) == 2
        keys = IssuerKeys([extended])

        assert await registry.publish_prekeys(alice.upload(1)) == 1
        assert (await registry.prekey_status(alice.agent_id)).one_time_prekeys == 1
        bundle = await registry.fetch_bundle(alice.agent_id)
        assert bundle.one_time_prekey_id is not None
        assert (await registry.fetch_bundle(alice.agent_id)).one_time_prekey_id is None

        record = alice.record()
        await registry.publish_record(record)
        assert await registry.fetch_record(alice.agent_id, keys, clock.time()) == record
        assert await registry.instances(alice.agent_id, keys, now=clock.time()) == [record]

        assert await registry.fetch_revocations(alice.agent_id) is None
        lst = alice.revocations(1)
        assert await registry.publish_revocations(lst) == "adopted"
        assert await registry.fetch_revocations(alice.agent_id, keys) == lst


async def test_refusals_carry_the_registry_reason(served: Served, alice: Agent) -> None:
    async with client_for(served) as registry:
        await registry.publish_keylog(alice.identity.keylog)
        record = alice.record()
        await registry.publish_record(record)
        with pytest.raises(RegistryRejected) as caught:
            await registry.publish_record(record)
        assert (caught.value.status, caught.value.kind) == (409, "StaleSequence")
        assert isinstance(caught.value, PeerRejected)
        assert "not above" in caught.value.reason
        with pytest.raises(PeerNotFound):
            await registry.fetch_bundle(alice.agent_id)


async def test_fetch_keylog_refuses_a_rollback(served: Served, alice: Agent) -> None:
    async with client_for(served) as registry:
        await registry.publish_keylog(alice.identity.keylog)
        alice.rotate()
        with pytest.raises(KeyLogInvalid, match="rollback"):
            await registry.fetch_keylog(alice.agent_id, alice.identity.keylog)


async def test_fetch_record_verifies(
    served: Served, alice: Agent, bob: Agent, clock: FakeClock
) -> None:
    async with client_for(served) as registry:
        await registry.publish_keylog(alice.identity.keylog)
        await registry.publish_record(alice.record(lifetime=10))
        with pytest.raises(SignatureInvalid):  # keys that do not know alice
            await registry.fetch_record(
                alice.agent_id, IssuerKeys([bob.identity.keylog]), clock.time()
            )
        keys = IssuerKeys([alice.identity.keylog])
        with pytest.raises(StaleMessage):  # the caller's clock says it expired
            await registry.fetch_record(alice.agent_id, keys, clock.time() + 1000)
        assert await registry.instances(alice.agent_id, keys, now=clock.time() + 1000) == []


def fake(handler: Callable[[httpx.Request], httpx.Response]) -> RegistryClient:
    return RegistryClient("http://registry", transport=httpx.MockTransport(handler))


async def test_server_failures_are_registry_unavailable(alice: Agent) -> None:
    async with fake(lambda request: httpx.Response(502, text="bad gateway")) as registry:
        with pytest.raises(RegistryUnavailable, match="502"):
            await registry.time_ms()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with fake(refuse) as registry:
        with pytest.raises(RegistryUnavailable):
            await registry.publish_keylog(alice.identity.keylog)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with fake(slow) as registry:
        with pytest.raises(RegistryUnavailable):
            await registry.fetch_revocations(alice.agent_id)


@pytest.mark.parametrize(
    ("content", "method"),
    [
        (b"\xff\x00junk", "fetch_keylog"),
        (b"\xff\x00junk", "fetch_bundle"),
        (b"\xff\x00junk", "fetch_contact"),
        (b"\xff\x00junk", "fetch_revocations"),
        (b"[1, 2", "time_ms"),
        (b'{"time_ms": -1}', "time_ms"),
        (b'[{"record": "zz"}]', "instances"),
        (b"x" * (2 << 20), "fetch_keylog"),
    ],
)
async def test_bad_bytes_from_the_server_are_malformed(
    alice: Agent, content: bytes, method: str
) -> None:
    async with fake(lambda request: httpx.Response(200, content=content)) as registry:
        call = getattr(registry, method)
        args = () if method == "time_ms" else (alice.agent_id,)
        with pytest.raises(MalformedFrame):
            await call(*args)


async def test_another_agents_objects_are_refused(alice: Agent, bob: Agent) -> None:
    served_log = bob.identity.keylog.to_bytes()
    async with fake(lambda request: httpx.Response(200, content=served_log)) as registry:
        with pytest.raises(KeyLogInvalid, match="another agent"):
            await registry.fetch_keylog(alice.agent_id)
    wrong_list = bob.revocations(1).to_bytes()
    async with fake(lambda request: httpx.Response(200, content=wrong_list)) as registry:
        with pytest.raises(MalformedFrame, match="another issuer"):
            await registry.fetch_revocations(alice.agent_id)
    forged_bundle = replace(bob.prekeys.bundle(), signed_prekey_signature=bytes(64)).to_bytes()
    async with fake(lambda request: httpx.Response(200, content=forged_bundle)) as registry:
        with pytest.raises(SignatureInvalid):
            await registry.fetch_bundle(bob.agent_id)


async def test_fetch_contact(served: Served, alice: Agent, clock: FakeClock) -> None:
    async with client_for(served) as registry:
        with pytest.raises(PeerNotFound):
            await registry.fetch_contact(alice.agent_id)
        await registry.publish_keylog(alice.identity.keylog)
        bare = await registry.fetch_contact(alice.agent_id)
        assert (bare.log.to_bytes(), bare.bundle, bare.record) == (
            alice.identity.keylog.to_bytes(),
            None,
            None,
        )
        await registry.publish_prekeys(alice.upload(1))
        record = alice.record()
        await registry.publish_record(record)
        full = await registry.fetch_contact(alice.agent_id)
        assert full.bundle is not None
        assert full.bundle.one_time_prekey_id is not None
        assert full.record == record
        full.record.verify(IssuerKeys([full.log]), now=clock.time())


async def test_contact_parts_of_another_agent_are_refused(alice: Agent, bob: Agent) -> None:
    own = alice.identity.keylog.to_bytes()
    cases = [
        (Contact(log=bob.identity.keylog.to_bytes(), bundle=None, record=None), KeyLogInvalid),
        (Contact(log=own, bundle=bob.prekeys.bundle().to_bytes(), record=None), MalformedFrame),
        (Contact(log=own, bundle=None, record=bob.record().to_bytes()), MalformedFrame),
        (
            Contact(
                log=own,
                bundle=replace(
                    alice.prekeys.bundle(), signed_prekey_signature=bytes(64)
                ).to_bytes(),
                record=None,
            ),
            SignatureInvalid,
        ),
    ]
    for contact, refused in cases:
        body = contact.to_bytes()

        def serve(request: httpx.Request, body: bytes = body) -> httpx.Response:
            return httpx.Response(200, content=body)

        async with fake(serve) as registry:
            with pytest.raises(refused):
                await registry.fetch_contact(alice.agent_id)


async def test_non_json_error_bodies(alice: Agent) -> None:
    async with fake(lambda request: httpx.Response(418, text="teapot")) as registry:
        with pytest.raises(RegistryRejected) as caught:
            await registry.publish_keylog(alice.identity.keylog)
    assert (caught.value.kind, caught.value.reason) == ("HTTPError", "teapot")
    body = json.dumps({"error": "X", "reason": "why"}).encode()
    async with fake(lambda request: httpx.Response(404, content=body)) as registry:
        with pytest.raises(PeerNotFound, match="why"):
            await registry.fetch_keylog(alice.agent_id)


@pytest.mark.parametrize("url", ["ftp://registry", "not a url", "http://"])
async def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RegistryClient(url)


async def test_bad_agent_ids_never_reach_the_network() -> None:
    async with fake(lambda request: pytest.fail("no request expected")) as registry:
        with pytest.raises(MalformedFrame):
            await registry.fetch_keylog("../../etc/passwd")
