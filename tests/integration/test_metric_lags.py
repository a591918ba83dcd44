"""Lags computed at scrape time: they grow during the outage they are about.

A real agent (real LMDB, its real ``/metrics`` endpoint over HTTP) mirrors its
audit log to a peer that does not answer and anchors it through an RPC
endpoint where nothing listens. Its clock is a ``FakeClock`` that the test
never moves, so the mirroring and anchoring loops, once failed, wait in their
backoff for good: whatever the lags show afterwards was read at the scrape.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.client import TalosClient
from talos.testing import FakeClock
from talos.testing.chain import DEV_KEYS
from talos.testing.cli import TalosCli
from talos.testing.processes import free_port

pytestmark = pytest.mark.asyncio

MIRROR_LAG = "talos_audit_mirror_lag_entries"
ANCHOR_LAG = "talos_audit_anchor_lag_entries"
ATTEMPTS = "talos_audit_anchor_attempts_total"
#: Any well-formed contract address: the RPC endpoint never answers.
CONTRACT = "0x" + "ab" * 20


async def scrape(client: TalosClient, name: str, **labels: str) -> float:
    """``name{labels}`` from one HTTP scrape of ``client``'s /metrics."""
    host, port = client.metrics.address or ("", 0)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{host}:{port}/metrics", timeout=5)).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no series {name}{labels}")


async def test_mirror_and_anchor_lags_grow_between_the_loops_steps(tmp_path: Path) -> None:
    peer = TalosCli().ok(tmp_path / "peer", "init", "--name", "peer").strip()  # never started
    key_file = tmp_path / "wallet.hex"
    key_file.write_text(DEV_KEYS[2])
    clock = FakeClock(start=time.time())
    async with TalosClient.create(
        "alice",
        home=tmp_path / "alice",
        offline_mode=True,
        clock=clock,
        metrics_port=0,
        audit_config={"mirror_to": [peer]},
        anchor={"rpc": f"http://127.0.0.1:{free_port()}", "contract": CONTRACT,
                "key_file": str(key_file), "interval": 1},
    ) as alice:  # fmt: skip
        # The mirroring loop sleeps on the fake clock: it never steps again. The
        # anchoring loop retries on real time (1-2 s at first): a round counts only
        # if no anchoring attempt fell between its two scrapes.
        for _ in range(5):
            attempts = await scrape(alice, ATTEMPTS)
            mirror_before = await scrape(alice, MIRROR_LAG, mirror=peer)
            anchor_before = await scrape(alice, ANCHOR_LAG)
            for _ in range(3):  # three CAPABILITY_GRANTED entries, behind the loops' backs
                await alice.grant(peer, expires_in=3600)
            mirror_after = await scrape(alice, MIRROR_LAG, mirror=peer)
            anchor_after = await scrape(alice, ANCHOR_LAG)
            if await scrape(alice, ATTEMPTS) == attempts:
                break
        else:
            raise AssertionError("an anchoring attempt fell inside every round")
        assert mirror_after >= mirror_before + 3
        assert anchor_after >= anchor_before + 3
