"""Shared fixtures: fake time and seeded randomness only; everything else is real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.testing import FakeClock, SeededRng
from talos.testing.chain import AnvilProcess, start_anvil

#: Test vectors live beside the checkout, never inside it.
VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rng() -> SeededRng:
    return SeededRng(1)


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[AnvilProcess]:
    """A real anvil on a random loopback port, stopped after the test."""
    node = start_anvil(tmp_path / "anvil.log")
    try:
        yield node
    finally:
        node.stop()
