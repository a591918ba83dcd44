"""Talos: secure messaging for software agents.

``talos.TalosClient`` is the public entry point of an agent; it is imported
lazily so that the command line does not pay for the network stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from talos import errors
from talos.errors import TalosError

if TYPE_CHECKING:
    from talos.client import SendResult, TalosClient
    from talos.core.message import Message

__all__ = ["Message", "SendResult", "TalosClient", "TalosError", "errors"]

__version__ = "0.1.0"

_LAZY = {
    "TalosClient": ("talos.client", "TalosClient"),
    "SendResult": ("talos.client", "SendResult"),
    "Message": ("talos.core.message", "Message"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'talos' has no attribute {name!r}")
