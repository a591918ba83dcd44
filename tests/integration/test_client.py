"""TalosClient end to end: real sockets, real LMDB, a real registry process."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sent_frames import record_sent

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.core import wire
from talos.core.delivery import SEND_WINDOW_BYTES, Window
from talos.core.message import encode_payload
from talos.errors import (
    CapabilityDenied,
    ConfigurationError,
    DeliveryTimeout,
    PeerNotFound,
    PeerRejected,
    QueueFull,
    StorageError,
)
from talos.storage.agent_state import AgentState, InboxMessage
from talos.storage.home import AgentHome
from talos.testing.cli import TalosCli
from talos.testing.processes import RegistryProcess, registry_process

pytestmark = pytest.mark.asyncio


def cli(home: Path, *args: str) -> str:
    return TalosCli().ok(home, *args).strip()


def audit_kinds(home: Path) -> list[str]:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        assert log.verify_chain().ok
        return [entry.kind for entry in log.query()]


@asynccontextmanager
async def introduced(tmp_path: Path) -> AsyncIterator[tuple[TalosClient, TalosClient]]:
    """Alice and Bob without a registry: contact cards exchanged, Alice's session open."""
    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], accept_policy="open") as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        yield a, b


async def test_two_agents_without_a_registry(tmp_path: Path) -> None:
    """Contact cards and an out-of-band bundle: sessions, both directions, one link."""
    async with introduced(tmp_path) as (a, b):
        sent = await a.send(b.agent_id, "hello bob", timeout=10)
        assert sent.status == "delivered"
        got = await b.receive(timeout=10)
        assert got is not None
        assert (got.sender, got.data, got.message_id) == (
            a.agent_id,
            "hello bob",
            sent.message_id,
        )
        assert (await b.send(a.agent_id, {"n": 1}, timeout=10)).status == "delivered"
        back = await a.receive(timeout=10)
        assert back is not None
        assert back.data == {"n": 1}
        for n in range(20):
            await a.send(b.agent_id, n.to_bytes(2, "big"), timeout=10)
        received = [await b.receive(timeout=10) for _ in range(20)]
        assert [m.data for m in received if m is not None] == [
            n.to_bytes(2, "big") for n in range(20)
        ]
        assert a.queue_depth() == b.queue_depth() == 0
        assert await b.receive(timeout=0.05) is None
    kinds = audit_kinds(tmp_path / "b")
    assert kinds.count("MESSAGE_RECEIVED") == 21
    assert "SESSION_ESTABLISHED" in kinds


async def test_capabilities_are_required_and_attached(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """Bob accepts only what he authorized; Alice's held token is attached for her."""
    alice_home, bob_home, carol_home = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    alice_id = cli(alice_home, "init", "--name", "alice")
    cli(bob_home, "init", "--name", "bob")
    cli(carol_home, "init", "--name", "carol")
    token = cli(
        bob_home,
        "capabilities",
        "grant",
        "--to",
        alice_id,
        "--action",
        "message.send",
        "--expires-in",
        "1h",
    )
    cli(bob_home, "whoami", "--export-log", str(tmp_path / "bob.log"))
    cli(alice_home, "capabilities", "add", token, "--issuer-log", str(tmp_path / "bob.log"))

    url = registry.url
    async with (
        TalosClient.create("bob", home=bob_home, registry_url=url) as bob,
        TalosClient.create("alice", home=alice_home, registry_url=url) as alice,
        TalosClient.create("carol", home=carol_home, registry_url=url) as carol,
    ):
        sent = await alice.send(bob.agent_id, "authorized", timeout=10)
        assert sent.status == "delivered"
        got = await bob.receive(timeout=10)
        assert got is not None
        assert got.data == "authorized"
        assert got.capability_id is not None

        with pytest.raises(PeerRejected, match="capability"):
            await carol.send(bob.agent_id, "unauthorized", timeout=10)
        assert carol.queue_depth() == 0
        assert await bob.receive(timeout=0.2) is None
    kinds = audit_kinds(bob_home)
    assert "CAPABILITY_DENIED" in kinds
    assert "PEER_REJECTED" in audit_kinds(carol_home)


async def test_offline_peer_gets_its_queue_when_it_returns(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    url = registry.url
    bob_home = tmp_path / "b"
    async with TalosClient.create(
        "bob", home=bob_home, registry_url=url, accept_policy="open"
    ) as b:
        bob_id = b.agent_id
    async with TalosClient.create(
        "alice", home=tmp_path / "a", registry_url=url, reconnect_interval=0.5
    ) as alice:
        results = [await alice.send(bob_id, f"m{n}", timeout=0.5) for n in range(3)]
        assert [r.status for r in results] == ["queued"] * 3
        assert alice.queue_depth() == 3
        async with TalosClient.create(
            "bob", home=bob_home, registry_url=url, accept_policy="open"
        ) as bob:
            received = [await bob.receive(timeout=15) for _ in range(3)]
            assert [m.data for m in received if m is not None] == ["m0", "m1", "m2"]
            for _ in range(100):
                if alice.queue_depth() == 0:
                    break
                await asyncio.sleep(0.05)
            assert alice.queue_depth() == 0


async def test_offline_mode_queues_and_bounds_the_queue(tmp_path: Path) -> None:
    async with TalosClient.create(
        "alice", home=tmp_path / "a", discovery=[], offline_mode=True, queue_limit=3
    ) as alice:
        peer = alice.agent_id  # any agent id; nothing is sent in offline mode
        for n in range(3):
            assert (await alice.send(peer, n)).status == "queued"
        with pytest.raises(QueueFull):
            await alice.send(peer, 4)
        assert alice.queue_depth() == 3
    kinds = audit_kinds(tmp_path / "a")
    assert kinds.count("MESSAGE_SENT") == 3


async def test_replayed_and_forged_frames_change_nothing(tmp_path: Path) -> None:
    async with introduced(tmp_path) as (a, b):
        captured = record_sent(a)
        await a.send(b.agent_id, "once", timeout=10)
        assert (await b.receive(timeout=10)) is not None
        link = a._parts.deliverer.links[b.agent_id]
        frame = captured[0]
        await a._parts.deliverer.links[b.agent_id].send(frame)  # the same frame again: a replay
        tampered = bytearray(frame)
        tampered[-70] ^= 1  # inside the ciphertext: the signature no longer verifies
        await a._parts.deliverer.links[b.agent_id].send(bytes(tampered))
        await a._parts.deliverer.links[b.agent_id].send(b"\xa0garbage")
        await a.send(b.agent_id, "still fine", timeout=10)
        later = await b.receive(timeout=10)
        assert later is not None
        assert later.data == "still fine"
        assert await b.receive(timeout=0.2) is None
        assert link.is_open  # bad frames did not cost Alice her connection
        assert a.agent_id not in b._parts.deliverer.links  # an incoming link is never used to send
        assert wire.decode(frame).type is wire.EnvelopeType.INITIAL
    kinds = audit_kinds(tmp_path / "b")
    assert kinds.count("MESSAGE_RECEIVED") == 2
    assert kinds.count("REPLAY_DROPPED") == 1
    assert kinds.count("SIGNATURE_FAILURE") == 1


async def test_session_corruption_heals_by_reestablishing(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """The receiver lost its session: it answers DECRYPT_FAILED; the sender re-establishes."""
    url = registry.url
    async with (
        TalosClient.create(
            "alice", home=tmp_path / "a", registry_url=url, accept_policy="open"
        ) as a,
        TalosClient.create("bob", home=tmp_path / "b", registry_url=url, accept_policy="open") as b,
    ):
        assert (await a.send(b.agent_id, "before", timeout=10)).status == "delivered"
        assert (await b.receive(timeout=10)) is not None
        await b.reset_session(a.agent_id)  # Bob's ratchet state is gone
        sent = await a.send(b.agent_id, "after", timeout=20)
        assert sent.status == "delivered"
        got = await b.receive(timeout=10)
        assert got is not None
        assert got.data == "after"
    assert "SESSION_RESET" in audit_kinds(tmp_path / "a")
    assert "DECRYPTION_FAILURE" in audit_kinds(tmp_path / "b")


async def test_at_least_once_receive_survives_a_restart(tmp_path: Path) -> None:
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "keep me", timeout=10)).status == "delivered"
        first = await b.receive(timeout=10, auto_ack=False)
        assert first is not None
    async with TalosClient.create("bob", home=tmp_path / "b", discovery=[]) as b:
        again = await b.receive(timeout=1, auto_ack=False)
        assert again is not None
        assert again.message_id == first.message_id
        await b.acknowledge(again)
        assert await b.receive(timeout=0.1, auto_ack=False) is None


async def test_registry_down_peer_moved_is_found_through_the_dht(tmp_path: Path) -> None:
    """Existing sessions survive a registry outage; a peer's new endpoint comes from the DHT."""
    with registry_process(tmp_path / "registry") as server:
        async with TalosClient.create(
            "alice",
            home=tmp_path / "a",
            registry_url=server.url,
            discovery=["registry", "dht"],
            accept_policy="open",
            reconnect_interval=0.5,
        ) as alice:
            assert alice.dht_address is not None
            bob_options = {
                "home": tmp_path / "b",
                "registry_url": server.url,
                "discovery": ["registry", "dht"],
                "dht_bootstrap": [alice.dht_address],
                "accept_policy": "open",
            }
            async with TalosClient.create("bob", **bob_options) as bob:  # type: ignore[arg-type]
                bob_id, first_endpoint = bob.agent_id, bob.endpoint
                assert (await alice.send(bob_id, "via registry", timeout=10)).status == "delivered"
                assert (await bob.receive(timeout=10)) is not None
            server.stop()  # the registry is gone for good
            async with TalosClient.create("bob", **bob_options) as bob:  # type: ignore[arg-type]
                assert bob.endpoint != first_endpoint
                assert bob.status()["registry_reachable"] is False
                sent = await alice.send(bob_id, "via the DHT", timeout=20)
                assert sent.status == "delivered"
                got = await bob.receive(timeout=10)
                assert got is not None
                assert got.data == "via the DHT"
            assert alice.status()["registry_reachable"] is False


async def test_first_contact_with_the_registry_down_comes_from_the_dht(tmp_path: Path) -> None:
    """A first session while the registry is down: the peer's key log, bundle and
    record come from its DHT value (one lookup), and the message is delivered."""
    with registry_process(tmp_path / "registry") as server:
        async with TalosClient.create(
            "bob",
            home=tmp_path / "b",
            registry_url=server.url,
            discovery=["registry", "dht"],
            accept_policy="open",
        ) as bob:
            assert bob.dht_address is not None
            server.stop()
            async with TalosClient.create(
                "carol",
                home=tmp_path / "c",
                registry_url=server.url,
                discovery=["registry", "dht"],
                dht_bootstrap=[bob.dht_address],
            ) as carol:
                await carol.establish_session(bob.agent_id)
                sent = await carol.send(bob.agent_id, "no registry", timeout=20)
                assert sent.status == "delivered"
                got = await bob.receive(timeout=10)
                assert got is not None
                assert got.data == "no registry"
                assert carol.status()["registry_reachable"] is False


async def test_a_self_issued_capability_is_refused(tmp_path: Path) -> None:
    """Nobody can authorize themselves to write to someone else's inbox."""
    from talos.core.capability import issue
    from talos.system import SYSTEM_CLOCK, SYSTEM_RNG

    async with (
        TalosClient.create("mallory", home=tmp_path / "m", discovery=[]) as mallory,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[]) as bob,
    ):
        mallory.add_contact(bob.contact_card())
        bob.add_contact(mallory.contact_card())
        await mallory.establish_session(bob.agent_id, bob.get_prekey_bundle())
        me = AgentHome(tmp_path / "m").load_identity(passphrase=None)
        forged = issue(
            me.signing_key,
            issuer=me.agent_id,
            key_sequence=0,
            subject=me.agent_id,
            audience=bob.agent_id,
            actions=["message.send"],
            resources=["*"],
            expires=SYSTEM_CLOCK.time() + 600,
            now=SYSTEM_CLOCK.time(),
            rng=SYSTEM_RNG,
        )
        with pytest.raises(CapabilityDenied, match="starts at"):
            await mallory.send(bob.agent_id, "let me in", capability=forged, timeout=5)
        assert mallory.queue_depth() == 0
        # Sent anyway (as a modified client would), Bob refuses it too.
        mallory._parts.capabilities.check = lambda *a, **k: None  # type: ignore[method-assign]
        with pytest.raises(PeerRejected, match="starts at"):
            await mallory.send(bob.agent_id, "let me in", capability=forged, timeout=10)
        assert await bob.receive(timeout=0.2) is None


async def test_strict_mode_keeps_accepting_after_max_age(tmp_path: Path) -> None:
    """An agent's own revocation list never goes stale for itself."""
    from talos.testing import FakeClock

    clock = FakeClock(start=time.time())
    alice_home, bob_home = tmp_path / "a", tmp_path / "b"
    alice_id = cli(alice_home, "init", "--name", "alice")
    cli(bob_home, "init", "--name", "bob")
    token = cli(
        bob_home,
        "capabilities",
        "grant",
        "--to",
        alice_id,
        "--action",
        "message.send",
        "--expires-in",
        "2h",
    )
    cli(bob_home, "whoami", "--export-log", str(tmp_path / "bob.log"))
    cli(alice_home, "capabilities", "add", token, "--issuer-log", str(tmp_path / "bob.log"))
    async with (
        TalosClient.create("alice", home=alice_home, discovery=[], clock=clock) as alice,
        TalosClient.create("bob", home=bob_home, discovery=[], clock=clock) as bob,
    ):
        alice.add_contact(bob.contact_card())
        bob.add_contact(alice.contact_card())
        await alice.establish_session(bob.agent_id, bob.get_prekey_bundle())
        assert (await alice.send(bob.agent_id, "t0", timeout=10)).status == "delivered"
        clock.advance(301)
        assert (await alice.send(bob.agent_id, "t301", timeout=10)).status == "delivered"
        received = [await bob.receive(timeout=5) for _ in range(2)]
        assert [m.data for m in received if m is not None] == ["t0", "t301"]


async def test_retry_count_bounds_a_send_to_an_unreachable_peer(tmp_path: Path) -> None:
    """With the peer gone, on_failure="raise" gives up after retry_count failed attempts."""
    async with TalosClient.create(
        "bob", home=tmp_path / "b", discovery=[], accept_policy="open"
    ) as bob:
        card = bob.contact_card()
        bundle = bob.get_prekey_bundle()
    async with TalosClient.create(
        "alice", home=tmp_path / "a", discovery=[], reconnect_interval=0.2
    ) as alice:
        peer = alice.add_contact(card)
        await alice.establish_session(peer, bundle)
        started = asyncio.get_running_loop().time()
        with pytest.raises(DeliveryTimeout) as raised:
            await alice.send(peer, "nobody home", timeout=30, retry_count=2, on_failure="raise")
        elapsed = asyncio.get_running_loop().time() - started
        assert elapsed < 20  # well before the timeout
        # The message tells the truth: attempts, not the 30 s timeout, ended it, and why.
        message = str(raised.value)
        assert "3 attempts failed (retry_count=2)" in message
        assert "last failure: PeerUnreachable: cannot connect" in message
        assert "within 30" not in message
        assert raised.value.attempts == 3
        assert raised.value.waited is not None
        assert raised.value.waited <= elapsed
        assert alice.queue_depth() == 0
        queued = await alice.send(peer, "keep it", timeout=30, retry_count=1)
        assert queued.status == "queued"
        assert alice.queue_depth() == 1


async def test_revocation_by_a_delegator_reaches_the_audience_on_connection(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """Bob → Carol → Alice; Carol revokes Alice's token; Bob enforces it once Carol connects."""
    from talos.core.capability import Capability, delegate
    from talos.system import SYSTEM_CLOCK, SYSTEM_RNG

    homes = {name: tmp_path / name for name in ("alice", "bob", "carol")}
    ids = {name: cli(home, "init", "--name", name) for name, home in homes.items()}
    logs = {}
    for name, home in homes.items():
        logs[name] = tmp_path / f"{name}.log"
        cli(home, "whoami", "--export-log", str(logs[name]))
    root = cli(
        homes["bob"],
        "capabilities",
        "grant",
        "--to",
        ids["carol"],
        "--action",
        "message.send",
        "--expires-in",
        "1h",
        "--delegable",
    )
    cli(homes["carol"], "capabilities", "add", root, "--issuer-log", str(logs["bob"]))
    carol = AgentHome(homes["carol"]).load_identity(passphrase=None)
    child = delegate(
        Capability.from_text(root),
        carol.signing_key,
        key_sequence=0,
        subject=ids["alice"],
        now=SYSTEM_CLOCK.time(),
        rng=SYSTEM_RNG,
    )
    cli(
        homes["alice"],
        "capabilities",
        "add",
        child.to_text(),
        "--issuer-log",
        str(logs["bob"]),
        "--issuer-log",
        str(logs["carol"]),
    )

    url = registry.url
    async with (
        TalosClient.create("bob", home=homes["bob"], registry_url=url) as bob,
        TalosClient.create("alice", home=homes["alice"], registry_url=url) as alice,
        TalosClient.create("carol", home=homes["carol"], registry_url=url) as carol_agent,
    ):
        assert (await alice.send(bob.agent_id, "delegated", timeout=10)).status == "delivered"
        cli(homes["carol"], "capabilities", "revoke", child.token_id.hex(), "--reason", "left")
        # Carol talks to Bob: her revocation list travels with the new connection.
        assert (await carol_agent.send(bob.agent_id, "hi", timeout=10)).status == "delivered"
        with pytest.raises(PeerRejected, match="revoked"):
            await alice.send(bob.agent_id, "after revocation", timeout=10)
        received = [await bob.receive(timeout=5) for _ in range(2)]
        assert [m.data for m in received if m is not None] == ["delegated", "hi"]


async def test_metrics_follow_what_happens(tmp_path: Path) -> None:
    import httpx

    async with (
        TalosClient.create(
            "alice", home=tmp_path / "a", discovery=[], accept_policy="open", metrics_port=0
        ) as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        for n in range(3):
            await a.send(b.agent_id, n, timeout=10)
        host, port = a.metrics.address or ("", 0)
        async with httpx.AsyncClient() as http:
            page = (await http.get(f"http://{host}:{port}/metrics")).text
        assert "talos_messages_sent_total 3.0" in page
        assert "talos_messages_delivered_total 3.0" in page
        assert "talos_messages_queued 0.0" in page
        assert b"talos_messages_received_total 3.0" in b.metrics.render()
        for name in (
            "talos_signature_failures_total",
            "talos_revocation_list_age_seconds",
            "talos_session_failures_total",
            "talos_audit_anchor_failures_total",
        ):
            assert name in page


async def test_both_sides_opening_a_session_at_once_converge(tmp_path: Path) -> None:
    async with introduced(tmp_path) as (a, b):
        await b.establish_session(a.agent_id, a.get_prekey_bundle())
        for round_ in range(3):
            sent = await asyncio.gather(
                a.send(b.agent_id, f"a{round_}", timeout=15),
                b.send(a.agent_id, f"b{round_}", timeout=15),
            )
            assert [r.status for r in sent] == ["delivered", "delivered"]
        to_b = [await b.receive(timeout=5) for _ in range(3)]
        to_a = [await a.receive(timeout=5) for _ in range(3)]
        assert [m.data for m in to_b if m is not None] == ["a0", "a1", "a2"]
        assert [m.data for m in to_a if m is not None] == ["b0", "b1", "b2"]


async def test_a_corrupted_session_row_heals(tmp_path: Path, registry: RegistryProcess) -> None:
    """Seed, Session State Corruption: the damaged side discards it; both re-establish."""
    import lmdb

    url = registry.url
    options = {"registry_url": url, "accept_policy": "open"}
    async with (
        TalosClient.create("alice", home=tmp_path / "a", **options) as a,  # type: ignore[arg-type]
        TalosClient.create("bob", home=tmp_path / "b", **options) as b,  # type: ignore[arg-type]
    ):
        alice_id, bob_id = a.agent_id, b.agent_id
        assert (await a.send(bob_id, "before", timeout=10)).status == "delivered"
        assert (await b.receive(timeout=10)) is not None
    env = lmdb.open(str(tmp_path / "b" / "audit"), max_dbs=32)
    sessions = env.open_db(b"x:sessions")
    with env.begin(write=True, db=sessions) as txn:
        for key, value in list(txn.cursor()):
            damaged = bytearray(value)
            damaged[len(damaged) // 2] ^= 0xFF
            txn.put(key, bytes(damaged))
    env.close()
    async with (
        TalosClient.create("alice", home=tmp_path / "a", **options) as a,  # type: ignore[arg-type]
        TalosClient.create("bob", home=tmp_path / "b", **options) as b,  # type: ignore[arg-type]
    ):
        assert (await a.send(bob_id, "after", timeout=20)).status == "delivered"
        got = await b.receive(timeout=10)
        assert got is not None
        assert got.data == "after"
        assert (await b.send(alice_id, "and back", timeout=20)).status == "delivered"
    kinds = audit_kinds(tmp_path / "b")
    assert "SESSION_RESET" in kinds


async def test_a_flood_of_forged_frames_cannot_fill_the_audit_log(tmp_path: Path) -> None:
    async with introduced(tmp_path) as (a, b):
        await a.send(b.agent_id, "hello", timeout=10)
        link = a._parts.deliverer.links[b.agent_id]
        envelope = wire.Envelope(
            type=wire.EnvelopeType.MESSAGE,
            message_id=b"\x01" * 16,
            sender=a.agent_id,
            sender_instance=b"\x02" * 16,
            recipient=b.agent_id,
            timestamp_ms=int(time.time() * 1000),
            ratchet_header=b"h" * 40,
            ciphertext=b"c" * 40,
        )
        frame = bytearray(
            wire.seal(
                envelope, AgentHome(tmp_path / "a").load_identity(passphrase=None).signing_key
            )
        )
        frame[-1] ^= 1  # the signature no longer verifies
        for _ in range(200):
            await link.send(bytes(frame))
        await a.send(b.agent_id, "still here", timeout=10)  # ordered after the flood
        assert b'talos_signature_failures_total{reason="bad_signature"} 200.0' in b.metrics.render()
    kinds = audit_kinds(tmp_path / "b")
    assert 1 <= kinds.count("SIGNATURE_FAILURE") <= 25


def sample(client: TalosClient, name: str, **labels: str) -> float:
    """The value of one series (with exactly these labels) in the client's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.metrics.render().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no series {name}")


class _ShiftedClock:
    """The system clock, ``shift`` seconds ahead (a host whose clock is off)."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def time(self) -> float:
        return time.time() + self.shift

    def monotonic(self) -> float:
        return time.monotonic()


async def test_peer_clock_offset_is_measured_from_signed_acks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob's clock runs 20 s ahead: within tolerance, delivered, but measured and warned."""
    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], accept_policy="open") as a,
        TalosClient.create(
            "bob",
            home=tmp_path / "b",
            discovery=[],
            accept_policy="open",
            clock=_ShiftedClock(20.0),
        ) as b,
    ):
        a.add_contact(b.contact_card())
        b.add_contact(a.contact_card())
        await a.establish_session(b.agent_id, b.get_prekey_bundle())
        assert a.status()["peer_clock"] == {}
        with caplog.at_level("WARNING", logger="talos.client"):
            for n in range(3):
                assert (await a.send(b.agent_id, n, timeout=10)).status == "delivered"
        measured = a.status()["peer_clock"][b.agent_id]
        assert measured["offset_s"] == pytest.approx(20.0, abs=0.5)
        assert 0 <= measured["delay_s"] < 1.0
        assert sample(a, "talos_clock_offset_seconds") == pytest.approx(-20.0, abs=0.5)
        skew = [r for r in caplog.records if getattr(r, "event", None) == "clock_skew"]
        assert len(skew) == 1  # once per minute per peer, not once per ACK
        assert skew[0].peer_id == b.agent_id  # type: ignore[attr-defined]


async def test_one_identity_in_two_processes_is_detected(tmp_path: Path) -> None:
    """Two copies of Bob's home run at once; Alice sees his instance ids alternate."""
    import shutil

    async with TalosClient.create(
        "alice", home=tmp_path / "a", discovery=[], accept_policy="open"
    ) as a:
        async with TalosClient.create("bob", home=tmp_path / "b", discovery=[]) as b:
            card = b.contact_card()
        shutil.copytree(tmp_path / "b", tmp_path / "b2")
        async with (
            TalosClient.create("bob", home=tmp_path / "b", discovery=[]) as b1,
            TalosClient.create("bob", home=tmp_path / "b2", discovery=[]) as b2,
        ):
            assert b1.agent_id == b2.agent_id
            for bob in (b1, b2):
                bob.add_contact(a.contact_card())
            a.add_contact(card)
            # establish_session opens the link at once (the first frames carry the
            # instance id): the second instance is set up only after the first sent.
            await b1.establish_session(a.agent_id, a.get_prekey_bundle())
            await b1.send(a.agent_id, "from one", timeout=10)
            assert a.status()["duplicate_instances"] == {}
            await b2.establish_session(a.agent_id, a.get_prekey_bundle())
            await b2.send(a.agent_id, "from two", timeout=10, on_failure="queue")
            assert a.status()["duplicate_instances"] == {}  # could be a restart
            await b1.send(a.agent_id, "from one again", timeout=3, on_failure="queue")
            assert a.status()["duplicate_instances"] == {b1.agent_id: 1}
            assert sample(a, "talos_duplicate_instances_detected_total") == 1.0


async def test_offset_from_the_registry_clock_is_exported(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    async with TalosClient.create(
        "alice", home=tmp_path / "a", registry_url=registry.url, clock=_ShiftedClock(-30.0)
    ) as a:
        assert a.status()["clock_offset_s"] == pytest.approx(-30.0, abs=0.5)
        assert sample(a, "talos_clock_offset_seconds") == pytest.approx(-30.0, abs=0.5)


async def test_at_least_once_messages_are_acknowledged_together(tmp_path: Path) -> None:
    """receive(auto_ack=False) walks the inbox; one acknowledge() removes a batch."""
    async with introduced(tmp_path) as (a, b):
        for n in range(5):
            assert (await a.send(b.agent_id, n, timeout=10)).status == "delivered"
        got = [await b.receive(timeout=5, auto_ack=False) for _ in range(5)]
        assert [m.data for m in got if m is not None] == [0, 1, 2, 3, 4]
        assert await b.receive(timeout=0.05, auto_ack=False) is None
        await b.acknowledge(*[m for m in got[:3] if m is not None])
    async with TalosClient.create("bob", home=tmp_path / "b", discovery=[]) as b:
        rest = [await b.receive(timeout=1, auto_ack=False) for _ in range(2)]
        assert [m.data for m in rest if m is not None] == [3, 4]


async def test_an_at_least_once_reader_that_keeps_up_is_handed_messages_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once receive(auto_ack=False) has read the inbox to its end, the receive commits
    hand their rows over in memory (no read-back); the rows stay until acknowledged,
    so a restart still returns every unacknowledged message, in order."""
    async with introduced(tmp_path) as (a, b):
        await a.send(b.agent_id, "before", timeout=10)
        first = await b.receive(timeout=5, auto_ack=False)  # read from the inbox
        assert first is not None
        assert await b.receive(timeout=0.05, auto_ack=False) is None  # at its end now
        reads: list[int] = []
        inbox = b._state.inbox  # noqa: SLF001 -- counting read-backs

        def counted(*args: Any, **kwargs: Any) -> Any:
            reads.append(1)
            return inbox(*args, **kwargs)

        monkeypatch.setattr(b._state, "inbox", counted)  # noqa: SLF001
        results = await asyncio.gather(*(a.send(b.agent_id, n, timeout=10) for n in range(20)))
        assert {r.status for r in results} == {"delivered"}
        got = [await b.receive(timeout=5, auto_ack=False) for _ in range(20)]
        assert [m.data for m in got if m is not None] == list(range(20))
        assert reads == []  # every one came from memory
        seqs = [m.inbox_seq or 0 for m in got if m is not None]
        assert seqs == sorted(seqs)
        assert seqs[0] > (first.inbox_seq or 0)
        await b.acknowledge(first, *[m for m in got[:15] if m is not None])
    async with TalosClient.create("bob", home=tmp_path / "b", discovery=[]) as b:
        rest = [await b.receive(timeout=1, auto_ack=False) for _ in range(5)]
        assert [m.data for m in rest if m is not None] == [15, 16, 17, 18, 19]
        assert await b.receive(timeout=0.05, auto_ack=False) is None


async def test_an_at_least_once_reader_far_behind_reads_the_inbox_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past READ_AHEAD_LIMIT unread, memory is let go and the inbox is read: nothing is
    skipped or repeated; taking with auto_ack=True also makes it read the inbox."""
    import talos.client.inbox

    monkeypatch.setattr(talos.client.inbox, "READ_AHEAD_LIMIT", 3)
    async with introduced(tmp_path) as (a, b):
        assert await b.receive(timeout=0.05, auto_ack=False) is None  # at its end
        for n in range(5):
            await a.send(b.agent_id, n, timeout=10)
        got = [await b.receive(timeout=5, auto_ack=False) for _ in range(5)]
        assert [m.data for m in got if m is not None] == [0, 1, 2, 3, 4]
        assert await b.receive(timeout=0.05, auto_ack=False) is None
        for n in (5, 6):
            await a.send(b.agent_id, n, timeout=10)
        taken = await b.receive(timeout=5)  # auto_ack: removes the oldest row (0)
        assert taken is not None
        assert taken.data == 0
        after = [await b.receive(timeout=5, auto_ack=False) for _ in range(2)]
        assert [m.data for m in after if m is not None] == [5, 6]


async def test_large_messages_are_not_held_in_memory_for_a_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past READ_AHEAD_BYTES of unread payload the memory copy is let go; the reader
    gets every message from the inbox, in order."""
    import talos.client.inbox

    monkeypatch.setattr(talos.client.inbox, "READ_AHEAD_BYTES", 1000)
    async with introduced(tmp_path) as (a, b):
        assert await b.receive(timeout=0.05, auto_ack=False) is None  # at its end
        blobs = [bytes([n]) * 600 for n in range(3)]
        for blob in blobs:
            await a.send(b.agent_id, blob, timeout=10)
        assert b._parts.inbox.read_ahead is None  # noqa: SLF001 -- 1,800 bytes > 1,000: let go
        got = [await b.receive(timeout=5, auto_ack=False) for _ in blobs]
        assert [m.data for m in got if m is not None] == blobs


async def test_concurrent_sends_share_commits_and_arrive_in_order(tmp_path: Path) -> None:
    """200 send() calls at once: grouped into few outbox commits and send windows,
    received (group-committed) in the order the calls were made, nothing twice."""
    async with introduced(tmp_path) as (a, b):
        size = a._log.size if a._log is not None else 0  # noqa: SLF001 -- counting entries
        results = await asyncio.gather(*(a.send(b.agent_id, n, timeout=30) for n in range(200)))
        assert {r.status for r in results} == {"delivered"}
        got = [await b.receive(timeout=10) for _ in range(200)]
        assert [m.data for m in got if m is not None] == list(range(200))
        assert await b.receive(timeout=0.05) is None
        assert a.queue_depth() == 0
        assert a._log is not None  # noqa: SLF001
        # Every message is audited as sent and delivered, whatever the batching.
        assert a._log.size - size >= 400  # noqa: SLF001


async def test_large_messages_are_windowed_by_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve 800 kB messages at once: never more than SEND_WINDOW_BYTES of payload in
    flight (so the last one's ACK deadline is not spent waiting behind the others),
    all delivered, in order."""
    async with introduced(tmp_path) as (a, b):
        seen: list[int] = []
        window = a._parts.deliverer.core.window(b.agent_id)  # noqa: SLF001 -- observed exactly
        transmitted = Window.transmitted

        def observed(self: Window, *args: Any, **kwargs: Any) -> None:
            transmitted(self, *args, **kwargs)
            if self is window:
                seen.append(window.bytes_in_flight())  # after every transmission

        monkeypatch.setattr(Window, "transmitted", observed)
        blobs = [bytes([n]) * 800_000 for n in range(12)]
        results = await asyncio.gather(*(a.send(b.agent_id, blob, timeout=60) for blob in blobs))
        assert {r.status for r in results} == {"delivered"}
        assert max(seen) <= SEND_WINDOW_BYTES < sum(map(len, blobs))
        assert max(seen) > 800_000  # several were in flight together, not one at a time
        got = [await b.receive(timeout=10) for _ in blobs]
        assert [m.data for m in got if m is not None] == blobs


async def test_a_peers_link_is_marked_verified_by_its_first_accepted_message(
    tmp_path: Path,
) -> None:
    """The receive path marks the incoming link once a message passed every check:
    that link keeps its place against floods (tests/integration/test_transport.py)."""
    async with introduced(tmp_path) as (a, b):
        await a.send(b.agent_id, "hello", timeout=10)
        assert b._transport is not None  # noqa: SLF001 -- the links
        incoming = [link for link in b._transport._links if not link.outgoing]  # noqa: SLF001
        assert incoming
        assert [link.verified_by for link in incoming] == [a.agent_id] * len(incoming)


async def test_a_new_peer_is_reached_through_the_dht_alone(tmp_path: Path) -> None:
    """Registry down, never talked before: key log, endpoint and prekey bundle all come
    from the DHT, and the first message is delivered."""
    with registry_process(tmp_path / "registry") as server:
        options = {"discovery": ["registry", "dht"], "accept_policy": "open"}
        async with TalosClient.create(
            "alice",
            home=tmp_path / "a",
            registry_url=server.url,
            **options,  # type: ignore[arg-type]
        ) as alice:
            async with TalosClient.create(
                "bob",
                home=tmp_path / "b",
                registry_url=server.url,
                dht_bootstrap=[alice.dht_address],
                **options,  # type: ignore[arg-type]
            ) as bob:
                server.stop()
                sent = await alice.send(bob.agent_id, "first contact", timeout=20)
                assert sent.status == "delivered"
                got = await bob.receive(timeout=10)
                assert got is not None
                assert got.data == "first contact"
                assert alice.status()["registry_reachable"] is False
    kinds = audit_kinds(tmp_path / "b")
    assert "SESSION_ESTABLISHED" in kinds


async def test_registry_gauge_recovers_on_the_next_answer(tmp_path: Path) -> None:
    """Down after a failed lookup, up again as soon as the registry answers one."""
    from talos.testing.processes import start_registry

    with registry_process(tmp_path / "registry") as server:
        async with TalosClient.create("alice", home=tmp_path / "a", registry_url=server.url) as a:
            assert sample(a, "talos_registry_up", url=server.url) == 1.0
            server.stop()
            from talos.core.agent_id import agent_id_from_digest

            unknown = agent_id_from_digest(b"\x05" * 32)
            with pytest.raises(PeerNotFound):
                await a._peers.keylog(unknown, refresh=True)  # noqa: SLF001
            assert sample(a, "talos_registry_up", url=server.url) == 0.0
            again = start_registry(server.db, tmp_path / "registry2.log", port=server.port)
            try:
                with pytest.raises(PeerNotFound):  # the registry answers: not known
                    await a._peers.keylog(unknown, refresh=True)  # noqa: SLF001
                assert sample(a, "talos_registry_up", url=server.url) == 1.0
                assert a.status()["registry_reachable"] is True
            finally:
                again.stop()


async def test_a_message_no_longer_queued_is_not_sent_again(tmp_path: Path) -> None:
    """A delivery window read before a message was given up does not transmit it."""
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "warm up", timeout=10)).status == "delivered"
        assert await b.receive(timeout=5) is not None
        item = a._state.enqueue(  # noqa: SLF001 -- queued behind the delivery task's back
            b.agent_id, wire.new_message_id(a._rng), b"\xa0", capability=None, queue_limit=10
        )
        a._state.remove(item.message_id)  # noqa: SLF001 -- as send(on_failure="raise") does
        assert (
            await asyncio.wait_for(a._parts.deliverer._transmit(b.agent_id, [item], Window()), 2)
            == 0
        )  # noqa: SLF001
        assert await b.receive(timeout=0.3) is None


async def test_one_ack_acknowledges_a_whole_committed_batch(tmp_path: Path) -> None:
    """The receiver signs one ACK per committed batch: every id acknowledged exactly
    once, with fewer ACK envelopes than messages."""
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "warm up", timeout=10)).status == "delivered"
        acks: list[tuple[bytes, ...]] = []
        answer = b._parts.batch._signer.answer  # noqa: SLF001 -- observed, then called through

        async def observed(link: object, sender: str, ids: list[bytes], status: object) -> None:
            acks.append(tuple(ids))
            await answer(link, sender, ids, status)  # type: ignore[arg-type]

        b._parts.batch._signer.answer = observed  # type: ignore[method-assign]  # noqa: SLF001
        results = await asyncio.gather(*(a.send(b.agent_id, n, timeout=30) for n in range(100)))
        assert {r.status for r in results} == {"delivered"}
        named = [message_id for ids in acks for message_id in ids]
        assert sorted(named) == sorted(bytes.fromhex(r.message_id) for r in results)
        assert len(acks) < len(named)
        assert max(len(ids) for ids in acks) > 1


async def test_an_idle_send_is_queued_attempted_and_ratcheted_in_one_commit(
    tmp_path: Path,
) -> None:
    """With the session acknowledged and nothing else queued, send() encrypts at once:
    the delivery loop records no separate attempt, and the queued row already counts it."""
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "warm up", timeout=10)).status == "delivered"
        attempts: list[int] = []
        record = a._state.record_attempts  # noqa: SLF001 -- observed, then called through

        def observed(*args: object, **kwargs: object) -> list[bytes]:
            attempts.append(1)
            return record(*args, **kwargs)  # type: ignore[arg-type]

        a._state.record_attempts = observed  # type: ignore[method-assign]  # noqa: SLF001
        enqueue = a._state.enqueue_many  # noqa: SLF001
        rows = []

        def enqueued(*args: object, **kwargs: object) -> list[object]:
            result = enqueue(*args, **kwargs)  # type: ignore[arg-type]
            rows.extend(result)
            return result  # type: ignore[return-value]

        a._state.enqueue_many = enqueued  # type: ignore[method-assign]  # noqa: SLF001
        assert await b.receive(timeout=5) is not None  # the warm-up message
        for n in range(5):
            assert (await a.send(b.agent_id, n, timeout=10)).status == "delivered"
        assert attempts == []
        assert [row.attempts for row in rows] == [1] * 5  # type: ignore[attr-defined]
        got = [await b.receive(timeout=5) for _ in range(5)]
        assert [m.data for m in got if m is not None] == [0, 1, 2, 3, 4]


async def test_the_fast_path_keeps_the_order_behind_queued_messages(tmp_path: Path) -> None:
    """Messages queued while the peer was away go first; later sends wait their turn."""
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "warm up", timeout=10)).status == "delivered"
        assert await b.receive(timeout=5) is not None
        bob = b.agent_id
    async with TalosClient.create(
        "alice", home=tmp_path / "a", discovery=[], accept_policy="open", offline_mode=True
    ) as a:
        for n in range(3):
            assert (await a.send(bob, n)).status == "queued"
    async with (
        TalosClient.create("alice", home=tmp_path / "a", discovery=[], accept_policy="open") as a,
        TalosClient.create("bob", home=tmp_path / "b", discovery=[], accept_policy="open") as b,
    ):
        a.add_contact(b.contact_card())
        results = await asyncio.gather(*(a.send(bob, n, timeout=30) for n in range(3, 40)))
        assert {r.status for r in results} == {"delivered"}
        got = [await b.receive(timeout=10) for _ in range(40)]
        assert [m.data for m in got if m is not None] == list(range(40))


async def test_a_waiting_receive_is_handed_its_message_by_the_receive_commit(
    tmp_path: Path,
) -> None:
    """receive() already waiting: the message is taken in the commit that received it
    (no inbox row, no take commit), and returned once."""
    async with introduced(tmp_path) as (a, b):
        takes: list[int] = []
        take = b._state.take  # noqa: SLF001 -- observed, then called through

        def observed(*args: object, **kwargs: object) -> list[object]:
            result = take(*args, **kwargs)  # type: ignore[arg-type]
            takes.append(len(result))
            return result  # type: ignore[return-value]

        # The first message (X3DH) is committed on its own, into the inbox.
        assert (await a.send(b.agent_id, "warm up", timeout=10)).status == "delivered"
        assert await b.receive(timeout=5) is not None
        b._state.take = observed  # type: ignore[method-assign]  # noqa: SLF001
        for n in range(3):
            waiting = asyncio.create_task(b.receive(timeout=10))
            await asyncio.sleep(0.05)  # receive() is waiting before the message arrives
            assert (await a.send(b.agent_id, n, timeout=10)).status == "delivered"
            got = await waiting
            assert got is not None
            assert got.data == n
        assert sum(takes) == 0  # nothing went through the inbox
        assert b._state.inbox_count() == 0  # noqa: SLF001
        assert await b.receive(timeout=0.05) is None


async def test_a_message_handed_to_a_cancelled_receive_goes_back_to_the_inbox(
    tmp_path: Path,
) -> None:
    """Cancelled right after the commit handed it a message: the message goes back
    into the durable inbox (it survives a restart); no waiter is left behind."""
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "first", timeout=10)).status == "delivered"
        first = await b.receive(timeout=5)
        assert first is not None
        for _ in range(20):  # receive() calls that time out leave no waiter behind
            assert await b.receive(timeout=0.001) is None
        assert len(b._parts.inbox.takers) == 0  # noqa: SLF001
        waiting = asyncio.create_task(b.receive(timeout=10))
        await asyncio.sleep(0.05)
        assert len(b._parts.inbox.takers) == 1  # noqa: SLF001
        handed = InboxMessage(a.agent_id, b"\x01" * 16, encode_payload("handed"), 0, 0, None)
        b._parts.inbox.takers[0].set_result(handed)  # noqa: SLF001 -- as _settle does after its commit
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(b._parts.inbox.takers) == 0  # noqa: SLF001
    async with TalosClient.create("bob", home=tmp_path / "b", discovery=[]) as b:
        again = await b.receive(timeout=0)
        assert again is not None
        assert again.message_id_bytes == handed.message_id
        assert again.data == "handed"


@pytest.mark.parametrize(
    ("listen", "announce"),
    [
        ("0.0.0.0:0", None),
        ("[::]:0", None),
        ("127.0.0.1:0", "0.0.0.0"),  # noqa: S104 -- refused, never bound
        ("127.0.0.1:0", "host:0"),
        ("127.0.0.1:0", "host:port"),
        ("127.0.0.1:0", "two words"),
        ("127.0.0.1:0", "host/path"),
        ("127.0.0.1:0", ""),
    ],
)
async def test_an_unreachable_announced_address_is_refused(
    tmp_path: Path, listen: str, announce: str | None
) -> None:
    with pytest.raises(ConfigurationError, match="announce"):
        await TalosClient.create(
            "alice", home=tmp_path / "a", discovery=[], listen=listen, announce=announce
        )


@pytest.mark.parametrize(
    ("announce", "expected"),
    [
        ("localhost", r"ws://localhost:\d+"),
        ("localhost:4242", "ws://localhost:4242"),
        ("[::1]", r"ws://\[::1\]:\d+"),
        ("[::1]:4242", r"ws://\[::1\]:4242"),
    ],
)
async def test_the_announced_address_is_the_endpoint(
    tmp_path: Path, announce: str, expected: str
) -> None:
    async with TalosClient.create(
        "alice", home=tmp_path / "a", discovery=[], listen="127.0.0.1:0", announce=announce
    ) as a:
        assert re.fullmatch(expected, a.endpoint), a.endpoint
        assert a.peer_record().endpoint == a.endpoint


async def test_a_failing_fast_path_falls_back_to_the_delivery_loop(tmp_path: Path) -> None:
    """If the fast path cannot read the queue, send() is not left waiting: the message
    is queued and the delivery loop delivers it."""
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "warm up", timeout=10)).status == "delivered"
        depth = a._state.outbox_count  # noqa: SLF001 -- the fast path's first read
        failures = [StorageError("disk hiccup")]

        def flaky() -> int:
            if failures:
                raise failures.pop()  # the fast path's first step
            return depth()

        a._state.outbox_count = flaky  # type: ignore[method-assign]  # noqa: SLF001
        sent = await asyncio.wait_for(a.send(b.agent_id, "still delivered", timeout=10), 15)
        assert sent.status == "delivered"
        assert failures == []


async def test_a_failed_removal_is_retried_under_steady_traffic(tmp_path: Path) -> None:
    """An ACKed message whose removal commit failed is sent again (answered DUPLICATE)
    and removed, even while later messages keep the window busy."""
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "warm up", timeout=10)).status == "delivered"
        remove_many = a._state.remove_many  # noqa: SLF001
        failures = [StorageError("disk hiccup")]

        def flaky(*args: object, **kwargs: object) -> object:
            if failures:
                raise failures.pop()
            return remove_many(*args, **kwargs)  # type: ignore[arg-type]

        a._state.remove_many = flaky  # type: ignore[method-assign]  # noqa: SLF001
        results = await asyncio.gather(*(a.send(b.agent_id, n, timeout=20) for n in range(300)))
        assert {r.status for r in results} == {"delivered"}
        assert failures == []
        assert a.queue_depth() == 0
        got = [await b.receive(timeout=5) for _ in range(301)]
        assert sorted(m.data for m in got[1:] if m is not None) == list(range(300))
        assert await b.receive(timeout=0.05) is None


async def test_only_an_ack_to_this_handshake_confirms_the_session(tmp_path: Path) -> None:
    """An ACK for a message sent under an earlier session (reset since) does not mark
    the new, unconfirmed session as held by the peer."""
    async with introduced(tmp_path) as (a, b):
        current = a._parts.sessions.table.committed(b.agent_id)  # noqa: SLF001
        assert current is not None
        assert current.handshake is not None  # X3DH header pending: not confirmed yet
        stale_ack = wire.Envelope(
            type=wire.EnvelopeType.ACK,
            message_id=b"\x02" * 16,
            sender=b.agent_id,
            sender_instance=b"\x03" * 16,
            recipient=a.agent_id,
            timestamp_ms=int(time.time() * 1000),
            ref_ids=(b"\x04" * 16,),
            status=wire.AckStatus.ACCEPTED,
        )
        a._parts.acks._delivered(stale_ack, [None])  # noqa: SLF001 -- a message of an old session
        assert not a._parts.sessions.table.committed(b.agent_id).confirmed  # type: ignore[union-attr]  # noqa: SLF001
        # The real first message confirms it.
        assert (await a.send(b.agent_id, "first", timeout=10)).status == "delivered"
        assert a._parts.sessions.table.committed(b.agent_id).confirmed  # type: ignore[union-attr]  # noqa: SLF001


async def test_receive_timeout_runs_on_the_injected_clock(tmp_path: Path) -> None:
    """Every deadline is measured on the agent's clock: a receive() waiting on a FakeClock
    returns None once the clock is advanced past its timeout, and not before."""
    from talos.testing import FakeClock

    clock = FakeClock(start=time.time())
    async with TalosClient.create("bob", home=tmp_path / "b", discovery=[], clock=clock) as b:
        for auto_ack in (True, False):
            waiting = asyncio.create_task(b.receive(timeout=30, auto_ack=auto_ack))
            await asyncio.sleep(0.2)  # real time passes: the agent's clock does not
            assert not waiting.done()
            clock.advance(10)
            await asyncio.sleep(0.05)
            assert not waiting.done()
            clock.advance(21)
            assert await asyncio.wait_for(waiting, 5) is None


async def test_trace_ids_come_from_the_injected_rng(tmp_path: Path) -> None:
    """Ids an agent makes (message and trace ids) come from its Rng: two agents with the
    same seeded Rng queue the same ids."""
    from talos.testing import SeededRng

    ids = []
    for home in ("a1", "a2"):
        async with TalosClient.create(
            "alice",
            home=tmp_path / home,
            discovery=[],
            offline_mode=True,
            accept_policy="open",
            rng=SeededRng(7),
        ) as a:
            result = await a.send("did:talos:z" + "1" * 32, "queued")
            ids.append((result.message_id, result.trace_id))
    assert ids[0] == ids[1]


async def test_bad_revocation_lists_sent_again_and_again_are_audited_at_a_bounded_rate(
    tmp_path: Path,
) -> None:
    """REVOCATIONS envelopes are signed but not replay-checked: a peer (or a replay of
    its traffic) repeating a bad list cannot write an audit entry per copy."""
    async with introduced(tmp_path) as (a, b):
        assert (await a.send(b.agent_id, "hello", timeout=10)).status == "delivered"
        link = a._parts.deliverer.links[b.agent_id]  # noqa: SLF001 -- a raw signed envelope
        signer = a._parts.capabilities._signer  # noqa: SLF001
        for _ in range(60):
            await signer.send(
                link, b.agent_id, wire.EnvelopeType.REVOCATIONS, revocation_list=b"\xa0"
            )
        assert (await a.send(b.agent_id, "still fine", timeout=10)).status == "delivered"
    failures = audit_kinds(tmp_path / "b").count("SIGNATURE_FAILURE")
    assert 1 <= failures <= 25
