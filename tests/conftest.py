"""Shared fixtures: fake time and seeded randomness only; everything else is real."""

from __future__ import annotations

from pathlib import Path

import pytest

from talos.testing import FakeClock, SeededRng

#: Test vectors live beside the checkout, never inside it.
VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rng() -> SeededRng:
    return SeededRng(1)
