"""Finding peers: the registry client (and, later, the DHT and the local cache).

Everything discovery returns is verified by the caller's keys or decoded
strictly; the registry and the DHT are trusted for availability only.
"""

from __future__ import annotations

from talos.discovery.registry_client import PrekeyStatus, RegistryClient, RegistryRejected

__all__ = ["PrekeyStatus", "RegistryClient", "RegistryRejected"]
