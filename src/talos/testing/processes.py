"""Talos as real processes on loopback: a registry server and ``talos run`` agents.

Tests in Talos (and in applications built on it) talk to a real registry and
real agents, never fakes. This module starts ``talos registry serve`` and
``talos run`` as child processes (:mod:`talos.testing.child`), waits until
each is ready, and stops them:

* :func:`start_registry` / :func:`registry_process`: a registry on a free port,
  ready once ``/v1/time`` answers;
* :func:`start_agent`: an agent, ready once it prints
  ``agent <id> listening on <endpoint>``;
* :class:`Launcher` (and :func:`launched`): starts any number of both with one
  environment and stops every one of them at the end, in parallel.
"""

from __future__ import annotations

import re
import secrets
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from talos.testing.child import STOP_WAIT, ChildFailed, ChildProcess, spawn, stop_all
from talos.testing.cli import clean_env, talos_argv
from talos.testing.waiting import wait_until

__all__ = [
    "AgentProcess",
    "Launcher",
    "RegistryProcess",
    "free_port",
    "launched",
    "registry_process",
    "start_agent",
    "start_registry",
]

#: The line ``talos run`` prints on stdout once it listens.
READY = re.compile(r"agent (\S+) listening on (\S+)")
#: Where ``talos registry serve --metrics-port`` says it serves metrics (in its log).
_REGISTRY_METRICS = re.compile(r"metrics on (http://127\.0\.0\.1:\d+)/metrics")


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """A TCP (or UDP) port that was free a moment ago on ``host``.

    Chosen at random below the kernel's ephemeral range, never twice in this
    process: a port bound later (a test picks it, a process binds it seconds
    after) is then not taken meanwhile by an outgoing connection or by anything
    that binds port 0, which draw from the ephemeral range. A free UDP port also
    serves as the address of a peer that never answers.
    """
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    low = _ephemeral_low()
    first = max(1024, low - _FIXED_SPAN)
    for _ in range(256):
        port = first + secrets.randbelow(low - first)
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, kind) as probe:
                probe.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, kind) as probe:  # no luck: any free port
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


#: How many ports below the ephemeral range :func:`free_port` draws from.
_FIXED_SPAN = 12_000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return max(2048, int(ranges.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


# -- the registry ----------------------------------------------------------------------------


@dataclass
class RegistryProcess:
    """A running ``talos registry serve``."""

    child: ChildProcess
    url: str
    db: Path | str
    port: int
    #: The metrics endpoint's base URL, when started with ``--metrics-port``.
    metrics_url: str | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.process

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (then kill) the server and wait for it."""
        stop_all([self.child], timeout)

    def answers(self) -> bool:
        """Whether ``/v1/time`` answers 200 now.

        Raises:
            ChildFailed: the server has exited.
        """
        if not self.child.running:
            raise ChildFailed(f"registry exited early:\n{self.child.log_text()}")
        try:
            return httpx.get(f"{self.url}/v1/time", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


def start_registry(
    db: Path | str,
    log: Path,
    *,
    port: int | None = None,
    ready: float = 20.0,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> RegistryProcess:
    """Start the server (with ``extra`` options) and wait until ``/v1/time`` answers.

    With ``--metrics-port`` among ``extra``, :attr:`RegistryProcess.metrics_url`
    is read from the server's log.

    Raises:
        ChildFailed: it exited or did not answer within ``ready`` seconds.
    """
    port = free_port() if port is None else port
    argv = talos_argv("registry", "serve", "--host", "127.0.0.1", "--port", str(port))
    child = spawn(
        [*argv, "--db", str(db), *extra],
        env=clean_env() if env is None else env,
        log=log,
        name="registry",
        stdout_pipe=False,
    )
    server = RegistryProcess(child, f"http://127.0.0.1:{port}", db, port)
    try:
        wait_until(server.answers, ready, what="registry ready")
    except TimeoutError:
        server.stop()
        raise ChildFailed(f"registry not ready after {ready} s:\n{child.log_text()}") from None
    if "--metrics-port" in extra:
        found = _REGISTRY_METRICS.search(child.log_text())
        if found is None:
            server.stop()
            raise ChildFailed(f"registry did not say where its metrics are:\n{child.log_text()}")
        server.metrics_url = found.group(1)
    return server


@contextmanager
def registry_process(directory: Path) -> Iterator[RegistryProcess]:
    """A registry with its database and log in ``directory``, stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    server = start_registry(directory / "registry.db", directory / "registry.log")
    try:
        yield server
    finally:
        server.stop()


# -- agents ----------------------------------------------------------------------------------


@dataclass
class AgentProcess:
    """A ``talos run`` child process; :meth:`wait_ready` fills in its id and endpoint."""

    child: ChildProcess
    home: Path
    agent_id: str = ""
    endpoint: str = ""

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.process

    @property
    def log(self) -> Path:
        return self.child.log

    @property
    def port(self) -> int:
        """The port the agent listens on (after :meth:`wait_ready`)."""
        return int(self.endpoint.rsplit(":", 1)[1])

    def wait_ready(self, timeout: float = 30.0) -> AgentProcess:
        """Wait for the ``agent <id> listening on <endpoint>`` line.

        Raises:
            ChildFailed: the line did not come (the agent exited, or is stuck).
        """
        match = self.child.wait_for_line(READY, timeout)
        self.agent_id, self.endpoint = match.group(1), match.group(2)
        return self

    def read_line(self, timeout: float = 30.0) -> str:
        """The agent's next stdout line (``""`` if none came in time)."""
        return self.child.read_line(timeout)

    def stop(self, timeout: float = STOP_WAIT) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit status."""
        return self.child.stop(timeout)


def start_agent(
    home: Path,
    *args: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    new_session: bool = True,
    name: str | None = None,
) -> AgentProcess:
    """Start ``talos --home HOME run ARGS`` (behind ``prefix``, e.g. a shifted clock's).

    Returns at once; call :meth:`AgentProcess.wait_ready`. With
    ``new_session`` the agent (and its wrapper) lead a process group of their own.
    """
    child = spawn(
        [*prefix, *talos_argv("--home", str(home), "run", *args)],
        env=clean_env() if env is None else env,
        log=log,
        name=name or home.name,
        new_session=new_session,
    )
    return AgentProcess(child, home)


# -- many at once ----------------------------------------------------------------------------


@dataclass
class Launcher:
    """Starts registries and agents with one environment; remembers each one.

    ``env`` is the whole environment of every process (default: :func:`clean_env`).
    """

    env: Mapping[str, str] | None = None
    #: Agents get a process group of their own (see :func:`start_agent`).
    new_session: bool = True
    started: list[ChildProcess] = field(default_factory=list)

    def agent(
        self,
        home: Path,
        *args: str,
        ready: bool = True,
        prefix: Sequence[str] = (),
        log: Path | None = None,
        name: str | None = None,
    ) -> AgentProcess:
        """``talos --home HOME run ARGS``, waited for unless ``ready`` is false.

        The log defaults to ``HOME-N.log`` beside the home (N counts the
        processes this launcher started).
        """
        log = log or home.parent / f"{home.name}-{len(self.started)}.log"
        agent = start_agent(
            home,
            *args,
            log=log,
            env=self.env,
            prefix=prefix,
            new_session=self.new_session,
            name=name,
        )
        self.started.append(agent.child)
        return agent.wait_ready() if ready else agent

    def registry(self, db: Path, log: Path, *, extra: Sequence[str] = ()) -> RegistryProcess:
        """``talos registry serve`` on a free port, ready (see :func:`start_registry`)."""
        server = start_registry(db, log, extra=extra, env=self.env)
        self.started.append(server.child)
        return server

    def stop_all(self, timeout: float = STOP_WAIT) -> list[ChildProcess]:
        """Stop every process still running, in parallel; the ones that had to be killed."""
        running = [child for child in self.started if child.running]
        killed = stop_all(running, timeout)
        for child in self.started:
            if child.process.stdout is not None:
                child.process.stdout.close()
        return killed


@contextmanager
def launched(env: Mapping[str, str] | None = None) -> Iterator[Launcher]:
    """A :class:`Launcher` whose every process is stopped on exit."""
    launcher = Launcher(env)
    try:
        yield launcher
    finally:
        launcher.stop_all()
