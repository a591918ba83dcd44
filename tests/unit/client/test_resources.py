"""What a client holds from its construction on, before and after close."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.client.config import ClientConfig
from talos.client.resources import Resources
from talos.testing import FakeClock, SeededRng


def _config(home: Path) -> ClientConfig:
    return ClientConfig.from_options(
        "alice",
        home=home,
        registry_url=None,
        listen="127.0.0.1:0",
        announce=None,
        discovery=("registry",),
        dht_bootstrap=None,
        dht_port=0,
        offline_mode=True,
        queue_limit=10,
        reconnect_interval=30.0,
        replay_window=3600.0,
        revocation_mode="strict",
        revocation_max_age=300.0,
        audit_config=None,
        metrics_port=None,
        accept_policy="capability",
        passphrase=None,
        clock=FakeClock(),
        rng=SeededRng(1),
    )


@pytest.mark.asyncio
async def test_before_opening_nothing_is_reachable_and_closing_is_once(tmp_path: Path) -> None:
    resources = Resources(_config(tmp_path / "home"))
    assert len(resources.instance) == 16
    assert resources.home.path == tmp_path / "home"
    assert not resources.closed()
    assert resources.dht_address is None
    assert resources.registry_reachable is None
    await resources.close()
    assert resources.closed()
    await resources.close()  # closing twice does nothing
    assert resources.closed()
    assert not (tmp_path / "home").exists()  # nothing was opened, so nothing was made
