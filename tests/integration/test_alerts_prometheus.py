"""The seed's alerts against a real Prometheus, on failures caused for real.

Debian's ``prometheus`` server scrapes real agents and a real registry every
second and evaluates a *test copy* of ``deploy/prometheus/talos-alerts.yml``
written here: the same expressions with their ``for:`` durations, range
windows and the revocation age threshold shortened so the test takes about a
minute (:func:`shortened`); the shipped file is never touched. Each failure is
caused through the system, not by moving a metric:

* ``SignatureVerificationFailures``: frames claiming to come from a peer,
  signed by another key, sent to an agent.
* ``SessionEstablishmentFailures``: messages signed by the peer's real key
  whose ratchet header and ciphertext open no session.
* ``RevocationListStale``: a delegated token's issuer list falls due while
  the registry is down; its age grows at every scrape.
* ``TalosRegistryUnreachable``: the same outage, seen by Prometheus.
* ``AuditAnchorFailure``: an agent anchoring on anvil, the chain stopped.

The alerts' states are read from Prometheus' HTTP API (``/api/v1/alerts``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from alert_rules import RULES

from talos.client import TalosClient
from talos.core import wire
from talos.core.capability import Capability, delegate
from talos.core.crypto import SigningKey
from talos.storage.home import AgentHome
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG
from talos.testing.chain import DEV_KEYS, AnvilProcess, start_anvil
from talos.testing.cli import TalosCli
from talos.testing.processes import launched, start_registry
from talos.testing.prometheus import prometheus_binary, shortened_rules, start_prometheus
from talos.testing.waiting import wait_until
from talos.transport import Link, Transport

pytestmark = pytest.mark.asyncio

CLI = TalosCli(timeout=120)
#: Seconds a revocation list may age in the test copy (the shipped rule: 600).
STALE_AFTER = 5


def shortened(rules: str) -> str:
    """The shipped rules with test-sized durations: ``for:`` 2s, windows 30s, age 5s."""
    return shortened_rules(
        rules,
        replace={
            "talos_revocation_list_age_seconds > 600": (
                f"talos_revocation_list_age_seconds > {STALE_AFTER}"
            )
        },
    )


def cli(home: Path | None, *args: str) -> str:
    return CLI.ok(home, *args).strip()


def prometheus_or_fail() -> None:
    if prometheus_binary() is None:
        pytest.fail("prometheus is not on PATH: apt-get install prometheus (.ci/run installs it)")


def delegated(tmp_path: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Bob grants Carol a delegable token; Carol delegates it to Alice. Dave accepts anyone."""
    homes = {name: tmp_path / name for name in ("alice", "bob", "carol", "dave")}
    ids = {name: cli(home, "init", "--name", name) for name, home in homes.items()}
    logs = {name: tmp_path / f"{name}.log" for name in homes}
    for name, home in homes.items():
        cli(home, "whoami", "--export-log", str(logs[name]))
    root = cli(homes["bob"], "capabilities", "grant", "--to", ids["carol"],
               "--action", "message.send", "--expires-in", "2h", "--delegable")  # fmt: skip
    cli(homes["carol"], "capabilities", "add", root, "--issuer-log", str(logs["bob"]))
    carol = AgentHome(homes["carol"]).load_identity(passphrase=None)
    child = delegate(Capability.from_text(root), carol.signing_key, key_sequence=0,
                     subject=ids["alice"], now=SYSTEM_CLOCK.time(), rng=SYSTEM_RNG)  # fmt: skip
    cli(homes["alice"], "capabilities", "add", child.to_text(),
        "--issuer-log", str(logs["bob"]), "--issuer-log", str(logs["carol"]))  # fmt: skip
    return homes, ids


def garbage_message(sender_key: SigningKey, sender: str, recipient: str) -> bytes:
    """A MESSAGE signed by ``sender_key`` whose header and ciphertext open no session."""
    envelope = wire.Envelope(
        type=wire.EnvelopeType.MESSAGE,
        message_id=wire.new_message_id(SYSTEM_RNG),
        sender=sender,
        sender_instance=wire.new_instance_id(SYSTEM_RNG),
        recipient=recipient,
        timestamp_ms=int(SYSTEM_CLOCK.time() * 1000),
        ratchet_header=b"h" * 40,
        ciphertext=b"c" * 40,
    )
    return wire.seal(envelope, sender_key)


@asynccontextmanager
async def link_to(endpoint: str) -> AsyncIterator[Link]:
    async def ignore(link: Link, frame: bytes) -> None:
        return None

    transport = Transport(ignore, clock=SYSTEM_CLOCK)
    try:
        yield await transport.connect(endpoint)
    finally:
        await transport.close()


def address(client: TalosClient) -> str:
    host, port = client.metrics.address or ("", 0)
    return f"{host}:{port}"


def anchoring_agent(tmp_path: Path, anvil: AnvilProcess) -> list[str]:
    """``talos run`` arguments of an agent anchoring on ``anvil`` every second."""
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[2])
    deployed = cli(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(key_file))
    contract = deployed.splitlines()[-1]
    return ["--offline", "--metrics-port", "0", "--anchor-rpc", anvil.url,
            "--anchor-contract", contract, "--anchor-key-file", str(key_file),
            "--anchor-interval", "1", "--anchor-confirmations", "3"]  # fmt: skip


async def test_the_seed_alerts_fire_in_a_real_prometheus(tmp_path: Path) -> None:
    prometheus_or_fail()
    homes, ids = delegated(tmp_path)
    anchorer = tmp_path / "anchorer"
    anchorer_id = cli(anchorer, "init", "--name", "anchorer")
    cli(anchorer, "capabilities", "grant", "--to", anchorer_id, "--action", "message.send",
        "--expires-in", "1h")  # fmt: skip
    anvil = start_anvil(tmp_path / "anvil.log")
    registry = start_registry(tmp_path / "registry.db", tmp_path / "registry.log",
                              extra=["--metrics-port", "0"])  # fmt: skip
    prometheus = None
    try:
        with launched() as launcher:
            anchoring = launcher.agent(anchorer, *anchoring_agent(tmp_path, anvil))
            found = re.search(
                r"metrics on http://(127\.0\.0\.1:\d+)/metrics", anchoring.read_line()
            )
            assert found
            url = registry.url
            async with (
                TalosClient.create(
                    "bob", home=homes["bob"], registry_url=url, metrics_port=0, revocation_max_age=1
                ) as bob,  # fmt: skip
                TalosClient.create("alice", home=homes["alice"], registry_url=url) as alice,
                TalosClient.create("carol", home=homes["carol"], registry_url=url),
                TalosClient.create(
                    "dave",
                    home=homes["dave"],
                    registry_url=url,
                    metrics_port=0,
                    accept_policy="open",
                ) as dave,  # fmt: skip
            ):
                registry_metrics = (registry.metrics_url or "").removeprefix("http://")
                prometheus = prom = start_prometheus(
                    tmp_path / "prometheus",
                    shortened(RULES.read_text()),
                    agents=[address(bob), address(dave), found.group(1)],
                    registries=[registry_metrics],
                )
                await prom.until_scraped(4)
                assert await prom.alerts() == {}  # the alerts start quiet

                # Forged envelopes: "alice" frames signed by another key; and frames
                # signed by alice's real key that open no session.
                forger = SigningKey.generate(SYSTEM_RNG)
                alice_key = AgentHome(homes["alice"]).load_identity(passphrase=None).signing_key
                async with link_to(dave.status()["endpoint"]) as link:
                    for _ in range(3):
                        await link.send(garbage_message(forger, ids["alice"], ids["dave"]))
                    for _ in range(20):
                        await link.send(garbage_message(alice_key, ids["alice"], ids["dave"]))
                    (signatures,) = await prom.until_firing("SignatureVerificationFailures")
                    (sessions,) = await prom.until_firing("SessionEstablishmentFailures")
                assert signatures["labels"]["instance"] == address(dave)
                assert sessions["labels"]["instance"] == address(dave)

                # A delegated token: bob syncs carol's list; then the registry goes down.
                sent = await alice.send(ids["bob"], "delegated", timeout=10)
                assert sent.status == "delivered"
                registry.stop()
                due = SYSTEM_CLOCK.time() + 1.5  # past bob's revocation_max_age
                wait_until(lambda: SYSTEM_CLOCK.time() > due, 5.0, what="the list falls due")
                await alice.send(ids["bob"], "while the registry is down")
                (stale,) = await prom.until_firing("RevocationListStale")
                assert stale["labels"]["instance"] == address(bob)
                assert float(stale["value"]) > STALE_AFTER
                unreachable = await prom.until_firing("TalosRegistryUnreachable")
                assert registry_metrics in {a["labels"]["instance"] for a in unreachable}

                # Anchoring: the chain stops while the anchor waits for confirmations.
                anvil.stop()
                (anchor,) = await prom.until_firing("AuditAnchorFailure")
                assert anchor["labels"]["instance"] == found.group(1)
            anchoring.stop()
    finally:
        if prometheus is not None:
            prometheus.stop()
        registry.stop()
        anvil.stop()
