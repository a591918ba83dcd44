"""Shared fixtures: fake time and seeded randomness only; everything else is real."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.testing import FakeClock, SeededRng
from talos.testing.chain import AnvilProcess, start_anvil
from talos.testing.postgres import PostgresCluster, find_binaries

#: Test vectors live beside the checkout, never inside it.
VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"

#: The bytecode cache this process made for the processes the tests start (None: not ours).
_BYTECODE: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Let the Talos processes the tests start reuse compiled bytecode.

    Under ``PYTHONDONTWRITEBYTECODE`` (set where checkouts are kept free of
    ``__pycache__``) every ``talos`` command, agent and registry a test starts
    compiles all of ``src/talos`` again: about 0.2 s of a core each, thousands
    of times a run. The children write and read their bytecode in one
    throwaway directory instead (``PYTHONPYCACHEPREFIX``), never in the
    checkout; what they run is unchanged. The first process (the xdist
    controller) makes the directory, its workers inherit it, and it is
    removed at the end.
    """
    global _BYTECODE
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    _BYTECODE = Path(tempfile.mkdtemp(prefix="talos-tests-pycache-"))
    os.environ["PYTHONPYCACHEPREFIX"] = str(_BYTECODE)
    del os.environ["PYTHONDONTWRITEBYTECODE"]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _BYTECODE is not None:
        shutil.rmtree(_BYTECODE, ignore_errors=True)


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
