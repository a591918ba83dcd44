"""Fixtures shared by the integration tests: real processes, shared where that changes nothing.

``registry`` is one real ``talos registry serve`` per test process (each xdist
worker has its own), shared by every module that only registers agents in it
and asks it about them. Starting one takes about a second of a core; the
modules sharing it used to start one each. Agent ids are fresh keys in every
test, so what one module registers is never what another looks up.

A module that counts the registry's state, reads its database, stops it,
starts it with other options or serves its metrics keeps its own fixture
(e.g. test_registry.py, test_registry_ops.py, test_faults.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from talos.testing.processes import RegistryProcess, registry_process


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One registry for this test process, stopped at its end."""
    with registry_process(tmp_path_factory.mktemp("registry")) as server:
        yield server
