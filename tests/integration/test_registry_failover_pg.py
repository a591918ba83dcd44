"""Agents given two registry replicas (one PostgreSQL database) fail over when one dies.

Real processes throughout: two ``talos registry serve`` replicas on one
throwaway PostgreSQL cluster, agents (``talos run``) given both URLs
(``--registry`` twice), messages sent with ``talos send``. One replica is
killed with SIGKILL while messages flow; agents that must then fetch key
logs, records and bundles (first contacts) get them from the other replica,
and every message sent arrives.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.testing.cli import TalosCli
from talos.testing.processes import RegistryProcess, free_port, launched, start_registry
from talos.testing.waiting import wait_until


@pytest.fixture
def replicas(postgres_url: str, tmp_path: Path) -> Iterator[list[RegistryProcess]]:
    servers: list[RegistryProcess] = []
    try:
        for n in (1, 2):
            servers.append(start_registry(postgres_url, tmp_path / f"replica{n}.log", ready=30))
        yield servers
    finally:
        for server in servers:
            server.stop()


def gauge(metrics_port: int, name: str) -> dict[str, float]:
    """``name`` by its ``url`` label on an agent's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return {
        s.labels.get("url", ""): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def counter(server: RegistryProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def inbox(cli: TalosCli, home: Path) -> list[str]:
    """Take what the agent's inbox holds (each message is taken once)."""
    return [m["data"] for m in json.loads(cli.ok(home, "inbox", "--json"))]


def test_killing_a_replica_under_load_loses_nothing(
    replicas: list[RegistryProcess], tmp_path: Path
) -> None:
    cli = TalosCli(timeout=60)
    one, two = replicas
    homes = {name: tmp_path / name for name in ("alice", "bob", "carol")}
    ids = {name: cli.ok(home, "init", "--name", name).strip() for name, home in homes.items()}
    both = ("--registry", one.url, "--registry", two.url)
    ports = {name: free_port() for name in homes}
    with launched() as launcher:
        for name, home in homes.items():
            launcher.agent(home, *both, "--accept", "open", "--metrics-port", str(ports[name]))
        # Everyone announced to the first replica; alice and bob have a session.
        assert gauge(ports["alice"], "talos_registry_up") == {one.url: 1.0, two.url: 0.0}
        first = cli.ok(homes["alice"], "send", ids["bob"], "m0", "--timeout", "30").strip()
        assert first.startswith("delivered ")

        # Load: alice keeps sending to bob while the first replica dies.
        sent: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def keep_sending() -> None:
            n = 1
            while not stop.is_set() or n <= 8:
                text = f"m{n}"
                result = cli.run(homes["alice"], "send", ids["bob"], text, "--timeout", "30")
                (sent if result.returncode == 0 else failures).append(text)
                n += 1

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            wait_until(lambda: len(sent) >= 3, timeout=60, what="three messages under load")
            one.child.kill()  # kill -9, no goodbye
            # First contacts after the kill: bundles, key logs, records from the survivor.
            to_bob = cli.ok(homes["carol"], "send", ids["bob"], "from carol", "--timeout", "30")
            to_carol = cli.ok(homes["alice"], "send", ids["carol"], "hi carol", "--timeout", "30")
        finally:
            stop.set()
            sender.join(timeout=300)
        assert to_bob.startswith("delivered "), to_bob
        assert to_carol.startswith("delivered "), to_carol
        assert failures == []
        assert counter(two, "talos_registry_one_time_prekeys_served_total") >= 2

        got: list[str] = []
        expected = sorted(["m0", "from carol", *sent])
        wait_until(
            lambda: got.extend(inbox(cli, homes["bob"])) or len(got) >= len(expected),
            timeout=30,
            what="every message in bob's inbox",
        )
        assert sorted(got) == expected  # every message sent was delivered: none lost, none twice
        assert inbox(cli, homes["carol"]) == ["hi carol"]

        # The gauge per URL: the dead replica down, the survivor up.
        for name in ("alice", "carol"):
            assert gauge(ports[name], "talos_registry_up") == {one.url: 0.0, two.url: 1.0}
        log = (tmp_path / "carol-2.log").read_text()
        assert '"event": "registry_failover"' in log or "registry_failover" in log


@pytest.mark.parametrize(
    ("registries", "message"),
    [
        (["http://r:1", "http://r:1/"], "the same registry URL is given twice"),
        (["http://r:1", "ftp://user:s3cret@r:2"], "must be http(s)://host[:port]"),
    ],
)
def test_talos_run_refuses_a_bad_list_of_registries(
    tmp_path: Path, registries: list[str], message: str
) -> None:
    """No PostgreSQL needed: the list is checked before anything starts."""
    cli = TalosCli(timeout=60)
    cli.ok(tmp_path / "a", "init", "--name", "a")
    args = [arg for url in registries for arg in ("--registry", url)]
    result = cli.run(tmp_path / "a", "run", *args).expect(1)
    assert message in result.stderr
    assert "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_the_registry_variable_takes_several_urls(tmp_path: Path) -> None:
    """``TALOS_REGISTRY_URL`` with URLs separated by spaces is the repeated option."""
    cli = TalosCli(timeout=60)
    cli.ok(tmp_path / "a", "init", "--name", "a")
    both = "http://r:1 http://r:1"
    result = cli.run(tmp_path / "a", "run", extra_env={"TALOS_REGISTRY_URL": both}).expect(1)
    assert "the same registry URL is given twice" in result.stderr
