"""Fixtures of the storage unit tests: an identity and a home that holds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.core.identity import Identity
from talos.storage.home import AgentHome
from talos.testing import FakeClock, SeededRng


@pytest.fixture
def identity() -> Identity:
    return Identity.create("alice", rng=SeededRng(1), clock=FakeClock())


@pytest.fixture
def home(tmp_path: Path, identity: Identity) -> AgentHome:
    """A home with ``identity`` saved in it (no passphrase)."""
    home = AgentHome(tmp_path / "home")
    home.save_identity(identity, rng=SeededRng(2), passphrase=None)
    return home
