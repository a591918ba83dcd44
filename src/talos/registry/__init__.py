"""The Talos registry server: key logs, prekeys, peer records and revocation lists over HTTP.

Run it with ``talos registry serve``; build the application with
:func:`~talos.registry.app.create_app`. See ``docs/design/registry.md``.
"""

from __future__ import annotations

from talos.registry.app import create_app
from talos.registry.store import RegistryStore

__all__ = ["RegistryStore", "create_app"]
