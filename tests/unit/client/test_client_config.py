"""TalosClient.create() options, checked once into a frozen ClientConfig."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from talos.client.config import ClientConfig, parse_announce, parse_listen
from talos.errors import ConfigurationError
from talos.testing import FakeClock, SeededRng


def _options(**changes: object) -> dict[str, object]:
    options: dict[str, object] = {
        "home": Path("/nonexistent/home"),
        "registry_url": None,
        "listen": "127.0.0.1:0",
        "announce": None,
        "discovery": ("registry",),
        "dht_bootstrap": None,
        "dht_port": 0,
        "offline_mode": False,
        "queue_limit": 10,
        "reconnect_interval": 30.0,
        "replay_window": 3600.0,
        "revocation_mode": "strict",
        "revocation_max_age": 300.0,
        "audit_config": None,
        "metrics_port": None,
        "accept_policy": "capability",
        "passphrase": None,
        "clock": FakeClock(),
        "rng": SeededRng(1),
    }
    options.update(changes)
    return options


def test_a_valid_configuration_is_frozen() -> None:
    config = ClientConfig.from_options("alice", **_options())  # type: ignore[arg-type]
    assert config.listen == ("127.0.0.1", 0)
    assert config.registry_url is None
    with pytest.raises(AttributeError):
        config.queue_limit = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"accept_policy": "anyone"}, "accept_policy"),
        ({"queue_limit": 0}, "queue_limit"),
        ({"revocation_mode": "lax"}, "revocation_mode"),
        ({"discovery": ("registry", "carrier-pigeon")}, "discovery"),
        ({"listen": "nowhere"}, "listen"),
        ({"listen": "0.0.0.0:0"}, "announce"),
        ({"registry_url": []}, "registry_url"),
        ({"registry_url": ["http://r:1", "http://r:1/"]}, "registry_url"),
        ({"registry_url": ["http://r:1", "ws://r:2"]}, "registry URL"),
    ],
)
def test_each_bad_option_is_named(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ClientConfig.from_options("alice", **_options(**change))  # type: ignore[arg-type]


def test_one_registry_url_or_several() -> None:
    one = ClientConfig.from_options("a", **_options(registry_url="http://r1:8000/"))  # type: ignore[arg-type]
    assert one.registry_urls == ("http://r1:8000",)
    assert one.registry_url == "http://r1:8000"
    urls = ["http://r1:8000", "https://user:pw@r2:8443"]
    several = ClientConfig.from_options("a", **_options(registry_url=urls))  # type: ignore[arg-type]
    assert several.registry_urls == tuple(urls)  # credentials kept to connect with
    assert several.registry_url == "http://r1:8000"
    no_registry = _options(registry_url=urls, discovery=("dht",))
    assert ClientConfig.from_options("a", **no_registry).registry_urls == ()  # type: ignore[arg-type]


@pytest.mark.parametrize("port", ["\u00b2", "\u0663", "65536", "-1", ""])
def test_ports_are_ascii_digits_in_range(port: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_listen(f"127.0.0.1:{port}")
    if port:
        with pytest.raises(ConfigurationError):
            parse_announce(f"example.net:{port}", "127.0.0.1")


def test_announce_defaults_to_the_listening_port() -> None:
    assert parse_announce("example.net", "127.0.0.1") == ("example.net", None)
    assert parse_announce("[::1]:7000", "127.0.0.1") == ("::1", 7000)


def test_revocation_grace_is_the_policys_grace_and_defaults_to_an_hour() -> None:
    default = ClientConfig.from_options("alice", **_options())  # type: ignore[arg-type]
    assert default.revocation_policy.grace == 3600.0
    given = ClientConfig.from_options("alice", **_options(revocation_grace=60))  # type: ignore[arg-type]
    assert given.revocation_policy.grace == 60


@pytest.mark.parametrize("grace", [-1, True, "60", math.nan])
def test_a_bad_revocation_grace_is_refused(grace: object) -> None:
    with pytest.raises(ConfigurationError, match="revocation_grace"):
        ClientConfig.from_options("alice", **_options(revocation_grace=grace))  # type: ignore[arg-type]
