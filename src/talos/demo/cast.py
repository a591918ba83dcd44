"""The demo's processes: the registry and the agents, started, restarted and stopped.

Every process is started through :class:`talos.testing.processes.Launcher`,
which remembers it, so that the demo can stop all of them (SIGTERM, then
SIGKILL as the last resort) on success, failure or interruption, and list
their pids. Children share the demo's process group, as a shell's would:
Ctrl-C in the terminal reaches them too.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from talos.core.crypto import VerifyKey
from talos.core.keylog import KeyLog
from talos.demo import STOP_WAIT, WAIT, DemoFailure
from talos.demo.narration import Narrator
from talos.testing.child import ChildFailed, ChildProcess, stop_all
from talos.testing.processes import (
    AgentProcess,
    Launcher,
    RegistryProcess,
    free_port,
    start_registry,
)


@dataclass
class Agent:
    """One agent: its home, its ports and its current ``talos run`` process."""

    name: str
    home: Path
    metrics_port: int = 0
    port: int = 0
    agent_id: str = ""
    process: AgentProcess | None = None
    runs: int = 0

    @property
    def child(self) -> ChildProcess | None:
        return self.process.child if self.process is not None else None

    @property
    def keylog_file(self) -> Path:
        return self.home.parent / f"{self.name}.keylog"

    def verify_key(self) -> VerifyKey:
        """This agent's current public signing key, from its exported key log."""
        return KeyLog.from_bytes(self.keylog_file.read_bytes()).state.signing_key

    def scrape(self) -> dict[str, float]:
        """Every sample on this agent's ``/metrics``, by name (and labels); a labelled
        series also by its bare name, the sum over its labels.

        Raises:
            DemoFailure: the endpoint does not answer.
        """
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError as exc:
            raise DemoFailure(f"{self.name}'s metrics at {url} do not answer: {exc}") from exc
        values: dict[str, float] = {}
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
                if labels:
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
        # A labelled series also by its bare name, summed over its labels (e.g.
        # talos_signature_failures_total, labelled by reason).
        return {**sums, **values}

    def metric(self, name: str) -> float:
        return self.scrape().get(name, math.nan)


@dataclass
class Cast:
    """The registry and the agents of the demo in ``root``, as processes."""

    root: Path
    narrator: Narrator
    launcher: Launcher = field(default_factory=lambda: Launcher(new_session=False))
    registry: RegistryProcess | None = None

    @property
    def children(self) -> list[ChildProcess]:
        """Every process started so far, restarts included, in order."""
        return self.launcher.started

    @property
    def registry_url(self) -> str:
        return self.registry.url if self.registry is not None else ""

    def start_registry(self) -> None:
        log = self.root / "logs" / "registry.log"
        try:
            self.registry = self.launcher.registry(self.root / "registry.db", log)
        except ChildFailed as exc:
            raise self.narrator.fail(f"the registry did not start: {exc}") from exc
        pid = self.registry.process.pid
        self.narrator.say(f"  registry (pid {pid}) serving {self.registry.url}")

    def restart_registry(self) -> None:
        """Start the registry again on its old port and database (the agents know its URL)."""
        assert self.registry is not None  # noqa: S101 -- started in the setup
        log = self.root / "logs" / "registry-2.log"
        try:
            self.registry = start_registry(
                self.registry.db, log, port=self.registry.port, env=self.launcher.env
            )
        except ChildFailed as exc:
            raise self.narrator.fail(f"the registry did not start again: {exc}") from exc
        self.launcher.started.append(self.registry.child)
        pid = self.registry.process.pid
        self.narrator.say(f"  registry (pid {pid}) serving {self.registry.url} again")

    def launch(self, agent: Agent, port: int, *extra: str) -> None:
        """Start ``talos run`` for ``agent`` on ``port`` (and ``extra`` options); see
        :meth:`await_ready`."""
        agent.runs += 1
        agent.metrics_port = agent.metrics_port or free_port()  # kept across restarts
        label = f"{agent.name}-{agent.runs}"
        agent.process = self.launcher.agent(
            agent.home,
            "--registry", self.registry_url,
            "--listen", f"127.0.0.1:{port}",
            "--metrics-port", str(agent.metrics_port),
            "--reconnect-interval", "1",
            *extra,
            ready=False,
            log=self.root / "logs" / f"{label}.log",
            name=label,
        )  # fmt: skip

    def await_ready(self, agent: Agent) -> None:
        """Wait for the agent's ``listening on`` line."""
        process = agent.process
        assert process is not None  # noqa: S101 -- launched first
        try:
            process.wait_ready(WAIT)
        except ChildFailed as exc:
            raise self.narrator.fail(f"{agent.name} did not start: {exc}") from exc
        agent.agent_id, agent.port = process.agent_id, process.port
        self.narrator.say(
            f"  {agent.name} (pid {process.process.pid}) listening on {process.endpoint}, "
            f"metrics on :{agent.metrics_port}"
        )

    def start(self, agent: Agent, port: int = 0, *extra: str) -> None:
        self.launch(agent, port, *extra)
        self.await_ready(agent)

    def stop(self, child: ChildProcess | None) -> None:
        """SIGTERM one process and wait for it; it must exit cleanly."""
        assert child is not None  # noqa: S101 -- only running processes are stopped
        if stop_all([child], STOP_WAIT):
            raise self.narrator.fail(f"{child.name} ignored SIGTERM and was killed")
        if not clean_exit(child):
            raise self.narrator.fail(f"{child.name} exited {child.returncode}:\n{child.log_tail()}")
        self.narrator.say(
            f"  {child.name.split('-')[0]} (pid {child.pid}) stopped: {exit_text(child)}"
        )

    def stop_registry(self) -> None:
        self.stop(self.registry.child if self.registry is not None else None)

    def stop_everything(self) -> tuple[list[ChildProcess], list[ChildProcess]]:
        """SIGTERM every process still running; (those that were running, those killed)."""
        running = [child for child in self.children if child.running]
        return running, stop_all(running, STOP_WAIT)


def clean_exit(child: ChildProcess) -> bool:
    """Exit status 0; or, for the registry, death by the SIGTERM after a complete shutdown.

    ``talos registry serve`` runs uvicorn, which re-raises the signal it stopped
    on once the application has shut down: the status is then -SIGTERM.
    """
    code = child.returncode
    if code == 0:
        return True
    shut_down = "Application shutdown complete" in child.log_tail(5)
    return child.name == "registry" and code == -signal.SIGTERM and shut_down


def exit_text(child: ChildProcess) -> str:
    code = child.returncode
    if code is not None and code < 0:
        return f"ended by {signal.Signals(-code).name} after a clean shutdown"
    return f"exit status {code}"
