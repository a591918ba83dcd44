"""Fixtures for the registry: a real SQLite store and the real app over an ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from registry_fixtures import Agent, Served, make_agent

from talos.registry import RegistryStore, create_app
from talos.testing import FakeClock


@pytest.fixture
def alice(clock: FakeClock) -> Agent:
    return make_agent("alice", 11, clock)


@pytest.fixture
def bob(clock: FakeClock) -> Agent:
    return make_agent("bob", 12, clock)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a registry keeps its state: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return tmp_path / "registry.db"


@pytest.fixture
def store(database: Path | str) -> Iterator[RegistryStore]:
    """A registry store on each backend in turn."""
    with RegistryStore.open(database) as opened:
        yield opened


@pytest_asyncio.fixture
async def served(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Served]:
    app = create_app(tmp_path / "registry.db", clock=clock, openapi=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            yield Served(app, http, transport)
