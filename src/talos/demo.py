"""``make demo``: a registry and three agents as real processes, through five failures.

Everything runs on loopback, in a temporary directory, as separate OS
processes started through the ``talos`` command line: a registry (``talos
registry serve``) and three agents, alice, bob and carol (``talos run``, each
serving Prometheus metrics). Bob grants alice and carol a ``message.send``
capability and alice grants bob one (``talos capabilities grant`` / ``add``),
so every message is authorized under the default accept policy. Then, step
by step, narrated, with the metrics each step moves (``/metrics`` scraped
before and after):

1. bob stops (SIGTERM): alice's message is queued, and delivered when bob is back;
2. the registry stops: alice and bob keep talking; carol, a first contact, waits,
   and ``talos status`` shows the registry down;
3. a wiretap on bob's old address copies a genuine frame of alice's; replayed to
   bob byte for byte it is dropped, counted and audited;
4. a frame claiming to be alice's but signed with another key is rejected,
   counted and audited;
5. bob's audit chain verifies, and an inclusion proof of the replay entry is
   written, then checked by an auditor holding only bob's public key log;
6. every process is stopped with SIGTERM, checked gone, and the directory removed.

The same cleanup runs on Ctrl-C, SIGTERM or any failure (SIGKILL as the last
resort). Every wait is bounded and a failure names its step. Stable markers,
for tests and scripts: ``STEP n`` headings, ``ok [n.name]`` checkpoints,
``metric n AGENT SERIES BEFORE -> AFTER`` lines, and at the end
``demo pids: ...`` (every long-running process it started) and
``demo finished in S s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.markup import escape
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, WebSocketException

from talos.core import wire
from talos.core.clock import time_ms
from talos.core.crypto import SigningKey, VerifyKey
from talos.core.keylog import KeyLog
from talos.errors import TalosError
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG
from talos.testing.processes import free_port, start_registry

console = Console(highlight=False, soft_wrap=True)

#: Longest wait for any one condition (an agent ready, a delivery, a counter).
WAIT: Final = 20.0
#: Longest wait for a process to exit after SIGTERM before it gets SIGKILL.
STOP_WAIT: Final = 10.0
_READY = re.compile(r"agent (\S+) listening on (\S+)")
_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
_TOKEN = re.compile(r"tcap1\.[A-Za-z0-9_-]{40,}")
_WS_OPTIONS: Final[dict[str, Any]] = {"compression": None, "max_size": wire.MAX_FRAME_SIZE}


class DemoFailure(Exception):
    """A step did not do what the demo expected; the message names the step."""


# -- processes ------------------------------------------------------------------------------


@dataclass
class Child:
    """A long-running process the demo started (registry or agent)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def _env() -> dict[str, str]:
    """Our environment without TALOS_* (no inherited home, registry or passphrase)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TALOS_")}


def _talos(*args: str) -> list[str]:
    return [sys.executable, "-m", "talos", *args]


def terminate(children: Sequence[Child], timeout: float = STOP_WAIT) -> list[Child]:
    """SIGTERM every child still running, wait; SIGKILL what is left. Returns the killed."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = []
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
            killed.append(child)
    return killed


def still_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` every 50 ms until it holds.

    Raises:
        DemoFailure: it did not hold within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DemoFailure(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


# -- agents ----------------------------------------------------------------------------------


@dataclass
class Agent:
    """One agent: its home, its ports and its current ``talos run`` process."""

    name: str
    home: Path
    metrics_port: int = 0
    port: int = 0
    agent_id: str = ""
    child: Child | None = None
    runs: int = 0

    @property
    def keylog_file(self) -> Path:
        return self.home.parent / f"{self.name}.keylog"

    def verify_key(self) -> VerifyKey:
        """This agent's current public signing key, from its exported key log."""
        return KeyLog.from_bytes(self.keylog_file.read_bytes()).state.signing_key

    def scrape(self) -> dict[str, float]:
        """Every sample on this agent's ``/metrics``, by name (and labels).

        Raises:
            DemoFailure: the endpoint does not answer.
        """
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError as exc:
            raise DemoFailure(f"{self.name}'s metrics at {url} do not answer: {exc}") from exc
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def metric(self, name: str) -> float:
        return self.scrape().get(name, math.nan)


# -- the wiretap -----------------------------------------------------------------------------


class Wiretap:
    """A WebSocket relay on ``port`` to ``upstream`` that keeps a copy of every frame sent.

    It runs its own event loop in a thread. What it sees is exactly what an
    attacker on the network path sees: signed, encrypted envelopes.
    """

    def __init__(self, port: int, upstream: str) -> None:
        self.port = port
        self.upstream = upstream
        #: Frames from the connecting side (alice) to the upstream side (bob), in order.
        self.frames: list[bytes] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="talos-demo-wiretap", daemon=True)

    def start(self) -> None:
        """Listen; returns once the port is bound.

        Raises:
            DemoFailure: it cannot listen.
        """
        self._thread.start()
        if not self._ready.wait(WAIT) or self._failure is not None:
            raise DemoFailure(f"the wiretap cannot listen on port {self.port}: {self._failure}")

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(); the thread just ends
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._relay, "127.0.0.1", self.port, **_WS_OPTIONS):
            self._ready.set()
            await self._stop.wait()

    async def _relay(self, downstream: ServerConnection) -> None:
        try:
            async with connect(self.upstream, proxy=None, open_timeout=5, **_WS_OPTIONS) as up:
                pumps = {
                    asyncio.create_task(self._pump(downstream, up, record=True)),
                    asyncio.create_task(self._pump(up, downstream, record=False)),
                }
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        except (OSError, TimeoutError, WebSocketException):
            pass  # bob is not there: alice sees the connection drop and retries

    async def _pump(self, source: Any, sink: Any, *, record: bool) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in source:
                if record and isinstance(frame, bytes):
                    self.frames.append(frame)
                await sink.send(frame)
        with contextlib.suppress(ConnectionClosed):
            await sink.close()


async def _inject(url: str, frame: bytes, answer_within: float) -> bytes | None:
    """Open a WebSocket to ``url``, send ``frame``, return the first answer (if any)."""
    async with connect(url, proxy=None, open_timeout=5, **_WS_OPTIONS) as socket:
        await socket.send(frame)
        with contextlib.suppress(TimeoutError):
            answer = await asyncio.wait_for(socket.recv(), answer_within)
            return answer if isinstance(answer, bytes) else answer.encode()
    return None


def inject(url: str, frame: bytes, *, answer_within: float) -> bytes | None:
    """Send one frame to an agent's listener as a stranger would.

    Raises:
        DemoFailure: the listener cannot be reached.
    """
    try:
        return asyncio.run(_inject(url, frame, answer_within))
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise DemoFailure(f"cannot send a frame to {url}: {exc}") from exc


# -- the demo --------------------------------------------------------------------------------


@dataclass
class Demo:
    """The registry, the agents and the processes, in ``root``."""

    root: Path
    children: list[Child] = field(default_factory=list)
    registry_url: str = ""
    registry: Child | None = None
    wiretap: Wiretap | None = None
    step_label: str = "setup"

    def __post_init__(self) -> None:
        (self.root / "logs").mkdir()
        self.alice, self.bob, self.carol = (
            Agent(name, self.root / name) for name in ("alice", "bob", "carol")
        )
        self.agents = (self.alice, self.bob, self.carol)

    # -- output ---------------------------------------------------------------------------

    def step(self, number: int, title: str, story: str) -> None:
        self.step_label = f"step {number} ({title})"
        console.print()
        console.rule(f"[bold]STEP {number}[/] {escape(title)}", align="left")
        console.print(story)

    def shown(self, text: str) -> str:
        """``text`` with the demo directory and agent ids in short form."""
        text = _TOKEN.sub(lambda m: m.group(0)[:24] + "...", text.replace(str(self.root), "$DEMO"))
        for agent in self.agents:
            if agent.agent_id:
                text = text.replace(agent.agent_id, f"<{agent.name}>")
        return text

    def check(self, name: str, what: str) -> None:
        console.print(f"  [green]ok[/] [{escape(name)}] {escape(what)}", markup=True)

    def fail(self, what: str) -> DemoFailure:
        return DemoFailure(f"{self.step_label}: {what}")

    def deltas(
        self, number: int, agent: Agent, before: dict[str, float], series: Sequence[str]
    ) -> dict[str, float]:
        """Scrape ``agent`` again and print ``series`` as ``before -> after``."""
        after = agent.scrape()
        for name in series:
            old, new = before.get(name, math.nan), after.get(name, math.nan)
            change = new - old
            moved = "" if change == 0 or math.isnan(change) else f" ({change:+g})"
            console.print(
                f"  [magenta]metric[/] {number} {agent.name} {name} {old:g} -> {new:g}{moved}"
            )
        return after

    # -- the command line -------------------------------------------------------------------

    def talos(self, agent: Agent | None, *args: str, expect: int = 0, quiet: bool = False) -> str:
        """Run one ``talos`` command, show it and its output; returns its stdout.

        Raises:
            DemoFailure: it exited with another status than ``expect``.
        """
        return self.talos_all([(agent, args)], expect=expect, quiet=quiet)[0]

    def talos_all(
        self,
        commands: Sequence[tuple[Agent | None, Sequence[str]]],
        *,
        expect: int = 0,
        quiet: bool = False,
    ) -> list[str]:
        """Run independent ``talos`` commands at once; results in order."""
        argvs = [
            _talos(*(["--home", str(agent.home)] if agent else []), *args)
            for agent, args in commands
        ]
        with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
            results = list(pool.map(self._run_command, argvs))
        for argv, result in zip(argvs, results, strict=True):
            if not quiet:
                self._show_command(argv, result)
            if result.returncode != expect:
                raise self.fail(
                    f"`{self.shown(shlex.join(argv[2:]))}` exited {result.returncode} "
                    f"(expected {expect}):\n{self.shown(result.stderr.strip())}"
                )
        return [result.stdout for result in results]

    @staticmethod
    def _run_command(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 -- our own interpreter and module
            argv,
            env=_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def _show_command(self, argv: list[str], result: subprocess.CompletedProcess[str]) -> None:
        console.print(f"  [dim]$[/] [bold]{escape(self.shown(shlex.join(argv[2:])))}[/]")
        for line in (result.stdout + result.stderr).strip().splitlines():
            console.print(f"    [dim]{escape(self.shown(line))}[/]")

    # -- processes --------------------------------------------------------------------------

    def start_registry(self) -> None:
        try:
            server = start_registry(self.root / "registry.db", self.root / "logs" / "registry.log")
        except RuntimeError as exc:
            raise self.fail(f"the registry did not start: {exc}") from exc
        self.registry = Child("registry", server.process, self.root / "logs" / "registry.log")
        self.children.append(self.registry)
        self.registry_url = server.url
        console.print(f"  registry (pid {server.process.pid}) serving {server.url}")

    def launch(self, agent: Agent, port: int) -> None:
        """Start ``talos run`` for ``agent`` on ``port``; see :meth:`await_ready`."""
        agent.runs += 1
        agent.metrics_port = agent.metrics_port or free_port()  # kept across restarts
        label = f"{agent.name}-{agent.runs}"
        out, log = self.root / "logs" / f"{label}.out", self.root / "logs" / f"{label}.log"
        argv = _talos(
            "--home", str(agent.home), "run",
            "--registry", self.registry_url,
            "--listen", f"127.0.0.1:{port}",
            "--metrics-port", str(agent.metrics_port),
            "--reconnect-interval", "1",
        )  # fmt: skip
        with out.open("wb") as stdout, log.open("wb") as stderr:
            process = subprocess.Popen(  # noqa: S603 -- our own interpreter and module
                argv, env=_env(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
        agent.child = Child(label, process, log)
        self.children.append(agent.child)

    def await_ready(self, agent: Agent) -> None:
        """Wait for the agent's ``listening on`` line."""
        child = agent.child
        assert child is not None  # noqa: S101 -- launched first
        out = child.log.with_suffix(".out")

        def ready() -> bool:
            if child.process.poll() is not None:
                raise self.fail(f"{agent.name} exited at start:\n{tail(child.log)}")
            return _READY.search(out.read_text()) is not None

        wait_until(ready, f"{self.step_label}: {agent.name} ready")
        match = _READY.search(out.read_text())
        assert match is not None  # noqa: S101 -- ready() saw it
        agent.agent_id, endpoint = match.group(1), match.group(2)
        agent.port = int(endpoint.rsplit(":", 1)[1])
        console.print(
            f"  {agent.name} (pid {child.pid}) listening on {endpoint}, "
            f"metrics on :{agent.metrics_port}"
        )

    def start(self, agent: Agent, port: int = 0) -> None:
        self.launch(agent, port)
        self.await_ready(agent)

    def stop(self, child: Child | None) -> None:
        """SIGTERM one process and wait for it; it must exit cleanly."""
        assert child is not None  # noqa: S101 -- only running processes are stopped
        if terminate([child]):
            raise self.fail(f"{child.name} ignored SIGTERM and was killed")
        if not clean_exit(child):
            raise self.fail(f"{child.name} exited {child.process.returncode}:\n{tail(child.log)}")
        console.print(f"  {child.name.split('-')[0]} (pid {child.pid}) stopped: {exit_text(child)}")

    # -- the story --------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.peer_down()
        self.registry_down()
        frame = self.replay()
        self.forgery(frame)
        self.audit()
        self.shutdown(narrate=True)

    def setup(self) -> None:
        console.rule("[bold]SETUP[/] three agents and a registry", align="left")
        console.print(
            "Each agent gets its own home and identity. By default an agent only accepts a "
            "message that carries a capability it issued itself, so bob grants alice and "
            "carol message.send, alice grants bob the same, and each holder stores its token "
            "together with the issuer's public key log. This happens before the agents start: "
            "these commands write the audit log, which a running agent owns."
        )
        console.print(f"  working in $DEMO = {self.root}")
        self.identities_and_grants()
        self.start_registry()
        for agent in self.agents:
            self.launch(agent, 0)
        for agent in self.agents:
            self.await_ready(agent)
        for agent in self.agents:
            agent.scrape()
        self.check("0.running", "registry and three agents running, metrics answering")
        self.send(self.alice, self.bob, "hello bob: the first message runs X3DH")
        self.send(self.bob, self.alice, "hello alice, session established")
        self.expect_inbox(self.bob, "hello bob")
        self.expect_inbox(self.alice, "hello alice")
        self.check("0.session", "alice and bob exchanged authorized messages over a new session")

    def identities_and_grants(self) -> None:
        """``init`` each home; bob grants alice and carol, alice grants bob; holders ``add``."""
        ids = self.talos_all(
            [(a, ("init", "--name", a.name, "--no-passphrase")) for a in self.agents]
        )
        for agent, agent_id in zip(self.agents, ids, strict=True):
            agent.agent_id = agent_id.strip()
        self.talos_all(
            [(a, ("whoami", "--export-log", str(a.keylog_file))) for a in (self.alice, self.bob)],
            quiet=True,
        )

        def grant(to: Agent) -> Sequence[str]:
            return ("capabilities", "grant", "--to", to.agent_id, "--action", "message.send",
                    "--expires-in", "1h")  # fmt: skip

        # bob's two grants write bob's home one after the other; alice's meanwhile.
        to_alice, to_bob = self.talos_all(
            [(self.bob, grant(self.alice)), (self.alice, grant(self.bob))]
        )
        to_carol = self.talos(self.bob, *grant(self.carol))

        def add(token: str, issuer: Agent) -> Sequence[str]:
            return ("capabilities", "add", token.strip(), "--issuer-log", str(issuer.keylog_file))

        self.talos_all(
            [
                (self.alice, add(to_alice, self.bob)),
                (self.carol, add(to_carol, self.bob)),
                (self.bob, add(to_bob, self.alice)),
            ]
        )

    def send(self, sender: Agent, to: Agent, text: str, *, expect: str = "delivered") -> str:
        """``talos send``; returns the message id. Expects ``delivered`` (or ``queued``)."""
        # Expected to be delivered: wait long enough to ride out a transient failure.
        # Expected to queue: give up waiting after one retry.
        limits = ("15", "10") if expect == "delivered" else ("2", "1")
        out = self.talos(
            sender, "send", to.agent_id, text, "--timeout", limits[0], "--retry-count", limits[1]
        )
        status, message_id = (out.split() + ["", ""])[:2]
        if status != expect:
            raise self.fail(f"{sender.name} -> {to.name}: {status or 'nothing'}, not {expect}")
        return message_id

    def expect_inbox(self, agent: Agent, text: str | None) -> None:
        """``talos inbox`` shows ``text`` (or, with ``None``, nothing)."""
        out = self.talos(agent, "inbox")
        if text is None and out.strip():
            raise self.fail(f"{agent.name}'s inbox is not empty:\n{out}")
        if text is not None and text not in out:
            raise self.fail(f"{agent.name}'s inbox lacks {text!r}")

    # -- 1 ----------------------------------------------------------------------------------

    def peer_down(self) -> None:
        alice, bob = self.alice, self.bob
        self.step(
            1,
            "peer down: queued, then delivered after the restart",
            "bob stops (SIGTERM). alice's next message cannot be acknowledged, so it stays in "
            "her durable outbox: `talos send` answers 'queued' and her agent keeps retrying "
            "with backoff. bob comes back on the same address, and the message is delivered "
            "and acknowledged with nothing more to do.",
        )
        before = alice.scrape()
        self.stop(bob.child)
        self.send(alice, bob, "sent while bob was down", expect="queued")
        during = self.deltas(1, alice, before, ["talos_messages_queued"])
        if during["talos_messages_queued"] != 1:
            raise self.fail("alice's talos_messages_queued is not 1 while bob is down")
        self.talos(alice, "status")
        self.check("1.queued", "alice's message is queued while bob is down")
        self.start(bob, bob.port)
        wait_until(
            lambda: alice.metric("talos_messages_queued") == 0,
            f"{self.step_label}: alice delivers the queued message after bob's restart",
        )
        self.expect_inbox(bob, "sent while bob was down")
        self.deltas(1, alice, during, ["talos_messages_queued"])
        self.deltas(1, alice, before, ["talos_messages_delivered_total"])
        self.check("1.delivered", "the queued message arrived once bob was back")

    # -- 2 ----------------------------------------------------------------------------------

    def registry_down(self) -> None:
        alice, bob, carol = self.agents
        self.step(
            2,
            "registry down: established sessions continue",
            "The registry stops. alice and bob no longer need it: each holds the other's "
            "verified key log, signed address record and ratchet session in its own store. "
            "carol has never talked to bob, so she cannot learn where he listens: her message "
            "waits in her outbox and her status shows the registry down. (alice's gauge still "
            "reads 1: it reports her last contact, and she has not needed the registry since.)",
        )
        before = {agent.name: agent.scrape() for agent in self.agents}
        self.stop(self.registry)
        self.send(alice, bob, "the registry is down and we keep talking")
        self.send(bob, alice, "still here, same session")
        self.expect_inbox(bob, "the registry is down")
        self.check("2.sessions", "alice and bob exchanged messages without the registry")
        self.send(carol, bob, "hello bob, first contact", expect="queued")
        status = self.talos(carol, "status")
        if not re.search(r"registry .*\(DOWN\)", status):
            raise self.fail("carol's `talos status` does not show the registry down")
        self.check("2.status", "carol's `talos status` shows the registry DOWN")
        for agent, series in (
            (alice, ["talos_messages_delivered_total", "talos_registry_up"]),
            (bob, ["talos_messages_received_total", "talos_messages_delivered_total"]),
            (carol, ["talos_registry_up", "talos_messages_queued"]),
        ):
            self.deltas(2, agent, before[agent.name], series)

    # -- 3 ----------------------------------------------------------------------------------

    def replay(self) -> bytes:
        alice, bob = self.alice, self.bob
        self.step(
            3,
            "a replayed frame is dropped",
            "bob restarts on a new port while the registry is still down, so alice only knows "
            "his old address, and a wiretap run by the demo has taken it over. It relays "
            "everything to bob and keeps a copy: what an attacker on the network path can do. "
            "It can read or change nothing (envelopes are signed and encrypted end to end), "
            "but it can send a copy again. bob recognizes the message id, drops the copy, "
            "counts and audits it, and still acknowledges it so an honest sender would stop.",
        )
        old_port = bob.port
        self.stop(bob.child)
        self.start(bob, free_port())
        self.wiretap = Wiretap(old_port, f"ws://127.0.0.1:{bob.port}")
        self.wiretap.start()
        console.print(f"  wiretap listening on bob's old address 127.0.0.1:{old_port}")
        before = bob.scrape()
        message_id = self.send(alice, bob, "an ordinary message, copied in transit")
        frame = self.captured(message_id)
        console.print(
            f"  the wiretap copied the frame: {len(frame)} bytes, message id {message_id[:16]}..., "
            "signature valid under alice's key"
        )
        self.expect_inbox(bob, "copied in transit")
        answer = inject(f"ws://127.0.0.1:{bob.port}", frame, answer_within=WAIT)
        if answer is None:
            raise self.fail("bob did not answer the replayed frame")
        ack = wire.verify(wire.decode(answer), bob.verify_key())
        console.print(
            f"  replayed it to bob: he answered a signed {ack.type.name}, "
            f"status {ack.status.name if ack.status else '?'}"
        )
        if ack.status is not wire.AckStatus.DUPLICATE:
            raise self.fail(f"bob's answer to the replay is not a DUPLICATE ACK: {ack}")
        wait_until(
            lambda: (
                bob.metric("talos_replays_dropped_total") > before["talos_replays_dropped_total"]
            ),
            f"{self.step_label}: talos_replays_dropped_total counts the replay",
        )
        self.expect_inbox(bob, None)
        self.check("3.dropped", "the replay was dropped: bob's inbox got the message once")
        self.deltas(
            3, bob, before, ["talos_replays_dropped_total", "talos_messages_received_total"]
        )
        entries = self.audit_query("REPLAY_DROPPED")
        if not any(e["data"].get("id") == message_id for e in entries):
            raise self.fail("no REPLAY_DROPPED audit entry names the replayed message")
        self.check("3.audited", "bob's audit log holds REPLAY_DROPPED for that message id")
        return frame

    def captured(self, message_id: str) -> bytes:
        """The wiretap's copy of message ``message_id``, checked under alice's key."""
        assert self.wiretap is not None  # noqa: S101 -- started in step 3
        for frame in self.wiretap.frames:
            with contextlib.suppress(TalosError):
                if wire.decode(frame).message_id.hex() == message_id:
                    wire.verify(wire.decode(frame), self.alice.verify_key())
                    return frame
        raise self.fail(
            f"the wiretap saw {len(self.wiretap.frames)} frame(s) but not message {message_id}"
        )

    def audit_query(self, kind: str, *extra: str) -> list[dict[str, Any]]:
        """``talos audit query --type KIND --json`` on bob, shown one entry per line."""
        argv = ("audit", "query", "--type", kind, *extra, "--json")
        entries: list[dict[str, Any]] = json.loads(self.talos(self.bob, *argv, quiet=True))
        console.print(f"  [dim]$[/] [bold]talos --home $DEMO/bob {shlex.join(argv)}[/]")
        for entry in entries:
            data = json.dumps(entry["data"], sort_keys=True)
            line = f"seq {entry['seq']}  {entry['time']}  {entry['kind']}  {entry['peer']}  {data}"
            console.print(f"    [dim]{escape(self.shown(line))}[/]")
        return entries

    # -- 4 ----------------------------------------------------------------------------------

    def forgery(self, frame: bytes) -> None:
        bob = self.bob
        self.step(
            4,
            "a forged signature is rejected",
            "Next, a frame that claims to come from alice but is signed with another key; it "
            "has a new message id, so it is no replay. bob checks every signature against the "
            "sender's key log before anything else: the frame is dropped without an answer, "
            "counted and audited. The sender is not blocked: a bad signature may be plain "
            "corruption on the way.",
        )
        genuine = wire.verify(wire.decode(frame), self.alice.verify_key())
        forged_envelope = dataclasses.replace(
            genuine, message_id=wire.new_message_id(SYSTEM_RNG), timestamp_ms=time_ms(SYSTEM_CLOCK)
        )
        forged = wire.seal(forged_envelope, SigningKey.generate(SYSTEM_RNG))
        before = bob.scrape()
        answer = inject(f"ws://127.0.0.1:{bob.port}", forged, answer_within=0.5)
        console.print(
            f"  sent bob a {len(forged)}-byte frame from 'alice' signed by a stranger's key: "
            f"{'no answer' if answer is None else 'an answer (unexpected)'}"
        )
        wait_until(
            lambda: (
                bob.metric("talos_signature_failures_total")
                > before["talos_signature_failures_total"]
            ),
            f"{self.step_label}: talos_signature_failures_total counts the forgery",
        )
        self.deltas(
            4, bob, before, ["talos_signature_failures_total", "talos_messages_received_total"]
        )
        self.check("4.rejected", "the forged frame was rejected and counted")
        entries = self.audit_query("SIGNATURE_FAILURE", "--last", "10")
        forged_id = forged_envelope.message_id.hex()
        if not any(e["data"].get("id") == forged_id for e in entries):
            raise self.fail("no SIGNATURE_FAILURE audit entry names the forged frame")
        self.check("4.audited", "bob's audit log holds SIGNATURE_FAILURE for the forged frame")

    # -- 5 ----------------------------------------------------------------------------------

    def audit(self) -> None:
        bob = self.bob
        self.step(
            5,
            "the audit log verifies, with a proof",
            "bob's audit log is a Merkle tree. verify-chain re-hashes every entry, rebuilds "
            "every node and the root, and checks the signature of every sealed block against "
            "bob's key log. Blocks are sealed every 60 s or 1,024 entries, so this young log "
            "has none yet. An inclusion proof then shows that one entry, the replay drop, is "
            "in the tree, under a checkpoint bob signs now. An auditor who holds only bob's "
            "public key log, and not the audit log, checks it.",
        )
        self.talos(bob, "audit", "verify-chain")
        self.check("5.chain", "bob's audit chain verifies")
        entries = json.loads(
            self.talos(bob, "audit", "query", "--type", "REPLAY_DROPPED", "--json", quiet=True)
        )
        if not entries:
            raise self.fail("bob's audit log has no REPLAY_DROPPED entry to prove")
        proof = self.root / "replay-proof.json"
        self.talos(bob, "audit", "prove", str(entries[-1]["seq"]), "--out", str(proof))
        # The auditor's home holds nothing but bob's public key log: no identity, no log.
        auditor = Agent("auditor", self.root / "auditor")
        auditor.home.mkdir(mode=0o700)
        (auditor.home / "keylog.cbor").write_bytes(bob.keylog_file.read_bytes())
        self.talos(auditor, "audit", "verify-proof", "--proof", str(proof))
        self.check("5.proof", "the inclusion proof of the replay entry verifies")

    # -- 6 ----------------------------------------------------------------------------------

    def shutdown(self, *, narrate: bool) -> None:
        """Stop everything; with ``narrate``, as step 6, checking each process is gone.

        Without it (a failure or an interruption), stop quietly and as fast as possible.
        """
        if narrate:
            self.step(
                6,
                "everything stops cleanly",
                "Every process gets SIGTERM and is waited for: the agents keep whatever is "
                "still queued (carol's first contact) and remove their control sockets. Then "
                "the demo checks that none of the processes it started is left and removes "
                "its directory.",
            )
        if self.wiretap is not None:
            self.wiretap.stop()
        running = [child for child in self.children if child.process.poll() is None]
        killed = terminate(running)
        if not narrate:
            return
        for child in running:
            status = "killed" if child in killed else exit_text(child)
            console.print(f"  {child.name.split('-')[0]} (pid {child.pid}) stopped: {status}")
        if killed or not all(clean_exit(child) for child in running):
            raise self.fail("a process did not stop cleanly on SIGTERM")
        left = [child for child in self.children if still_running(child.pid)]
        if left or any(child.process.poll() is None for child in self.children):
            raise self.fail(f"still running: {', '.join(c.name for c in left)}")
        self.check("6.stopped", f"all {len(self.children)} processes the demo started are gone")


def clean_exit(child: Child) -> bool:
    """Exit status 0; or, for the registry, death by the SIGTERM after a complete shutdown.

    ``talos registry serve`` runs uvicorn, which re-raises the signal it stopped
    on once the application has shut down: the status is then -SIGTERM.
    """
    code = child.process.returncode
    if code == 0:
        return True
    shut_down = "Application shutdown complete" in tail(child.log, 5)
    return child.name == "registry" and code == -signal.SIGTERM and shut_down


def exit_text(child: Child) -> str:
    code = child.process.returncode
    if code is not None and code < 0:
        return f"ended by {signal.Signals(-code).name} after a clean shutdown"
    return f"exit status {code}"


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def abort(demo: Demo, error: BaseException) -> None:
    """Stop everything after a failure or an interruption; a second Ctrl-C cannot cut it short."""
    saved = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _STOP_SIGNALS}
    try:
        demo.shutdown(narrate=False)
        if isinstance(error, DemoFailure):
            for child in demo.children:
                console.print(f"[dim]--- {child.name} log (last lines) ---[/]")
                console.print(f"[dim]{escape(demo.shown(tail(child.log)))}[/]")
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def main() -> int:
    """Run the demo; 0 on success, 1 on a failed step, 130 when interrupted."""
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _interrupted)
    children: list[Child] = []
    code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="talos-demo-") as tmp:
            demo = Demo(Path(tmp))
            children = demo.children
            try:
                demo.run()
            except BaseException as error:
                abort(demo, error)
                raise
        if Path(tmp).exists():
            raise DemoFailure(f"step 6: {tmp} was not removed")
        console.print("  [green]ok[/] [6.clean] the demo directory is removed")
    except DemoFailure as exc:
        console.print(f"[bold red]demo failed:[/] {escape(str(exc))}")
        code = 1
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted: everything it started was stopped[/]")
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    left = [child.pid for child in children if still_running(child.pid)]
    console.print(f"demo pids: {' '.join(str(child.pid) for child in children)}")
    if left:
        console.print(f"[bold red]still running:[/] {' '.join(map(str, left))}")
        code = code or 1
    console.print(f"demo finished in {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
