"""Shared fixtures: fake time and seeded randomness only; everything else is real."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.testing import FakeClock, SeededRng
from talos.testing.chain import AnvilProcess, start_anvil
from talos.testing.postgres import PostgresCluster, find_binaries

#: Test vectors live beside the checkout, never inside it.
VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rng() -> SeededRng:
    return SeededRng(1)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster per test process (each xdist worker has its own).

    Without PostgreSQL the tests that need it skip, except in CI (``CI`` set),
    where ``make pytest`` installs it first (.ci/install-postgres.sh): there
    they fail rather than pass unrun.
    """
    if find_binaries() is None:
        message = "PostgreSQL is not installed (initdb missing): run .ci/install-postgres.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with PostgresCluster.started() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty database of the session's cluster."""
    return postgres_cluster.create_database()


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[AnvilProcess]:
    """A real anvil on a random loopback port, stopped after the test."""
    node = start_anvil(tmp_path / "anvil.log")
    try:
        yield node
    finally:
        node.stop()
