"""Introductions without a registry: contact cards, and bundles in offline mode."""

from __future__ import annotations

import pytest

from talos.client.contacts import require_bundle
from talos.errors import PeerNotFound

PEER = "did:talos:zPeer"


def test_offline_mode_needs_the_peers_bundle() -> None:
    with pytest.raises(PeerNotFound, match=r"offline_mode: no prekey bundle .*get_prekey_bundle"):
        require_bundle(PEER, None, offline=True)


def test_a_bundle_is_fetched_when_not_offline() -> None:
    assert require_bundle(PEER, None, offline=False) is None
