"""The rest of the shipped alerts against a real Prometheus, on failures caused for real.

Like test_alerts_prometheus.py (the seed's alerts): Debian's ``prometheus``
scrapes real agents and a real registry every second and evaluates a *test
copy* of ``deploy/prometheus/talos-alerts.yml`` (``for:`` 2s, windows 30s,
and the queue threshold 500 lowered to :data:`QUEUED` so the test queues a
handful of messages, not hundreds: only in the copy, never in the shipped
file). Each run first waits through a healthy period, several evaluations
long, in which no alert is even pending; then causes each failure:

* ``TalosQueueDepthHigh``: Dave's peer Bob stops; Dave's messages to him
  queue past the threshold.
* ``TalosRegistryDuplicateIdentity`` and ``TalosDuplicateInstance``: a copy
  of Alice's home starts as a second instance and announces; Alice's
  quarter-hourly re-announcement comes (her clock is a ``FakeClock`` moved
  15 minutes, its wall time kept at the real time), so the registry saw both
  announce at once; Alice, the copy, then Alice again message Dave, who
  hears one identity from two instances.
* ``TalosClockOffsetHigh``: an agent whose wall clock is 20 s ahead, for
  real (``talos run`` with libfaketime preloaded), measures its offset
  from the registry.
* ``AuditEquivocation``: Bob cosigns Alice's checkpoints; Alice's home is put
  back from an earlier copy and she messages him again: Bob, her witness,
  holds a head her log now contradicts: it fires on both sides (``role``
  ``witness`` on Bob, ``origin`` on Alice).
* ``AuditAnchorMismatch``: an agent anchoring on anvil; its own wallet's key,
  used by someone else, anchors a root its log never had.

The alerts' states are read from Prometheus' HTTP API.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from alert_rules import RULES
from shifted_clock import LIBRARY, MISSING, sweep
from shifted_clock import prefix as shifted
from witness_cast import WitnessPeer

from talos.audit.anchoring.contract import anchor_calldata, log_id
from talos.audit.anchoring.wallet import load_wallet
from talos.client import TalosClient
from talos.client.discovery import RECORD_LIFETIME
from talos.testing import FakeClock
from talos.testing.chain import DEV_KEYS, start_anvil
from talos.testing.cli import TalosCli, clean_env
from talos.testing.processes import free_port, launched, start_registry
from talos.testing.prometheus import Prometheus, prometheus_binary, shortened_rules
from talos.testing.prometheus import start_prometheus as start_server
from talos.testing.waiting import wait_until

pytestmark = pytest.mark.asyncio

CLI = TalosCli(timeout=120)
#: Messages waiting that make TalosQueueDepthHigh fire in the test copy (shipped: 500).
QUEUED = 5
#: How far ahead the skewed agent's wall clock is (the alert's threshold: 5 s).
AHEAD = 20
#: Seconds of healthy running (one evaluation a second) in which nothing may be pending.
HEALTHY = 4


def start_prometheus(tmp_path: Path, agents: list[str], registries: list[str]) -> Prometheus:
    if prometheus_binary() is None:
        pytest.fail("prometheus is not on PATH: apt-get install prometheus (.ci/run installs it)")
    rules = shortened_rules(
        RULES.read_text(),
        replace={"talos_messages_queued > 500": f"talos_messages_queued > {QUEUED}"},
    )
    return start_server(tmp_path / "prometheus", rules, agents=agents, registries=registries)


async def healthy(prometheus: Prometheus, targets: int) -> None:
    """All ``targets`` scraped, then :data:`HEALTHY` evaluations with no alert pending."""
    await prometheus.until_scraped(targets)
    await prometheus.evaluations(HEALTHY)
    assert await prometheus.active() == {}


def cli(home: Path | None, *args: str) -> str:
    return CLI.ok(home, *args).strip()


def address(client: TalosClient) -> str:
    host, port = client.metrics.address or ("", 0)
    return f"{host}:{port}"


async def test_queue_split_brain_and_clock_alerts_fire(tmp_path: Path) -> None:
    if LIBRARY is None:
        pytest.fail(MISSING)
    homes = {name: tmp_path / name for name in ("alice", "bob", "dave", "skewed")}
    ids = {name: cli(home, "init", "--name", name) for name, home in homes.items()}
    twin = tmp_path / "alice-copy"
    shutil.copytree(homes["alice"], twin)  # the same identity, as if restored on a second host
    registry = start_registry(tmp_path / "registry.db", tmp_path / "registry.log",
                              extra=["--metrics-port", "0"])  # fmt: skip
    skewed_metrics = f"127.0.0.1:{free_port()}"
    prometheus = None
    env = clean_env(drop=("TALOS_", "FAKETIME", "LD_PRELOAD"))
    started = time.monotonic()
    # Alice's clock is fake only to let her quarter-hourly re-announcement come now:
    # its wall time is kept at the real time (real_time()) before she does anything.
    clock = FakeClock(start=time.time())

    def real_time() -> None:
        clock.set_time(time.time())

    try:
        with launched(env) as launcher:
            url = registry.url
            async with (
                TalosClient.create(
                    "alice", home=homes["alice"], registry_url=url, clock=clock
                ) as alice,  # fmt: skip
                TalosClient.create(
                    "bob", home=homes["bob"], registry_url=url, accept_policy="open"
                ) as bob,  # fmt: skip
                TalosClient.create(
                    "dave",
                    home=homes["dave"],
                    registry_url=url,
                    metrics_port=0,
                    accept_policy="open",
                ) as dave,  # fmt: skip
            ):
                registry_metrics = (registry.metrics_url or "").removeprefix("http://")
                prometheus = start_prometheus(
                    tmp_path, [address(dave), skewed_metrics], [registry_metrics]
                )
                assert (await dave.send(ids["bob"], "hello", timeout=20)).status == "delivered"
                real_time()
                assert (await alice.send(ids["dave"], "one", timeout=20)).status == "delivered"
                await healthy(prometheus, 2)  # the skewed agent is not up yet

                # Bob stops: Dave's messages to him wait in the outbox.
                await bob.close()
                for n in range(QUEUED + 3):
                    await dave.send(ids["bob"], f"queued {n}", wait=False)
                (queue,) = await prometheus.until_firing("TalosQueueDepthHigh")
                assert queue["labels"]["instance"] == address(dave)
                assert float(queue["value"]) > QUEUED

                # A second instance of Alice's identity starts and announces; Alice's
                # re-announcement (every 15 minutes) comes: the registry has seen both
                # announce at once. Dave hears Alice, her copy, then Alice again.
                async with TalosClient.create("alice", home=twin, registry_url=url) as copy:
                    clock.advance(RECORD_LIFETIME / 4)
                    real_time()
                    (listed,) = await prometheus.until_firing("TalosRegistryDuplicateIdentity")
                    assert listed["labels"]["instance"] == registry_metrics
                    await copy.send(ids["dave"], "two", timeout=20)
                    real_time()
                    await alice.send(ids["dave"], "three", wait=False)
                    (heard,) = await prometheus.until_firing("TalosDuplicateInstance")
                    assert heard["labels"]["instance"] == address(dave)

                # A host clock AHEAD seconds fast, for real: the agent measures it.
                port = skewed_metrics.rsplit(":", 1)[1]
                launcher.agent(homes["skewed"], "--registry", url, "--metrics-port", port,
                               prefix=shifted(f"+{AHEAD}s"))  # fmt: skip
                (clock,) = await prometheus.until_firing("TalosClockOffsetHigh")
                assert clock["labels"]["instance"] == skewed_metrics
                assert AHEAD - 3 < float(clock["value"]) < AHEAD + 3

                # The registry answered all along.
                assert "TalosRegistryUnreachable" not in await prometheus.active()
    finally:
        sweep()  # what libfaketime left in /dev/shm for the skewed agent
        if prometheus is not None:
            prometheus.stop()
        registry.stop()
    print(f"queue, split brain and clock alerts: {time.monotonic() - started:.1f} s")  # noqa: T201


async def test_equivocation_and_anchor_mismatch_alerts_fire(tmp_path: Path) -> None:
    started = time.monotonic()
    anvil = start_anvil(tmp_path / "anvil.log", extra=["--block-time", "1"])
    registry = start_registry(tmp_path / "registry.db", tmp_path / "registry.log")
    prometheus = None
    try:
        key_file = tmp_path / "wallet.hex"
        key_file.write_text(DEV_KEYS[2])
        deployed = cli(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(key_file))
        contract = deployed.splitlines()[-1]
        anchoring = tmp_path / "anchoring"
        anchoring_id = cli(anchoring, "init", "--name", "anchoring")
        cli(anchoring, "capabilities", "grant", "--to", anchoring_id, "--action", "message.send",
            "--expires-in", "1h")  # fmt: skip
        anchoring_metrics = free_port()
        with launched() as launcher:
            alice = WitnessPeer(tmp_path / "alice", registry, launcher).init("alice")
            bob = WitnessPeer(tmp_path / "bob", registry, launcher).init("bob")
            assert isinstance(alice, WitnessPeer)
            assert isinstance(bob, WitnessPeer)
            earlier = tmp_path / "alice-earlier"
            alice.copy_home(earlier)
            launcher.agent(anchoring, "--offline", "--metrics-port", str(anchoring_metrics),
                           "--anchor-rpc", anvil.url, "--anchor-contract", contract,
                           "--anchor-key-file", str(key_file), "--anchor-interval", "1",
                           "--anchor-confirmations", "2")  # fmt: skip
            alice.start(), bob.start()
            targets = [f"127.0.0.1:{p}" for p in (alice.metrics_port, bob.metrics_port)]
            prometheus = start_prometheus(
                tmp_path, [*targets, f"127.0.0.1:{anchoring_metrics}"], []
            )
            for n in range(3):
                assert alice.send(bob, f"a{n}").startswith("delivered ")
            wait_until(lambda: alice.cosigned(bob), 30.0, what="bob cosigned alice's checkpoint")
            await healthy(prometheus, 3)

            # Alice's home put back from the earlier copy: her log is rolled back.
            alice.stop()
            alice.put_home_back(earlier)
            alice.start()
            assert alice.send(bob, "from the past").startswith("delivered ")
            roles: dict[str, str] = {}
            deadline = time.monotonic() + 60
            while len(roles) < 2 and time.monotonic() < deadline:
                equivocations = await prometheus.until_firing("AuditEquivocation")
                roles = {a["labels"]["role"]: a["labels"]["instance"] for a in equivocations}
                await asyncio.sleep(0.5)  # until both sides fire
            assert roles == {"witness": targets[1], "origin": targets[0]}  # bob saw it, and alice

            # The anchoring wallet's key used elsewhere: a root the log never had.
            def final() -> bool:
                return '"final"' in cli(anchoring, "audit", "anchors", "--json")

            wait_until(final, 30.0, what="a final anchor")
            wallet = load_wallet(key_file, lambda: None).address
            forged = "0x" + anchor_calldata(log_id(f"{anchoring_id}/audit"), 1, b"\x66" * 32).hex()
            anvil.rpc("eth_sendTransaction", [{"from": wallet, "to": contract, "data": forged}])
            (mismatch,) = await prometheus.until_firing("AuditAnchorMismatch")
            assert mismatch["labels"]["instance"] == f"127.0.0.1:{anchoring_metrics}"
    finally:
        if prometheus is not None:
            prometheus.stop()
        registry.stop()
        anvil.stop()
    print(f"equivocation and anchor mismatch alerts: {time.monotonic() - started:.1f} s")  # noqa: T201
