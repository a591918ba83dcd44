"""What ``import talos`` offers: every name in ``talos.__all__`` resolves (the client's
classes lazily), including what the capability calls return."""

from __future__ import annotations

import subprocess
import sys

import talos
from talos.client import CapabilityInfo, RevokedToken
from talos.core.message import Message
from talos.errors import ReplyTimeout, RequestExpired


def test_every_exported_name_resolves() -> None:
    for name in talos.__all__:
        assert getattr(talos, name) is not None, name
    assert set(dir(talos)) >= set(talos.__all__)


def test_what_the_capability_calls_return_is_exported() -> None:
    assert {"CapabilityInfo", "RevokedToken", "TalosClient"} <= set(talos.__all__)
    assert talos.CapabilityInfo is CapabilityInfo
    assert talos.RevokedToken is RevokedToken


def test_the_request_reply_errors_are_exported() -> None:
    """What request() and reply() raise is caught as ``talos.ReplyTimeout`` and
    ``talos.RequestExpired``, beside the Message they return and answer."""
    assert {"ReplyTimeout", "RequestExpired", "Message"} <= set(talos.__all__)
    assert talos.ReplyTimeout is ReplyTimeout
    assert talos.RequestExpired is RequestExpired
    assert issubclass(talos.ReplyTimeout, talos.DeliveryError)
    assert callable(talos.Message.reply)
    assert isinstance(talos.Message.is_request, property)
    assert Message.__dataclass_fields__["in_reply_to"].default is None


def test_importing_talos_does_not_load_the_client() -> None:
    """The command line imports talos and pays for the network stack only when it uses it."""
    code = "import sys, talos; print('talos.client' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "False"
