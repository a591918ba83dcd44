"""The Talos registry server: key logs, prekeys, peer records and revocation lists over HTTP.

Run it with ``talos registry serve``; build the application with
:func:`~talos.registry.app.create_app`. See ``docs/design/registry.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from talos.registry.store import RegistryStore

if TYPE_CHECKING:
    from talos.registry.app import create_app

__all__ = ["RegistryStore", "create_app"]


def __getattr__(name: str) -> Any:
    # The web stack is imported only when the application is built.
    if name == "create_app":
        from talos.registry.app import create_app

        return create_app
    raise AttributeError(f"module 'talos.registry' has no attribute {name!r}")
