"""Every agent metric moves through the system (issue 17).

One shared scenario: a real registry process, three agents in this process
(``alice``, ``bob``, ``carol``) serving ``/metrics`` on real ports, driven
through their public API, the CLI and raw frames on real links; at the end
each agent's ``/metrics`` is scraped once over HTTP and parsed. No metric
method is called: a series counts as moved only if the scenario's scrape
shows it away from its start-up value.

``SCENARIO`` below names, per series, the agent whose scrape must show it
moved. ``docs/metrics.md`` ("What moves each metric") names, for every
documented agent metric, the code path and the system test that moves it;
``tests/unit/test_metrics_table.py`` checks that table against the docs and
:class:`talos.metrics.AgentMetrics`, and that each test named holds the name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.core import wire
from talos.core.capability import Capability
from talos.core.capability.issuing import delegate
from talos.core.revocation import RevocationList
from talos.errors import DiscoveryError, PeerRejected, SignatureInvalid
from talos.storage.agent_state import AgentState
from talos.storage.home import AgentHome
from talos.testing import SeededRng
from talos.testing.cli import TalosCli
from talos.testing.processes import RegistryProcess, start_registry

pytestmark = pytest.mark.asyncio

CLI = TalosCli()
#: Forged frames sent at once: past the audit rate limit's burst (20).
FORGED = 30

#: (series, labels) -> the agent whose scrape must show it moved (counter or
#: histogram count > 0, gauge not 0 and not NaN).
SCENARIO: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {
    ("talos_sessions_active", ()): "alice",
    ("talos_sessions_established_total", ()): "bob",
    ("talos_session_establishment_seconds_count", ()): "alice",
    ("talos_session_failures_total", (("reason", "decrypt_failed"),)): "bob",
    ("talos_session_failures_total", (("reason", "peer_refused"),)): "alice",
    ("talos_session_failures_total", (("reason", "bad_bundle"),)): "alice",
    ("talos_session_failures_total", (("reason", "no_bundle"),)): "bob",
    ("talos_session_resets_total", ()): "alice",
    ("talos_messages_sent_total", ()): "alice",
    ("talos_messages_received_total", ()): "bob",
    ("talos_messages_delivered_total", ()): "alice",
    ("talos_messages_rejected_total", (("reason", "capability_denied"),)): "alice",
    ("talos_messages_queued", ()): "alice",
    ("talos_message_send_seconds_count", ()): "alice",
    ("talos_message_size_bytes_count", (("direction", "sent"),)): "alice",
    ("talos_message_size_bytes_count", (("direction", "received"),)): "bob",
    ("talos_capabilities_granted_total", ()): "bob",
    ("talos_capabilities_revoked_total", ()): "bob",
    ("talos_capabilities_denied_total", (("reason", "ScopeMismatch"),)): "bob",
    ("talos_capability_verification_seconds_count", ()): "bob",
    ("talos_audit_entries_total", ()): "bob",
    ("talos_audit_size_bytes", ()): "bob",
    ("talos_audit_entries_suppressed_total", ()): "bob",
    ("talos_signature_failures_total", (("reason", "bad_signature"),)): "bob",
    ("talos_signature_failures_by_object_total", (("object", "envelope"),)): "bob",
    ("talos_signature_failures_by_object_total", (("object", "prekey_bundle"),)): "alice",
    ("talos_signature_failures_by_object_total", (("object", "key_log"),)): "bob",
    ("talos_signature_failures_by_object_total", (("object", "revocation_list"),)): "bob",
    ("talos_revocation_stale_accepted_total", (("mode", "offline"),)): "bob",
    ("talos_frames_malformed_total", ()): "bob",
    ("talos_links_closed_malformed_total", ()): "bob",
    ("talos_transport_throttled_total", ()): "bob",
    ("talos_log_lines_suppressed_total", (("event", "signature_failure"),)): "bob",
}


def scrape(client: TalosClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` of a running agent over HTTP, parsed: (sample, labels) -> value."""
    host, port = client.metrics.address or ("", 0)
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def moved(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and value != 0


def entries(home: Path, kind: str) -> list[Any]:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        return [e for e in log.query() if e.kind == kind]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    server = start_registry(tmp_path / "registry.db", tmp_path / "registry.log")
    try:
        yield server
    finally:
        server.stop()


def grant(home: Path, to: str, *more: str) -> str:
    return CLI.ok(home, "capabilities", "grant", "--to", to, "--action", "message.send",
                  "--expires-in", "1h", *more).strip().splitlines()[-1]  # fmt: skip


def homes(tmp_path: Path) -> dict[str, Any]:
    """Three identities; bob's grants (made before bob runs: it owns its audit log then)."""
    ids = {n: CLI.ok(tmp_path / n, "init", "--name", n).strip().splitlines()[-1]
           for n in ("alice", "bob", "carol")}  # fmt: skip
    bob = tmp_path / "bob"
    revoked = Capability.from_text(grant(bob, ids["alice"]))
    CLI.ok(bob, "capabilities", "revoke", revoked.token_id.hex(), "--reason", "test")
    return {
        "ids": ids,
        "alice_token": grant(bob, ids["alice"]),
        "carol_token": grant(bob, ids["carol"], "--delegable"),
    }


def forged_frame(alice: TalosClient, home: Path, recipient: str, n: int) -> bytes:
    """A frame from alice whose signature does not verify."""
    envelope = wire.Envelope(
        type=wire.EnvelopeType.MESSAGE,
        message_id=n.to_bytes(16, "big"),
        sender=alice.agent_id,
        sender_instance=b"\x02" * 16,
        recipient=recipient,
        timestamp_ms=int(time.time() * 1000),
        ratchet_header=b"h" * 40,
        ciphertext=b"c" * 40,
    )
    frame = bytearray(
        wire.seal(envelope, AgentHome(home).load_identity(passphrase=None).signing_key)
    )
    frame[-1] ^= 1
    return bytes(frame)


def flipped(data: bytes, signature: bytes) -> bytes:
    """``data`` with one bit of ``signature`` (found in it) flipped."""
    at = data.index(signature)
    return data[:at] + bytes([signature[0] ^ 1]) + data[at + 1 :]


def bad_signed_objects(
    alice: TalosClient, home: Path
) -> list[tuple[wire.EnvelopeType, str, bytes]]:
    identity = AgentHome(home).load_identity(passphrase=None)
    log = identity.keylog.to_bytes()
    own_list = RevocationList.create(alice.agent_id, now=time.time()).signed_by(
        identity.signing_key, identity.sequence
    )
    return [
        (wire.EnvelopeType.KEYLOG, "key_log", flipped(log, identity.keylog.events[0].signature)),
        (
            wire.EnvelopeType.REVOCATIONS,
            "revocation_list",
            flipped(own_list.to_bytes(), own_list.signature),
        ),
    ]


def signed_frame(
    alice: TalosClient,
    home: Path,
    recipient: str,
    kind: wire.EnvelopeType,
    field: str,
    data: bytes,
) -> bytes:
    """A control envelope alice really signed, carrying ``data`` in ``field``."""
    envelope = wire.Envelope(
        type=kind,
        message_id=SeededRng(len(data)).bytes(16),
        sender=alice.agent_id,
        sender_instance=b"\x03" * 16,
        recipient=recipient,
        timestamp_ms=int(time.time() * 1000),
        **{field: data},
    )
    return wire.seal(envelope, AgentHome(home).load_identity(passphrase=None).signing_key)


async def test_every_series_of_the_scenario_moves(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    made = homes(tmp_path)
    common: dict[str, Any] = {"registry_url": registry.url, "metrics_port": 0}
    alice = await TalosClient.create(
        "alice", home=tmp_path / "alice", accept_policy="open", **common
    )
    bob = await TalosClient.create(
        "bob", home=tmp_path / "bob", revocation_mode="offline", **common
    )
    carol = await TalosClient.create(
        "carol", home=tmp_path / "carol", accept_policy="open", **common
    )
    try:
        await scenario(tmp_path, registry, made, alice, bob, carol)
        scraped = {"alice": scrape(alice), "bob": scrape(bob)}
    finally:
        for client in (alice, bob, carol):
            await client.close()
    still = [
        f"{name}{dict(labels)} on {agent}"
        for (name, labels), agent in SCENARIO.items()
        if not moved(scraped[agent].get((name, labels)))
    ]
    assert still == []
    assert scraped["bob"][("talos_capabilities_granted_total", ())] == 3
    assert scraped["bob"][("talos_capabilities_revoked_total", ())] == 1
    # Every forged frame is in bob's audit log: audited, or counted in a
    # FAILURES_SUPPRESSED entry (written at the latest when bob closed).
    bob_home = tmp_path / "bob"
    audited = [e for e in entries(bob_home, "SIGNATURE_FAILURE") if e.peer == alice.agent_id]
    summaries = [
        e.data for e in entries(bob_home, "FAILURES_SUPPRESSED") if e.peer == alice.agent_id
    ]
    assert summaries
    assert {s["kind"] for s in summaries} == {"SIGNATURE_FAILURE"}
    # (+1: the revocation list with a bad signature is a SIGNATURE_FAILURE too.)
    assert len(audited) + sum(s["count"] for s in summaries) == FORGED + 1
    assert all(s["from_ms"] <= s["to_ms"] for s in summaries)
    # ... and a query by kind says how many it does not list.
    query = CLI.run(bob_home, "audit", "query", "--type", "signature_failure",
                    "--peer", alice.agent_id, "--json").expect(0)  # fmt: skip
    left_out = sum(s["count"] for s in summaries)
    assert f"note: {left_out} more SIGNATURE_FAILURE events were left out" in query.stderr


async def scenario(
    tmp_path: Path,
    registry: RegistryProcess,
    made: dict[str, Any],
    alice: TalosClient,
    bob: TalosClient,
    carol: TalosClient,
) -> None:
    # Sessions through the registry's bundles; a token bob granted.
    token = made["alice_token"]
    assert (
        await alice.send(bob.agent_id, "one", capability=token, timeout=30)
    ).status == "delivered"
    carol_token = made["carol_token"]
    sent = await carol.send(bob.agent_id, "from carol", capability=carol_token, timeout=30)
    assert sent.status == "delivered"
    assert (await alice.send(carol.agent_id, "hi carol", timeout=30)).status == "delivered"

    # Bob loses the session: it cannot decrypt, alice is refused, both start over.
    await bob.reset_session(alice.agent_id)
    sent = await alice.send(bob.agent_id, "after reset", capability=token, timeout=30)
    assert sent.status == "delivered"

    # No capability: bob refuses, alice counts the refusal.
    with pytest.raises(PeerRejected):
        await alice.send(bob.agent_id, "no token", timeout=30, on_failure="raise")

    # Forged frames from alice, past the audit rate limit's burst.
    link = alice._parts.deliverer.links[bob.agent_id]  # type: ignore[union-attr]
    for n in range(FORGED):
        await link.send(forged_frame(alice, tmp_path / "alice", bob.agent_id, n))
    # A key log and a revocation list offered in alice's name whose signatures fail
    # (in envelopes alice did sign).
    for kind, field, data in bad_signed_objects(alice, tmp_path / "alice"):
        await link.send(signed_frame(alice, tmp_path / "alice", bob.agent_id, kind, field, data))
    sent = await alice.send(bob.agent_id, "after the flood", capability=token, timeout=30)
    assert sent.status == "delivered"  # ordered after the forged frames on the same link

    # A prekey bundle whose signature does not verify.
    bundle = carol.get_prekey_bundle()
    bad = bytes([bundle.signed_prekey_signature[0] ^ 1]) + bundle.signed_prekey_signature[1:]
    with pytest.raises(SignatureInvalid):
        await alice.establish_session(
            carol.agent_id, dataclasses.replace(bundle, signed_prekey_signature=bad)
        )

    # The registry goes down: carol's revocation list cannot be synced, and bob
    # (offline mode) accepts a token carol delegated on the list it has (none).
    registry.stop()
    carol_identity = AgentHome(tmp_path / "carol").load_identity(passphrase=None)
    delegated = delegate(
        Capability.from_text(carol_token),
        carol_identity.signing_key,
        key_sequence=carol_identity.sequence,
        subject=alice.agent_id,
        now=time.time(),
        rng=SeededRng(17),
    )
    sent = await alice.send(bob.agent_id, "delegated", capability=delegated.to_text(), timeout=30)
    assert sent.status == "delivered"
    # ... and no bundle can be fetched for a new session.
    with pytest.raises(DiscoveryError):
        await bob.establish_session(carol.agent_id)

    # A message queued for a peer that stopped.
    await carol.close()
    await alice.send(carol.agent_id, "later", wait=False)

    # Garbage on a link to bob: dropped, then the link is closed.
    async with asyncio.timeout(20), websockets.connect(bob.endpoint) as raw:
        for _ in range(9):
            await raw.send(b"not a frame")
        await raw.wait_closed()  # bob closed it (1008) after the 9th
    assert raw.close_code == 1008
    # ... and its address is refused new links for a while (HTTP 429).
    with pytest.raises(InvalidStatus) as refused:
        async with asyncio.timeout(20), websockets.connect(bob.endpoint):
            pass
    assert refused.value.response.status_code == 429


@pytest.mark.parametrize("grace", [3600.0, 0.0])
async def test_permissive_mode_accepts_a_stale_list_for_the_grace_only(
    tmp_path: Path, registry: RegistryProcess, grace: float, caplog: pytest.LogCaptureFixture
) -> None:
    """``revocation_grace`` decides: with ``revocation_max_age=0`` every issuer's list
    is stale at the check; within the grace bob accepts carol's delegation and says
    so, past it (grace 0) he refuses it."""
    made = homes(tmp_path)
    common: dict[str, Any] = {"registry_url": registry.url, "metrics_port": 0}
    carol = await TalosClient.create("carol", home=tmp_path / "carol", **common)
    await carol.close()  # its key log is in the registry
    carol_identity = AgentHome(tmp_path / "carol").load_identity(passphrase=None)
    async with (
        TalosClient.create("alice", home=tmp_path / "alice", accept_policy="open", **common) as a,
        TalosClient.create(
            "bob",
            home=tmp_path / "bob",
            revocation_mode="permissive",
            revocation_max_age=0,
            revocation_grace=grace,
            **common,
        ) as b,
    ):
        delegated = delegate(
            Capability.from_text(made["carol_token"]),
            carol_identity.signing_key,
            key_sequence=carol_identity.sequence,
            subject=a.agent_id,
            now=time.time(),
            rng=SeededRng(18),
        ).to_text()
        if grace:
            sent = await a.send(b.agent_id, "delegated", capability=delegated, timeout=30)
            assert sent.status == "delivered"
        else:
            # Refused as stale (retried later: the list may be synced by then).
            sent = await a.send(b.agent_id, "delegated", capability=delegated, timeout=3)
            assert sent.status == "queued"
        scraped = scrape(b)
    accepted = scraped[("talos_revocation_stale_accepted_total", (("mode", "permissive"),))]
    denied = scraped[("talos_capabilities_denied_total", (("reason", "RevocationListStale"),))]
    assert (accepted >= 1, denied >= 1) == ((True, False) if grace else (False, True))
    warned = [
        r for r in caplog.records if getattr(r, "event", "") == "revocation_list_stale_accepted"
    ]
    assert bool(warned) == bool(grace)
    assert all("permissive mode on the revocation list of" in r.getMessage() for r in warned)
