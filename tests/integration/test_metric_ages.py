"""Ages computed at scrape time: they keep growing during the outage they are about.

Real agents, a real registry process, real LMDB; only time is faked
(``FakeClock``), so the outage lasts as long as the test says.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.client import TalosClient
from talos.core.capability import Capability, delegate
from talos.storage.home import AgentHome
from talos.system import SYSTEM_RNG
from talos.testing import FakeClock
from talos.testing.cli import TalosCli
from talos.testing.processes import registry_process

pytestmark = pytest.mark.asyncio

AGE = "talos_revocation_list_age_seconds"


def cli(home: Path | None, *args: str) -> str:
    return TalosCli().ok(home, *args).strip()


def scrape(client: TalosClient, name: str) -> float:
    """One scrape of ``client``'s /metrics text: the value of the unlabelled ``name``."""
    for family in text_string_to_metric_families(client.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"no series {name}")


def delegated(tmp_path: Path, now: float) -> tuple[dict[str, Path], dict[str, str]]:
    """Bob grants Carol a delegable token; Carol delegates it to Alice (who holds it)."""
    homes = {name: tmp_path / name for name in ("alice", "bob", "carol")}
    ids = {name: cli(home, "init", "--name", name) for name, home in homes.items()}
    logs = {name: tmp_path / f"{name}.log" for name in homes}
    for name, home in homes.items():
        cli(home, "whoami", "--export-log", str(logs[name]))
    root = cli(homes["bob"], "capabilities", "grant", "--to", ids["carol"],
               "--action", "message.send", "--expires-in", "2h", "--delegable")  # fmt: skip
    cli(homes["carol"], "capabilities", "add", root, "--issuer-log", str(logs["bob"]))
    carol = AgentHome(homes["carol"]).load_identity(passphrase=None)
    child = delegate(Capability.from_text(root), carol.signing_key, key_sequence=0,
                     subject=ids["alice"], now=now, rng=SYSTEM_RNG)  # fmt: skip
    cli(homes["alice"], "capabilities", "add", child.to_text(),
        "--issuer-log", str(logs["bob"]), "--issuer-log", str(logs["carol"]))  # fmt: skip
    return homes, ids


async def test_revocation_list_age_grows_while_the_registry_is_down(tmp_path: Path) -> None:
    clock = FakeClock(start=time.time())
    homes, ids = delegated(tmp_path, clock.time())
    with registry_process(tmp_path / "registry") as registry:
        url = registry.url
        async with (
            TalosClient.create(
                "bob", home=homes["bob"], registry_url=url, clock=clock, revocation_max_age=60
            ) as bob,  # fmt: skip
            TalosClient.create("alice", home=homes["alice"], registry_url=url, clock=clock) as a,
            TalosClient.create("carol", home=homes["carol"], registry_url=url, clock=clock),
        ):
            # Bob syncs Carol's list from the registry to accept Alice's delegated token.
            assert (await a.send(ids["bob"], "delegated", timeout=10)).status == "delivered"
            assert scrape(bob, AGE) == 0.0
            registry.stop()
            clock.advance(61)
            # Carol's list is due; the registry does not answer: the message waits
            # (stale in strict mode). Bob's retries wait on the fake clock: move it.
            sending = asyncio.ensure_future(a.send(ids["bob"], "while down", timeout=10))
            for _ in range(600):
                if sending.done():
                    break
                clock.advance(0.5)
                await asyncio.sleep(0.01)  # let the agents run on the moved clock
            assert (await sending).status == "queued"
            first = scrape(bob, AGE)
            assert first >= 61
            clock.advance(100)
            assert scrape(bob, AGE) == first + 100  # no refresh, no event: the scrape computes it
