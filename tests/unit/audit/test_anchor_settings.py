"""anchor={...} of TalosClient.create: every mistake is a ConfigurationError naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.audit.anchoring.settings import DEFAULT_INTERVAL, AnchorSettings
from talos.errors import ConfigurationError

GOOD = {"rpc": "http://127.0.0.1:8545", "contract": "0x" + "ab" * 20, "key_file": "k.hex"}


def test_defaults_and_none() -> None:
    assert AnchorSettings.from_mapping(None) is None
    settings = AnchorSettings.from_mapping(GOOD)
    assert settings is not None
    assert settings.interval == DEFAULT_INTERVAL
    assert settings.confirmations is None  # the chain's finalized block
    assert settings.poll == 15.0
    assert settings.key_file == Path("k.hex")
    short = AnchorSettings.from_mapping({**GOOD, "interval": 2, "confirmations": 3})
    assert short is not None
    assert (short.interval, short.poll, short.confirmations) == (2.0, 2.0, 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rpc": "ws://x"}, "rpc"),
        ({"contract": "0x1234"}, "contract"),
        ({"interval": 0}, "interval"),
        ({"interval": True}, "interval"),
        ({"confirmations": 0}, "confirmations"),
        ({"confirmations": 1.5}, "confirmations"),
        ({"poll": 30, "interval": 10}, "poll"),
        ({"colour": "red"}, "unknown"),
        ({"passphrase": b"bytes"}, "passphrase"),
    ],
)
def test_bad_settings(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        AnchorSettings.from_mapping({**GOOD, **change})


def test_missing_keys() -> None:
    with pytest.raises(ConfigurationError, match="key_file"):
        AnchorSettings.from_mapping({"rpc": GOOD["rpc"], "contract": GOOD["contract"]})
