"""The demo's story: the setup and steps 1 to 8, each a method that runs ``talos`` commands.

A step narrates what is about to happen, makes it happen (stopping a
process, replaying a frame, forging one), checks the outcome through the
command line, the agents' metrics and bob's audit log, and prints a
checkpoint for each check that held. A check that does not hold raises
:class:`~talos.demo.DemoFailure` naming the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.markup import escape

from talos.core import wire
from talos.core.clock import time_ms
from talos.core.crypto import SigningKey
from talos.demo import WAIT, DemoFailure
from talos.demo.anchoring import anchoring
from talos.demo.cast import Agent, Cast, clean_exit, exit_text
from talos.demo.compromise import key_compromise
from talos.demo.mirror import audit_mirror
from talos.demo.narration import Narrator
from talos.demo.wiretap import Wiretap, inject
from talos.errors import TalosError
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG
from talos.testing.child import ChildProcess, still_running
from talos.testing.cli import CliResult, TalosCli
from talos.testing.processes import free_port
from talos.testing.waiting import wait_until

#: ``talos`` commands of the demo: a clean environment, one minute at most each.
_CLI = TalosCli(timeout=60)


def _within(condition: Callable[[], bool], what: str) -> None:
    """Wait (``WAIT`` s at most) until ``condition()`` holds.

    Raises:
        DemoFailure: it did not.
    """
    try:
        wait_until(condition, WAIT, what=what)
    except TimeoutError as exc:
        raise DemoFailure(str(exc)) from None


class Demo:
    """The story of the registry and three agents in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "logs").mkdir()
        self.alice, self.bob, self.carol = (
            Agent(name, root / name) for name in ("alice", "bob", "carol")
        )
        self.agents = (self.alice, self.bob, self.carol)
        self.out = Narrator(root, self.agents)
        self.cast = Cast(root, self.out)
        self.wiretap: Wiretap | None = None
        #: The token alice granted bob in the setup, under her first key.
        self.bob_token = ""
        #: The number of the last step (everything stops, the directory is removed).
        self.last_step = 9

    @property
    def children(self) -> list[ChildProcess]:
        """Every process the demo started, restarts included."""
        return self.cast.children

    def deltas(
        self, number: int, agent: Agent, before: dict[str, float], series: Sequence[str]
    ) -> dict[str, float]:
        """Scrape ``agent`` again and print ``series`` as ``before -> after``."""
        after = agent.scrape()
        self.out.metric_changes(number, agent.name, before, after, series)
        return after

    # -- the command line -------------------------------------------------------------------

    def talos(self, agent: Agent | None, *args: str, expect: int = 0, quiet: bool = False) -> str:
        """Run one ``talos`` command, show it and its output; returns its stdout (its
        stderr when ``expect`` is a failure).

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

        def run(command: tuple[Agent | None, Sequence[str]]) -> CliResult:
            agent, args = command
            return _CLI.run(agent.home if agent else None, *args)

        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            results = list(pool.map(run, commands))
        for result in results:
            if not quiet:
                self.out.command(result)
            if result.returncode != expect:
                raise self.out.fail(
                    f"`{self.out.shown(shlex.join(result.argv[2:]))}` exited {result.returncode} "
                    f"(expected {expect}):\n{self.out.shown(result.stderr.strip())}"
                )
        # A command expected to fail says why on stderr: hand that back instead.
        return [result.stdout if expect == 0 else result.stderr for result in results]

    # -- the story --------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.peer_down()
        self.registry_down()
        frame = self.replay()
        self.forgery(frame)
        self.audit()
        key_compromise(self, 6)
        anchoring(self, 7)
        audit_mirror(self, 8)
        self.shutdown(narrate=True)

    def setup(self) -> None:
        self.out.rule("[bold]SETUP[/] three agents and a registry")
        self.out.say(
            "Each agent gets its own home and identity. By default an agent only accepts a "
            "message that carries a capability it issued itself, so bob grants alice and "
            "carol message.send, alice grants bob the same, and each holder stores its token "
            "together with the issuer's public key log. This happens before the agents start: "
            "these commands write the audit log, which a running agent owns."
        )
        self.out.say(f"  working in $DEMO = {self.root}")
        self.identities_and_grants()
        self.cast.start_registry()
        for agent in self.agents:
            self.cast.launch(agent, 0)
        for agent in self.agents:
            self.cast.await_ready(agent)
        for agent in self.agents:
            agent.scrape()
        self.out.check("0.running", "registry and three agents running, metrics answering")
        self.send(self.alice, self.bob, "hello bob: the first message runs X3DH")
        self.send(self.bob, self.alice, "hello alice, session established")
        self.expect_inbox(self.bob, "hello bob")
        self.expect_inbox(self.alice, "hello alice")
        self.out.check(
            "0.session", "alice and bob exchanged authorized messages over a new session"
        )

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
        self.bob_token = to_bob.strip()

        def add(token: str, issuer: Agent) -> Sequence[str]:
            return ("capabilities", "add", token.strip(), "--issuer-log", str(issuer.keylog_file))

        self.talos_all(
            [
                (self.alice, add(to_alice, self.bob)),
                (self.carol, add(to_carol, self.bob)),
                (self.bob, add(to_bob, self.alice)),
            ]
        )

    def within(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until ``condition()`` holds; a failure names the step and ``what``."""
        _within(condition, f"{self.out.step_label}: {what}")

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
            raise self.out.fail(f"{sender.name} -> {to.name}: {status or 'nothing'}, not {expect}")
        return message_id

    def expect_inbox(self, agent: Agent, text: str | None) -> None:
        """``talos inbox`` shows ``text`` (or, with ``None``, nothing)."""
        out = self.talos(agent, "inbox")
        if text is None and out.strip():
            raise self.out.fail(f"{agent.name}'s inbox is not empty:\n{out}")
        if text is not None and text not in out:
            raise self.out.fail(f"{agent.name}'s inbox lacks {text!r}")

    # -- 1 ----------------------------------------------------------------------------------

    def peer_down(self) -> None:
        alice, bob = self.alice, self.bob
        self.out.step(
            1,
            "peer down: queued, then delivered after the restart",
            "bob stops (SIGTERM). alice's next message cannot be acknowledged, so it stays in "
            "her durable outbox: `talos send` answers 'queued' and her agent keeps retrying "
            "with backoff. bob comes back on the same address, and the message is delivered "
            "and acknowledged with nothing more to do.",
        )
        before = alice.scrape()
        self.cast.stop(bob.child)
        self.send(alice, bob, "sent while bob was down", expect="queued")
        during = self.deltas(1, alice, before, ["talos_messages_queued"])
        if during["talos_messages_queued"] != 1:
            raise self.out.fail("alice's talos_messages_queued is not 1 while bob is down")
        self.talos(alice, "status")
        self.out.check("1.queued", "alice's message is queued while bob is down")
        self.cast.start(bob, bob.port)
        _within(
            lambda: alice.metric("talos_messages_queued") == 0,
            f"{self.out.step_label}: alice delivers the queued message after bob's restart",
        )
        self.expect_inbox(bob, "sent while bob was down")
        self.deltas(1, alice, during, ["talos_messages_queued"])
        self.deltas(1, alice, before, ["talos_messages_delivered_total"])
        self.out.check("1.delivered", "the queued message arrived once bob was back")

    # -- 2 ----------------------------------------------------------------------------------

    def registry_down(self) -> None:
        alice, bob, carol = self.agents
        self.out.step(
            2,
            "registry down: established sessions continue",
            "The registry stops. alice and bob no longer need it: each holds the other's "
            "verified key log, signed address record and ratchet session in its own store. "
            "carol has never talked to bob, so she cannot learn where he listens: her message "
            "waits in her outbox and her status shows the registry down. (alice's gauge still "
            "reads 1: it reports her last contact, and she has not needed the registry since.)",
        )
        before = {agent.name: agent.scrape() for agent in self.agents}
        self.cast.stop_registry()
        self.send(alice, bob, "the registry is down and we keep talking")
        self.send(bob, alice, "still here, same session")
        self.expect_inbox(bob, "the registry is down")
        self.out.check("2.sessions", "alice and bob exchanged messages without the registry")
        self.send(carol, bob, "hello bob, first contact", expect="queued")
        status = self.talos(carol, "status")
        if not re.search(r"registry .*\(DOWN\)", status):
            raise self.out.fail("carol's `talos status` does not show the registry down")
        self.out.check("2.status", "carol's `talos status` shows the registry DOWN")
        for agent, series in (
            (alice, ["talos_messages_delivered_total", "talos_registry_up"]),
            (bob, ["talos_messages_received_total", "talos_messages_delivered_total"]),
            (carol, ["talos_registry_up", "talos_messages_queued"]),
        ):
            self.deltas(2, agent, before[agent.name], series)

    # -- 3 ----------------------------------------------------------------------------------

    def replay(self) -> bytes:
        alice, bob = self.alice, self.bob
        self.out.step(
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
        self.cast.stop(bob.child)
        self.cast.start(bob, free_port())
        self.wiretap = Wiretap(old_port, f"ws://127.0.0.1:{bob.port}")
        self.wiretap.start()
        self.out.say(f"  wiretap listening on bob's old address 127.0.0.1:{old_port}")
        before = bob.scrape()
        message_id = self.send(alice, bob, "an ordinary message, copied in transit")
        frame = self.captured(message_id)
        self.out.say(
            f"  the wiretap copied the frame: {len(frame)} bytes, message id {message_id[:16]}..., "
            "signature valid under alice's key"
        )
        self.expect_inbox(bob, "copied in transit")
        answer = inject(f"ws://127.0.0.1:{bob.port}", frame, answer_within=WAIT)
        if answer is None:
            raise self.out.fail("bob did not answer the replayed frame")
        ack = wire.verify(wire.decode(answer), bob.verify_key())
        self.out.say(
            f"  replayed it to bob: he answered a signed {ack.type.name}, "
            f"status {ack.status.name if ack.status else '?'}"
        )
        if ack.status is not wire.AckStatus.DUPLICATE:
            raise self.out.fail(f"bob's answer to the replay is not a DUPLICATE ACK: {ack}")
        _within(
            lambda: (
                bob.metric("talos_replays_dropped_total") > before["talos_replays_dropped_total"]
            ),
            f"{self.out.step_label}: talos_replays_dropped_total counts the replay",
        )
        self.expect_inbox(bob, None)
        self.out.check("3.dropped", "the replay was dropped: bob's inbox got the message once")
        self.deltas(
            3, bob, before, ["talos_replays_dropped_total", "talos_messages_received_total"]
        )
        entries = self.audit_query("REPLAY_DROPPED")
        if not any(e["data"].get("id") == message_id for e in entries):
            raise self.out.fail("no REPLAY_DROPPED audit entry names the replayed message")
        self.out.check("3.audited", "bob's audit log holds REPLAY_DROPPED for that message id")
        return frame

    def captured(self, message_id: str) -> bytes:
        """The wiretap's copy of message ``message_id``, checked under alice's key."""
        assert self.wiretap is not None  # noqa: S101 -- started in step 3
        for frame in self.wiretap.frames:
            with contextlib.suppress(TalosError):
                if wire.decode(frame).message_id.hex() == message_id:
                    wire.verify(wire.decode(frame), self.alice.verify_key())
                    return frame
        raise self.out.fail(
            f"the wiretap saw {len(self.wiretap.frames)} frame(s) but not message {message_id}"
        )

    def audit_query(self, kind: str, *extra: str) -> list[dict[str, Any]]:
        """``talos audit query --type KIND --json`` on bob, shown one entry per line."""
        argv = ("audit", "query", "--type", kind, *extra, "--json")
        entries: list[dict[str, Any]] = json.loads(self.talos(self.bob, *argv, quiet=True))
        self.out.say(f"  [dim]$[/] [bold]talos --home $DEMO/bob {shlex.join(argv)}[/]")
        for entry in entries:
            data = json.dumps(entry["data"], sort_keys=True)
            line = f"seq {entry['seq']}  {entry['time']}  {entry['kind']}  {entry['peer']}  {data}"
            self.out.say(f"    [dim]{escape(self.out.shown(line))}[/]")
        return entries

    # -- 4 ----------------------------------------------------------------------------------

    def forgery(self, frame: bytes) -> None:
        bob = self.bob
        self.out.step(
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
        self.out.say(
            f"  sent bob a {len(forged)}-byte frame from 'alice' signed by a stranger's key: "
            f"{'no answer' if answer is None else 'an answer (unexpected)'}"
        )
        _within(
            lambda: (
                bob.metric("talos_signature_failures_total")
                > before["talos_signature_failures_total"]
            ),
            f"{self.out.step_label}: talos_signature_failures_total counts the forgery",
        )
        self.deltas(
            4, bob, before, ["talos_signature_failures_total", "talos_messages_received_total"]
        )
        self.out.check("4.rejected", "the forged frame was rejected and counted")
        entries = self.audit_query("SIGNATURE_FAILURE", "--last", "10")
        forged_id = forged_envelope.message_id.hex()
        if not any(e["data"].get("id") == forged_id for e in entries):
            raise self.out.fail("no SIGNATURE_FAILURE audit entry names the forged frame")
        self.out.check("4.audited", "bob's audit log holds SIGNATURE_FAILURE for the forged frame")

    # -- 5 ----------------------------------------------------------------------------------

    def audit(self) -> None:
        bob = self.bob
        self.out.step(
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
        self.out.check("5.chain", "bob's audit chain verifies")
        entries = json.loads(
            self.talos(bob, "audit", "query", "--type", "REPLAY_DROPPED", "--json", quiet=True)
        )
        if not entries:
            raise self.out.fail("bob's audit log has no REPLAY_DROPPED entry to prove")
        proof = self.root / "replay-proof.json"
        self.talos(bob, "audit", "prove", str(entries[-1]["seq"]), "--out", str(proof))
        # The auditor's home holds nothing but bob's public key log: no identity, no log.
        auditor = Agent("auditor", self.root / "auditor")
        auditor.home.mkdir(mode=0o700)
        (auditor.home / "keylog.cbor").write_bytes(bob.keylog_file.read_bytes())
        self.talos(auditor, "audit", "verify-proof", "--proof", str(proof))
        self.out.check("5.proof", "the inclusion proof of the replay entry verifies")

    # -- 6 is talos.demo.compromise, 7 talos.demo.anchoring, 8 talos.demo.mirror; the last --

    def shutdown(self, *, narrate: bool) -> None:
        """Stop everything; with ``narrate``, as the last step, checking each process is gone.

        Without it (a failure or an interruption), stop quietly and as fast as possible.
        """
        if narrate:
            self.out.step(
                self.last_step,
                "everything stops cleanly",
                "Every process gets SIGTERM and is waited for: the agents keep whatever is "
                "still queued and remove their control sockets. Then "
                "the demo checks that none of the processes it started is left and removes "
                "its directory.",
            )
        if self.wiretap is not None:
            self.wiretap.stop()
        running, killed = self.cast.stop_everything()
        if not narrate:
            return
        for child in running:
            status = "killed" if child in killed else exit_text(child)
            self.out.say(f"  {child.name.split('-')[0]} (pid {child.pid}) stopped: {status}")
        if killed or not all(clean_exit(child) for child in running):
            raise self.out.fail("a process did not stop cleanly on SIGTERM")
        left = [child for child in self.children if still_running(child.pid)]
        if left or any(child.running for child in self.children):
            raise self.out.fail(f"still running: {', '.join(c.name for c in left)}")
        self.out.check(
            f"{self.last_step}.stopped",
            f"all {len(self.children)} processes the demo started are gone",
        )
