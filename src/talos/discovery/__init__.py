"""Finding peers: the registry client and the Kademlia DHT (the local cache is in talos.peers).

Everything discovery returns is verified by the caller's keys or decoded
strictly; the registry and the DHT are trusted for availability only.
"""

from __future__ import annotations

from talos.discovery.dht import DhtEntry, DhtNode, ValidatingStorage, dht_key
from talos.discovery.registry_client import PrekeyStatus, RegistryClient, RegistryRejected

__all__ = [
    "DhtEntry",
    "DhtNode",
    "PrekeyStatus",
    "RegistryClient",
    "RegistryRejected",
    "ValidatingStorage",
    "dht_key",
]
