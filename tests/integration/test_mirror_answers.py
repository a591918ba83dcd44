"""A mirror's answers count only for the batch they name (issue 16, hardening).

Alice mirrors her audit log to "mallory", a registered agent whose endpoint
the test then serves itself (a real Transport on mallory's port, answering
with frames signed by mallory's real key). While alice waits for the answer
to her batch, mallory answers first with an ACK that names no request and
one that names another request (what a replayed or stale answer looks like):
alice drops both, counts and logs them, and moves her progress only when the
ACK that echoes her batch's request id arrives.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from talos.audit import AuditLog, LogSigner
from talos.core import mirror as bodies
from talos.core import wire
from talos.core.identity import Identity
from talos.storage.home import AgentHome
from talos.testing import SeededRng
from talos.testing.cli import TalosCli
from talos.testing.processes import AgentProcess, free_port, launched
from talos.testing.waiting import wait_until
from talos.transport import Link, Transport

CLI = TalosCli(timeout=60.0)
_SEEDS = itertools.count(100)


def _metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def _answer(identity: Identity, to: str, body: bodies.Body) -> bytes:
    rng = SeededRng(next(_SEEDS))
    envelope = wire.Envelope(
        type=wire.EnvelopeType.MIRROR,
        message_id=wire.new_message_id(rng),
        sender=identity.agent_id,
        sender_instance=wire.new_instance_id(rng),
        recipient=to,
        timestamp_ms=int(time.time() * 1000),
        mirror_kind=bodies.kind_of(body),
        mirror_body=bodies.encode_body(body),
    )
    return wire.seal(envelope, identity.signing_key)


def test_answers_that_match_no_outstanding_batch_are_dropped(tmp_path: Path) -> None:
    alice_home, mallory_home = tmp_path / "alice", tmp_path / "mallory"
    CLI.ok(alice_home, "init", "--name", "alice", "--no-passphrase")
    CLI.ok(mallory_home, "init", "--name", "mallory", "--no-passphrase")
    alice = AgentHome(alice_home).load_identity(passphrase=None)
    mallory = AgentHome(mallory_home).load_identity(passphrase=None)
    signer = LogSigner(alice.signing_key, alice.agent_id, f"{alice.agent_id}/audit")
    with AuditLog.open(alice_home / "audit", signer=signer) as log:
        log.append_many([("MESSAGE_SENT", {"n": n}, "peer") for n in range(5)])
    port, metrics = free_port(), free_port()
    with launched() as launcher:
        registry = launcher.registry(tmp_path / "registry.db", tmp_path / "registry.log")
        # mallory registers its endpoint, then the test serves that endpoint itself.
        launcher.agent(
            mallory_home, "--registry", registry.url, "--listen", f"127.0.0.1:{port}"
        ).stop()
        start_alice = functools.partial(
            launcher.agent,
            alice_home,
            "--registry",
            registry.url,
            "--metrics-port",
            str(metrics),
            "--audit-mirror",
            mallory.agent_id,
        )
        asyncio.run(_serve_as_mirror(start_alice, alice, mallory, port, metrics))


async def _serve_as_mirror(
    start_alice: Callable[[], AgentProcess],
    alice: Identity,
    mallory: Identity,
    port: int,
    metrics: int,
) -> None:
    batches: asyncio.Queue[tuple[Link, bodies.Batch]] = asyncio.Queue()

    async def on_frame(link: Link, frame: bytes) -> None:
        envelope = wire.decode(frame)._envelope
        if envelope.type is wire.EnvelopeType.MIRROR and envelope.mirror_kind is not None:
            body = bodies.decode_body(envelope.mirror_kind, envelope.mirror_body or b"")
            if isinstance(body, bodies.Batch):
                batches.put_nowait((link, body))

    transport = Transport(on_frame)
    await transport.listen("127.0.0.1", port)
    try:
        agent = await asyncio.to_thread(start_alice)
        link, batch = await asyncio.wait_for(batches.get(), 30)
        assert batch.request is not None
        assert len(batch.request) == bodies.REQUEST_ID_SIZE
        end = batch.checkpoint.size
        sent = "talos_audit_mirror_batches_sent_total"
        unmatched = "talos_audit_mirror_answers_unmatched_total"
        # A replayed ACK (no request id) and a stale one (another batch's id): dropped.
        await link.send(_answer(mallory, alice.agent_id, bodies.Ack(end)))
        await link.send(_answer(mallory, alice.agent_id, bodies.Ack(end, b"\x07" * 16)))
        await asyncio.to_thread(
            wait_until, lambda: _metric(metrics, unmatched) == 2.0, 30, what="2 answers dropped"
        )
        assert _metric(metrics, sent) == 0.0
        assert "mirror_answer_unmatched" in agent.log.read_text()
        # The answer that names the batch counts.
        await link.send(_answer(mallory, alice.agent_id, bodies.Ack(end, batch.request)))
        await asyncio.to_thread(
            wait_until, lambda: _metric(metrics, sent) >= 1.0, 30, what="the batch acknowledged"
        )
        await asyncio.to_thread(agent.stop)
    finally:
        await transport.close()
