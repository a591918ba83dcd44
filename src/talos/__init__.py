"""Talos: secure messaging for software agents.

``talos.TalosClient`` is the public entry point of an agent; it (and what
its calls return) is imported lazily so that the command line does not pay
for the network stack. The errors an application catches are here too, all
under :class:`TalosError` (:mod:`talos.errors` draws the whole tree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from talos import errors
from talos.errors import (
    AgentAlreadyRunning,
    CannotCancel,
    CapabilityDenied,
    ConfigurationError,
    DeliveryError,
    DeliveryTimeout,
    DiscoveryError,
    IdentityNotFound,
    InvalidArgument,
    LocalProtocolError,
    MessageCancelled,
    MessageExpired,
    MessageNotFound,
    PeerNotFound,
    PeerRejected,
    PeerUnknown,
    PeerUnreachable,
    QueueFull,
    RegistryUnavailable,
    ReplyTimeout,
    RequestExpired,
    SessionError,
    StateLost,
    StorageError,
    TalosError,
    WrongPassphrase,
)

if TYPE_CHECKING:
    from talos.client import (
        CapabilityInfo,
        MessageOutcome,
        QueuedEntry,
        RevokedToken,
        SendResult,
        TalosClient,
    )
    from talos.core.message import Message

__all__ = [
    "AgentAlreadyRunning",
    "CannotCancel",
    "CapabilityDenied",
    "CapabilityInfo",
    "ConfigurationError",
    "DeliveryError",
    "DeliveryTimeout",
    "DiscoveryError",
    "IdentityNotFound",
    "InvalidArgument",
    "LocalProtocolError",
    "Message",
    "MessageCancelled",
    "MessageExpired",
    "MessageNotFound",
    "MessageOutcome",
    "PeerNotFound",
    "PeerRejected",
    "PeerUnknown",
    "PeerUnreachable",
    "QueueFull",
    "QueuedEntry",
    "RegistryUnavailable",
    "ReplyTimeout",
    "RequestExpired",
    "RevokedToken",
    "SendResult",
    "SessionError",
    "StateLost",
    "StorageError",
    "TalosClient",
    "TalosError",
    "WrongPassphrase",
    "errors",
]

__version__ = "0.1.0"

_LAZY = {
    "TalosClient": ("talos.client", "TalosClient"),
    "SendResult": ("talos.client", "SendResult"),
    "MessageOutcome": ("talos.client", "MessageOutcome"),
    "QueuedEntry": ("talos.client", "QueuedEntry"),
    "CapabilityInfo": ("talos.client", "CapabilityInfo"),
    "RevokedToken": ("talos.client", "RevokedToken"),
    "Message": ("talos.core.message", "Message"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'talos' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
