"""The registry's HTTP API in-process (ASGI): statuses, reasons, bounds, schema, fuzz."""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry_fixtures import CBOR, Agent, Served

from talos.core.agent_id import agent_id_from_digest
from talos.core.contact import Contact
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.core.x3dh import PrekeyBundle
from talos.errors import ConfigurationError
from talos.registry import create_app
from talos.registry.bodies import MAX_BODY
from talos.registry.drain import ONE_TIME_PREKEYS_PER_MINUTE, PrekeyLimiter
from talos.testing import FakeClock

pytestmark = pytest.mark.asyncio


async def put(served: Served, path: str, body: bytes) -> httpx.Response:
    return await served.http.put(path, content=body, headers=CBOR)


def error(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error", "reason"}
    assert body["reason"]
    return response.status_code, body["error"]


async def publish(served: Served, agent: Agent) -> None:
    response = await put(
        served, f"/v1/agents/{agent.agent_id}/keylog", agent.identity.keylog.to_bytes()
    )
    assert response.status_code == 200, response.text


async def test_time(served: Served, clock: FakeClock) -> None:
    response = await served.http.get("/v1/time")
    assert response.json() == {"time_ms": int(clock.time() * 1000)}


async def test_keylog_publish_fetch_rotate_fork(served: Served, alice: Agent) -> None:
    path = f"/v1/agents/{alice.agent_id}/keylog"
    assert error(await served.http.get(path)) == (404, "PeerNotFound")
    await publish(served, alice)
    fetched = await served.http.get(path)
    assert fetched.headers["content-type"] == "application/cbor"
    assert KeyLog.from_bytes(fetched.content).agent_id == alice.agent_id
    twin = replace(alice, rng=type(alice.rng)(5))
    alice.rotate()
    twin.rotate()
    assert (await put(served, path, alice.identity.keylog.to_bytes())).json() == {
        "changed": True,
        "sequence": 1,
    }
    response = await put(served, path, twin.identity.keylog.to_bytes())
    assert error(response) == (409, "KeyLogInvalid")
    assert "fork" in response.json()["reason"]
    assert [e.kind for e in served.store.security_events()] == ["keylog-fork"]


async def test_keylog_for_another_agent_path(served: Served, alice: Agent, bob: Agent) -> None:
    response = await put(
        served, f"/v1/agents/{bob.agent_id}/keylog", alice.identity.keylog.to_bytes()
    )
    assert error(response) == (400, "AgentMismatch")


async def test_invalid_keylog_is_422(served: Served, alice: Agent) -> None:
    log = alice.identity.keylog
    event = replace(log.events[0], timestamp_ms=1)  # signature no longer matches
    body = KeyLog.__new__(KeyLog)
    body._events, body._state = (event,), log.state  # bypass verification to forge bytes
    response = await put(served, f"/v1/agents/{alice.agent_id}/keylog", body.to_bytes())
    assert error(response) == (422, "KeyLogInvalid")


async def test_prekeys_and_bundles(served: Served, alice: Agent) -> None:
    await publish(served, alice)
    base = f"/v1/agents/{alice.agent_id}"
    assert error(await served.http.get(f"{base}/bundle")) == (404, "PeerNotFound")
    upload = alice.upload(2)
    response = await put(served, f"{base}/prekeys", upload.to_bytes())
    assert response.json() == {"sequence": 1, "one_time_prekeys": 2}
    assert error(await put(served, f"{base}/prekeys", upload.to_bytes())) == (409, "StaleSequence")
    ids = []
    for _ in range(3):
        bundle = PrekeyBundle.from_bytes((await served.http.get(f"{base}/bundle")).content)
        bundle.verify()
        ids.append(bundle.one_time_prekey_id)
    assert ids == [0, 1, None]
    status = await served.http.get(f"{base}/prekeys")
    assert status.json() == {"sequence": 1, "one_time_prekeys": 0}


async def test_records(served: Served, alice: Agent, clock: FakeClock) -> None:
    await publish(served, alice)
    base = f"/v1/agents/{alice.agent_id}"
    assert error(await served.http.get(f"{base}/record")) == (404, "PeerNotFound")
    one = alice.record(instance=b"\x01" * 16, lifetime=60)
    two = alice.record(instance=b"\x02" * 16, lifetime=600)
    assert (await put(served, f"{base}/record", one.to_bytes())).json() == {"sequence": 1}
    assert (await put(served, f"{base}/record", two.to_bytes())).status_code == 200
    assert error(await put(served, f"{base}/record", one.to_bytes())) == (409, "StaleSequence")
    assert PeerRecord.from_bytes((await served.http.get(f"{base}/record")).content) == two
    listed = (await served.http.get(f"{base}/instances")).json()
    assert [i["instance_id"] for i in listed] == ["02" * 16, "01" * 16]
    assert listed[1] == {
        "instance_id": "01" * 16,
        "endpoint": one.endpoint,
        "sequence": 1,
        "issued_ms": one.issued_ms,
        "expires_ms": one.expires_ms,
        "record": one.to_bytes().hex(),
    }
    clock.advance(601)
    assert error(await served.http.get(f"{base}/record")) == (404, "PeerNotFound")
    assert (await served.http.get(f"{base}/instances")).json() == []
    expired = alice.record(lifetime=1)
    clock.advance(100)
    assert error(await put(served, f"{base}/record", expired.to_bytes())) == (422, "StaleMessage")


async def test_contact_is_keylog_bundle_and_record_in_one(
    served: Served, alice: Agent, clock: FakeClock
) -> None:
    """/contact serves the exact bytes of /keylog, a bundle taken as /bundle takes it
    (one-time prekeys handed out once, shared with /bundle), and /record; parts the
    registry lacks are null, an agent without a key log is 404."""
    base = f"/v1/agents/{alice.agent_id}"
    assert error(await served.http.get(f"{base}/contact")) == (404, "PeerNotFound")
    await publish(served, alice)

    async def contact() -> Contact:
        response = await served.http.get(f"{base}/contact")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/cbor"
        return Contact.from_bytes(response.content)

    bare = await contact()
    assert bare.log == (await served.http.get(f"{base}/keylog")).content
    assert (bare.bundle, bare.record) == (None, None)
    await put(served, f"{base}/prekeys", alice.upload(2).to_bytes())
    record = alice.record(lifetime=60)
    await put(served, f"{base}/record", record.to_bytes())
    full = await contact()
    assert full.record == record.to_bytes()
    assert full.bundle is not None
    first = PrekeyBundle.from_bytes(full.bundle)
    first.verify()
    second = PrekeyBundle.from_bytes((await served.http.get(f"{base}/bundle")).content)
    third = await contact()
    assert third.bundle is not None
    ids = [first.one_time_prekey_id, second.one_time_prekey_id]
    assert sorted(ids) == [0, 1]  # /contact and /bundle share one pool
    assert PrekeyBundle.from_bytes(third.bundle).one_time_prekey_id is None
    assert served.app.state.metrics.bundles_without_one_time_prekey._value.get() == 1
    clock.advance(61)
    assert (await contact()).record is None  # expired: no live record


async def test_contact_takes_one_time_prekeys_under_the_same_share(
    served: Served, alice: Agent
) -> None:
    await publish(served, alice)
    base = f"/v1/agents/{alice.agent_id}"
    await put(served, f"{base}/prekeys", alice.upload(ONE_TIME_PREKEYS_PER_MINUTE + 5).to_bytes())
    for _ in range(ONE_TIME_PREKEYS_PER_MINUTE):
        assert (await served.http.get(f"{base}/bundle")).status_code == 200
    answer = Contact.from_bytes((await served.http.get(f"{base}/contact")).content)
    assert answer.bundle is not None
    assert PrekeyBundle.from_bytes(answer.bundle).one_time_prekey_id is None
    assert served.app.state.metrics.one_time_prekeys_withheld._value.get() == 1


async def test_revocations(served: Served, alice: Agent) -> None:
    path = f"/v1/revocations/{alice.agent_id}"
    assert error(await served.http.get(path)) == (404, "PeerNotFound")
    await publish(served, alice)
    v2 = alice.revocations(2, ids=(b"\x01" * 16,))
    assert (await put(served, path, v2.to_bytes())).json() == {"outcome": "adopted", "version": 2}
    assert (await served.http.get(path)).content == v2.to_bytes()
    assert error(await put(served, path, alice.revocations(1).to_bytes())) == (409, "StaleSequence")
    fork = alice.revocations(2, ids=(b"\x02" * 16,))
    assert error(await put(served, path, fork.to_bytes())) == (409, "RevocationListForked")
    shrink = alice.revocations(3)
    response = await put(served, path, shrink.to_bytes())
    assert error(response) == (409, "RevocationListNotAppendOnly")


async def test_unsigned_submissions_are_403(served: Served, alice: Agent) -> None:
    await publish(served, alice)
    base = f"/v1/agents/{alice.agent_id}"
    unsigned_record = replace(alice.record(), signature=bytes(64))
    assert error(await put(served, f"{base}/record", unsigned_record.to_bytes())) == (
        403,
        "SignatureInvalid",
    )
    unsigned_upload = replace(alice.upload(1), signature=bytes(64))
    assert error(await put(served, f"{base}/prekeys", unsigned_upload.to_bytes())) == (
        403,
        "SignatureInvalid",
    )
    unsigned_list = replace(alice.revocations(1), signature=bytes(64))
    response = await put(served, f"/v1/revocations/{alice.agent_id}", unsigned_list.to_bytes())
    assert error(response) == (403, "SignatureInvalid")


async def test_unknown_agent_is_409(served: Served, alice: Agent) -> None:
    response = await put(served, f"/v1/agents/{alice.agent_id}/record", alice.record().to_bytes())
    assert error(response) == (409, "UnknownAgent")


async def test_body_limits_and_media_type(served: Served, alice: Agent) -> None:
    path = f"/v1/agents/{alice.agent_id}/keylog"
    big = await put(served, path, b"\x00" * (MAX_BODY + 1))
    assert error(big) == (413, "PayloadTooLarge")

    async def chunks() -> object:
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"\x00" * 65536

    streamed = await served.http.put(path, content=chunks(), headers=CBOR)  # no Content-Length
    assert error(streamed) == (413, "PayloadTooLarge")
    wrong = await served.http.put(path, content=b"x", headers={"content-type": "text/plain"})
    assert error(wrong) == (415, "UnsupportedMediaType")
    assert error(await put(served, path, b"")) == (400, "MalformedFrame")


async def test_bad_paths_and_methods(served: Served) -> None:
    assert error(await served.http.get("/v1/agents/not-an-id/keylog")) == (400, "MalformedFrame")
    assert error(await served.http.get("/nowhere")) == (404, "NotFound")
    assert error(await served.http.post("/v1/time")) == (405, "MethodNotAllowed")


async def test_openapi_documents_every_route(served: Served) -> None:
    schema = (await served.http.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths) == {
        "/v1/time",
        "/v1/agents/{agent_id}/keylog",
        "/v1/agents/{agent_id}/prekeys",
        "/v1/agents/{agent_id}/bundle",
        "/v1/agents/{agent_id}/contact",
        "/v1/agents/{agent_id}/record",
        "/v1/agents/{agent_id}/instances",
        "/v1/agents/{agent_id}/duplicates",
        "/v1/duplicates",
        "/v1/revocations/{issuer}",
    }
    for path, methods in paths.items():
        for method, operation in methods.items():
            assert operation["summary"], (path, method)
            assert "200" in operation["responses"], (path, method)
            if method == "put":
                assert "application/cbor" in operation["requestBody"]["content"]
                assert {"400", "403", "409", "413"} <= set(operation["responses"])


async def test_concurrent_bundle_fetches(served: Served, alice: Agent) -> None:
    await publish(served, alice)
    base = f"/v1/agents/{alice.agent_id}"
    await put(served, f"{base}/prekeys", alice.upload(10).to_bytes())
    answers = await asyncio.gather(*(served.http.get(f"{base}/bundle") for _ in range(20)))
    ids = [PrekeyBundle.from_bytes(a.content).one_time_prekey_id for a in answers]
    assert sorted(i for i in ids if i is not None) == list(range(10))
    assert ids.count(None) == 10


async def test_one_address_takes_only_its_share_of_one_time_prekeys(
    served: Served, alice: Agent, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Drain protection: past ONE_TIME_PREKEYS_PER_MINUTE from one address, bundles
    carry no one-time prekey and the pool is kept for other addresses."""
    await publish(served, alice)
    base = f"/v1/agents/{alice.agent_id}"
    await put(served, f"{base}/prekeys", alice.upload(ONE_TIME_PREKEYS_PER_MINUTE + 10).to_bytes())

    async def take(http: httpx.AsyncClient) -> int | None:
        response = await http.get(f"{base}/bundle")
        bundle = PrekeyBundle.from_bytes(response.content)
        bundle.verify()
        return bundle.one_time_prekey_id

    share = [await take(served.http) for _ in range(ONE_TIME_PREKEYS_PER_MINUTE)]
    assert None not in share
    assert len(set(share)) == ONE_TIME_PREKEYS_PER_MINUTE
    assert [await take(served.http) for _ in range(5)] == [None] * 5
    left = (await served.http.get(f"{base}/prekeys")).json()["one_time_prekeys"]
    assert left == 10
    metrics = served.app.state.metrics
    assert metrics.one_time_prekeys_withheld._value.get() == 5
    assert metrics.bundles_without_one_time_prekey._value.get() == 0
    withheld = [r for r in caplog.records if getattr(r, "event", "") == "one_time_prekeys_withheld"]
    assert len(withheld) == 1  # one warning per address per minute, not one per bundle
    assert withheld[0].address == "127.0.0.1"

    other = httpx.ASGITransport(app=served.app, client=("10.0.0.2", 4000))
    async with httpx.AsyncClient(transport=other, base_url="http://registry") as http:
        assert await take(http) is not None  # another address still gets one
    clock.advance(60 / ONE_TIME_PREKEYS_PER_MINUTE)
    assert await take(served.http) is not None  # the share refills with time
    assert await take(served.http) is None


async def test_prekey_limits_key_ipv6_clients_by_their_64_and_bound_them_across_agents(
    tmp_path: Path, clock: FakeClock, alice: Agent, bob: Agent
) -> None:
    app = create_app(tmp_path / "r.db", clock=clock, one_time_prekeys_per_minute=1)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            served = Served(app, http, transport)
            for agent in (alice, bob):
                await publish(served, agent)
                await put(
                    served, f"/v1/agents/{agent.agent_id}/prekeys", agent.upload(5).to_bytes()
                )

        async def take(client: str, agent: Agent) -> int | None:
            asgi = httpx.ASGITransport(app=app, client=(client, 1234))
            async with httpx.AsyncClient(transport=asgi, base_url="http://registry") as http:
                answer = await http.get(f"/v1/agents/{agent.agent_id}/bundle")
            return PrekeyBundle.from_bytes(answer.content).one_time_prekey_id

        assert await take("2001:db8::1", alice) is not None
        assert await take("2001:db8::2", alice) is None  # the same /64: the same client
        assert await take("2001:db8:0:1::5", alice) is not None  # another /64
        assert await take("::ffff:192.0.2.7", alice) is not None  # IPv4-mapped: by its IPv4
        assert await take("192.0.2.7", alice) is None
        assert await take("2001:db8::1", bob) is not None  # per agent

        # Unknown agents leave no bucket behind (they cannot push real ones out).
        asgi = httpx.ASGITransport(app=app, client=("192.0.2.9", 1))
        async with httpx.AsyncClient(transport=asgi, base_url="http://registry") as http:
            unknown = agent_id_from_digest(b"\x07" * 32)
            assert (await http.get(f"/v1/agents/{unknown}/bundle")).status_code == 404
        pairs = app.state.prekey_limiter._limiter._pairs._buckets  # noqa: SLF001 -- the table itself
        assert ("192.0.2.9", unknown) not in pairs
        assert ("192.0.2.7", alice.agent_id) in pairs


async def test_one_client_takes_at_most_ten_agents_worth_per_minute() -> None:
    limiter = PrekeyLimiter(2)
    taken = [limiter.allow("c", f"agent{n}", 0.0) for n in range(11) for _ in range(2)]
    assert taken == [True] * 20 + [False] * 2
    assert limiter.allow("other", "agent0", 0.0)
    assert limiter.allow("c", "agent0", 60.0)  # refilled


async def test_unbounded_prekeys_when_configured(
    tmp_path: Path, clock: FakeClock, alice: Agent
) -> None:
    with pytest.raises(ConfigurationError):
        create_app(tmp_path / "r.db", clock=clock, one_time_prekeys_per_minute=-1)
    app = create_app(tmp_path / "r.db", clock=clock, one_time_prekeys_per_minute=0)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            served = Served(app, http, transport)
            await publish(served, alice)
            base = f"/v1/agents/{alice.agent_id}"
            count = ONE_TIME_PREKEYS_PER_MINUTE + 5
            await put(served, f"{base}/prekeys", alice.upload(count).to_bytes())
            ids = [
                PrekeyBundle.from_bytes(
                    (await http.get(f"{base}/bundle")).content
                ).one_time_prekey_id
                for _ in range(count)
            ]
            assert None not in ids


# -- fuzz: malformed input never causes a 5xx ---------------------------------------------

_PUT_PATHS = ["keylog", "prekeys", "record"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from([*_PUT_PATHS, "revocations"]),
    body=st.one_of(
        st.binary(max_size=300),
        st.sampled_from(["keylog", "upload", "record", "revocations"]).flatmap(
            lambda what: st.tuples(st.just(what), st.integers(0, 10_000), st.integers(0, 255))
        ),
    ),
    agent_path=st.sampled_from(["alice", "bob", "junk"]),
)
async def test_fuzz_submissions_never_5xx(
    served: Served, alice: Agent, bob: Agent, kind: str, body: object, agent_path: str
) -> None:
    if not served.store.keylog(alice.agent_id):
        await publish(served, alice)
    valid = {
        "keylog": alice.identity.keylog.to_bytes(),
        "upload": alice.upload(1, sequence=7).to_bytes(),
        "record": alice.record(sequence=7).to_bytes(),
        "revocations": alice.revocations(1).to_bytes(),
    }
    if isinstance(body, tuple):  # flip one byte of a valid object
        what, position, value = body
        data = bytearray(valid[what])
        data[position % len(data)] ^= value or 1
        payload = bytes(data)
    else:
        assert isinstance(body, bytes)
        payload = body
    agent = {"alice": alice.agent_id, "bob": bob.agent_id, "junk": "did:talos:z0"}[agent_path]
    path = f"/v1/revocations/{agent}" if kind == "revocations" else f"/v1/agents/{agent}/{kind}"
    response = await put(served, path, payload)
    assert 200 <= response.status_code < 500, response.text
    if response.status_code >= 400:
        error(response)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    agent=st.text(max_size=80),
    route=st.sampled_from(["keylog", "prekeys", "bundle", "contact", "record", "instances"]),
)
async def test_fuzz_lookups_never_5xx(served: Served, agent: str, route: str) -> None:
    quoted = urllib.parse.quote(agent, safe="")
    for path in (f"/v1/agents/{quoted}/{route}", f"/v1/revocations/{quoted}"):
        response = await served.http.get(path)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            error(response)


async def test_health_answers_when_the_database_does(served: Served) -> None:
    assert (await served.http.get("/health")).json() == {"status": "ok"}
    served.store.close()
    answer = await served.http.get("/health")
    assert (answer.status_code, answer.json()["error"]) == (503, "StorageError")
