"""Audit mirrors and `talos audit rebuild --from-peers` with real processes (issue 16).

Three agents and a registry: alice mirrors her audit log to bob and carol
(``talos run --audit-mirror``). Her audit database is then deleted, bit-flipped
or truncated; `talos audit rebuild --from-peers` fetches the log back over the
real transport, verifies it, and the rebuilt log has the same root and the
same proofs, continues, and the agent starts on it. A mirror that is offline
is skipped; one whose store was tampered with on disk is named and the next is
used; entries never mirrored are reported lost, never invented.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2
import httpx
import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.mirror_store import MirrorStore
from talos.core import mirror as mirror_bodies
from talos.core import wire
from talos.core.audit.checkpoint import Checkpoint
from talos.core.crypto import SigningKey
from talos.core.encoding import canonical_dumps
from talos.core.identity import Identity
from talos.storage.home import AgentHome
from talos.testing import SeededRng
from talos.testing.cli import TalosCli
from talos.testing.processes import (
    AgentProcess,
    Launcher,
    RegistryProcess,
    free_port,
    launched,
)
from talos.testing.waiting import wait_until
from talos.transport import Link, Transport

CLI = TalosCli(timeout=120.0)
ENTRIES = 300


def _append(home: Path, count: int, first: int = 0) -> None:
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")
    with AuditLog.open(home / "audit", signer=signer, block_entries=64) as log:
        log.append_many([("MESSAGE_SENT", {"n": n}, "peer") for n in range(first, first + count)])
        log.seal_block()


def _head(home: Path, size: int | None = None) -> tuple[int, bytes]:
    with AuditLog.open(home / "audit", readonly=True) as log:
        return log.size, log.root_at(log.size if size is None else size)


def _acked(home: Path, mirror: str) -> int:
    with MirrorStore.open(home / "mirrors") as store:
        return store.progress(mirror)


@dataclass
class World:
    launcher: Launcher
    registry: RegistryProcess
    alice: Path
    bob: AgentProcess
    carol: AgentProcess
    root: bytes
    proof: Path
    #: The mirrored log's size: ENTRIES and the witnesses' cosignatures (CHECKPOINT_COSIGNED).
    size: int
    #: alice's agent id (bob and carol keep a mirror of her log: --audit-mirror-for).
    alice_id: str
    #: Bob's /metrics port (the mirror's side of the series).
    bob_metrics: int = 0

    def restart_carol(self) -> None:
        self.carol = self.launcher.agent(
            self.carol.home, "--registry", self.registry.url, "--audit-mirror-for", self.alice_id
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("mirrors")
    with launched() as launcher:
        registry = launcher.registry(base / "registry.db", base / "registry.log")
        homes = {name: base / name for name in ("alice", "bob", "carol")}
        for name, home in homes.items():
            CLI.ok(home, "init", "--name", name, "--no-passphrase")
        _append(homes["alice"], ENTRIES)
        alice_id = AgentHome(homes["alice"]).load_identity(passphrase=None).agent_id
        serve = ("--audit-mirror-for", alice_id)
        bob_metrics = free_port()
        bob = launcher.agent(
            homes["bob"], "--registry", registry.url, "--metrics-port", str(bob_metrics), *serve
        )
        carol = launcher.agent(homes["carol"], "--registry", registry.url, *serve)
        alice = launcher.agent(
            homes["alice"],
            "--registry",
            registry.url,
            "--audit-mirror",
            bob.agent_id,
            "--audit-mirror",
            carol.agent_id,
        )

        # Bob and carol also witness alice's log: each cosignature is an entry of hers,
        # mirrored like the rest. Wait until both mirrors hold all of it, twice in a row.
        def settled() -> bool:
            size = _head(homes["alice"])[0]
            return all(_acked(homes["alice"], m.agent_id) == size for m in (bob, carol))

        for _ in range(2):
            wait_until(settled, 60, what="alice's whole log mirrored to bob and carol")
            time.sleep(1.5)  # a cosignature arriving late would show here
        alice.stop()
        assert "mirror_batch_stored" in bob.log.read_text()
        assert _metric(bob_metrics, "talos_audit_mirror_batches_stored_total") >= 1
        assert _metric(bob_metrics, "talos_audit_mirror_entries_stored_total") >= ENTRIES
        size, root = _head(homes["alice"])
        assert size >= ENTRIES
        assert all(_acked(homes["alice"], m.agent_id) == size for m in (bob, carol))
        proof = base / "proof.json"
        CLI.ok(homes["alice"], "audit", "prove", "17", "--out", str(proof))
        yield World(
            launcher, registry, homes["alice"], bob, carol, root, proof, size, alice_id, bob_metrics
        )


@pytest.fixture
def alice(world: World, tmp_path: Path) -> Path:
    """A copy of alice's home (stopped, fully mirrored) for one test to damage."""
    copy = tmp_path / "alice"
    shutil.copytree(world.alice, copy)
    return copy


def _damage(home: Path, how: str) -> None:
    data = home / "audit" / "data.mdb"
    if how == "delete":
        data.unlink()
    elif how == "truncate":
        with data.open("r+b") as handle:
            handle.truncate(data.stat().st_size // 2)
    else:  # flip a bit of one entry's bytes
        with AuditLog.open(home / "audit", readonly=True) as log:
            target = log.entry(150).to_bytes()
        raw = bytearray(data.read_bytes())
        found = raw.find(target)
        assert found != -1
        while found != -1:  # every copy: a stale one in a freed page may come first
            raw[found + 10] ^= 0x10
            found = raw.find(target, found + 1)
        data.write_bytes(bytes(raw))


def _rebuild(world: World, home: Path, *args: str) -> str:
    return CLI.ok(home, "audit", "rebuild", "--from-peers", "--registry", world.registry.url, *args)


def _check_rebuilt(world: World, home: Path) -> None:
    size, root = _head(home, world.size)
    assert root == world.root
    assert size == world.size + 1  # and the MIRROR_REBUILT entry
    (entry,) = json.loads(CLI.ok(home, "audit", "query", "--type", "MIRROR_REBUILT", "--json"))
    assert entry["data"]["lost"] == 0
    CLI.ok(home, "audit", "verify-chain")
    # A proof issued before the damage still verifies against the rebuilt log's root.
    proof = json.loads(world.proof.read_text())
    assert proof["tree_size"] == world.size
    CLI.ok(None, "audit", "verify-proof", "--proof", str(world.proof), "--root", root.hex())
    assert list(home.glob("audit.damaged-*")) or not (home / "audit").exists()


@pytest.mark.parametrize("how", ["delete", "flip", "truncate"])
def test_rebuild_from_peers_gives_the_same_root_and_proofs(
    world: World, alice: Path, how: str
) -> None:
    _damage(alice, how)
    out = _rebuild(world, alice)
    assert f"root {world.root.hex()}" in out
    _check_rebuilt(world, alice)
    damaged = list(alice.glob("audit.damaged-*"))
    assert len(damaged) == 1  # moved aside, never deleted
    if how != "delete":
        assert (damaged[0] / "data.mdb").exists()


def test_the_rebuilt_log_continues_and_the_agent_starts(world: World, alice: Path) -> None:
    _damage(alice, "delete")
    _rebuild(world, alice)
    agent = world.launcher.agent(alice, "--offline")
    agent.stop()
    _append(alice, 5, first=world.size)
    with AuditLog.open(alice / "audit", readonly=True) as log:
        assert log.size == world.size + 6
        log.prove_consistency(world.size).verify(world.root, log.root())


def test_entries_never_mirrored_are_reported_lost(world: World, alice: Path) -> None:
    _append(alice, 20, first=world.size)
    world.launcher.agent(alice, "--offline").stop()  # the watermark records 320
    _damage(alice, "delete")
    refused = CLI.fails(
        alice, 1, "audit", "rebuild", "--from-peers", "--registry", world.registry.url
    )
    assert f"at least 20 entries from position {world.size}" in refused.stderr
    assert "nothing was changed" in refused.stderr
    assert not list(alice.glob("audit.damaged-*"))
    out = _rebuild(world, alice, "--accept-loss")
    assert "LOST: at least 20 entries" in out
    (entry,) = json.loads(CLI.ok(alice, "audit", "query", "--type", "MIRROR_REBUILT", "--json"))
    assert (entry["data"]["lost"], entry["data"]["lost_from"]) == (20, world.size)
    world.launcher.agent(alice, "--offline").stop()  # starts: the loss was accepted


def test_a_lying_mirror_is_named_and_the_next_one_used(world: World, alice: Path) -> None:
    store = world.bob.home / "mirrors" / "data.mdb"
    with AuditLog.open(alice / "audit", readonly=True) as log:
        target = log.entry(150).to_bytes()
    raw = store.read_bytes()
    # The last byte of the entry's time: it still decodes, only the root check sees it.
    # Every copy of the entry in the file: LMDB copies pages on write, and a stale copy
    # in a freed page may come before the live one.
    spots: list[int] = []
    found = raw.find(target)
    while found != -1:
        spots.append(found + len(target) - 4)
        found = raw.find(target, found + 1)
    assert spots
    originals = [raw[at] for at in spots]
    with store.open("r+b") as handle:
        for at, original in zip(spots, originals, strict=True):
            handle.seek(at)
            handle.write(bytes([original ^ 0x01]))
    try:
        _damage(alice, "delete")
        out = _rebuild(world, alice, "--mirror", world.bob.agent_id)
    finally:
        with store.open("r+b") as handle:
            for at, original in zip(spots, originals, strict=True):
                handle.seek(at)
                handle.write(bytes([original]))
    assert f"mirror {world.bob.agent_id}: INVALID" in out
    assert f"mirror {world.carol.agent_id}: ok" in out
    _check_rebuilt(world, alice)
    (entry,) = json.loads(CLI.ok(alice, "audit", "query", "--type", "MIRROR_REBUILT", "--json"))
    assert entry["data"]["mirror"] == world.carol.agent_id
    assert entry["data"]["invalid_mirrors"] == [world.bob.agent_id]


def _move_checkpoint(store_dir: Path, origin: str, size: int | None, to: int) -> int:
    """Move the stored checkpoint of ``origin`` at ``size`` (default: the first past entry
    150) to the key of size ``to`` relative to it; returns the size it was at. Moved one
    earlier, the mirror serves that stretch one entry short under its checkpoint."""
    prefix = origin.encode() + b"\x00"
    with MirrorStore.open(store_dir) as store, store._txn(write=True) as txn:
        table = store._dbs[b"checkpoints"]
        if size is None:
            sizes = [int.from_bytes(bytes(k)[-8:], "big") for k, _ in txn.cursor(db=table)]
            size = next(n for n in sizes if n > 150)
        value = txn.get(prefix + size.to_bytes(8, "big"), db=table)
        assert value is not None
        txn.delete(prefix + size.to_bytes(8, "big"), db=table)
        txn.put(prefix + (size + to).to_bytes(8, "big"), value, db=table)
    return size


def test_a_mirror_whose_store_is_damaged_says_so_and_the_next_one_is_used(
    world: World, alice: Path
) -> None:
    """carol's store has a checkpoint at the wrong key: served as it is, the stretch would
    be one entry short of its checkpoint. carol refuses at once (``mirror_store_failed``)
    instead of failing to answer, and bob's copy is used."""
    store = world.carol.home / "mirrors"
    world.carol.stop()
    moved = _move_checkpoint(store, world.alice_id, None, -1)
    world.restart_carol()
    try:
        _damage(alice, "delete")
        out = _rebuild(world, alice, "--mirror", world.carol.agent_id)
    finally:
        world.carol.stop()
        _move_checkpoint(store, world.alice_id, moved - 1, +1)
        world.restart_carol()
    assert f"mirror {world.carol.agent_id}: unavailable: refused" in out
    assert "store failed" in out  # at once, not "no answer within 15s"
    assert f"mirror {world.bob.agent_id}: ok" in out
    _check_rebuilt(world, alice)
    assert "mirror_store_failed" in "".join(
        log.read_text() for log in world.carol.home.parent.glob("carol-*.log")
    )


class _LyingMirror:
    """A process-less mirror on ``port`` speaking as ``identity``: it answers every
    FETCH of ``origin`` with a stretch one entry short of the checkpoint it serves."""

    def __init__(self, port: int, identity: Identity, origin: Path) -> None:
        self.port, self.identity = port, identity
        with AuditLog.open(origin / "audit", readonly=True) as log:
            self.entries = tuple(e.to_bytes() for e in log.entries(0, 10))
            root = log.root_at(10)
        who = AgentHome(origin).load_identity(passphrase=None)
        signer = LogSigner(who.signing_key, who.agent_id, f"{who.agent_id}/audit")
        self.checkpoint = Checkpoint.sign(signer, 10, root)
        self.fetches = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    def __enter__(self) -> _LyingMirror:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        transport = Transport(self._on_frame)
        await transport.listen("127.0.0.1", self.port)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await transport.close()

    async def _on_frame(self, link: Link, frame: bytes) -> None:
        envelope = wire.decode(frame)
        if envelope.type is not wire.EnvelopeType.MIRROR:
            return  # a head query: no answer
        opened = envelope._envelope
        assert opened.mirror_kind is mirror_bodies.MirrorKind.FETCH
        fetch = mirror_bodies.decode_body(opened.mirror_kind, opened.mirror_body)
        self.fetches += 1
        good = mirror_bodies.Entries(0, self.entries, self.checkpoint, 10, fetch.request)
        raw = cbor2.loads(mirror_bodies.encode_body(good))
        raw["e"] = raw["e"][:-1]  # truncated: the checkpoint says 10
        answer = wire.Envelope(
            type=wire.EnvelopeType.MIRROR,
            message_id=os.urandom(16),
            sender=self.identity.agent_id,
            sender_instance=os.urandom(16),
            recipient=envelope.sender,
            timestamp_ms=int(time.time() * 1000),
            mirror_kind=mirror_bodies.MirrorKind.ENTRIES,
            mirror_body=canonical_dumps(raw),
        )
        await link.send(wire.seal(answer, self.identity.signing_key))


def test_a_mirror_serving_a_truncated_stretch_is_named_and_the_next_one_used(
    world: World, alice: Path, tmp_path: Path
) -> None:
    """mallory is registered as an agent, then its endpoint is taken over by a mirror
    that serves a stretch cut short under its checkpoint."""
    port = free_port()
    where = f"127.0.0.1:{port}"
    mallory = world.launcher.agent(
        tmp_path / "mallory", "--name", "mallory", "--registry", world.registry.url,
        "--listen", where, "--announce", where,
    )  # fmt: skip
    mallory.stop()
    identity = AgentHome(mallory.home).load_identity(passphrase=None)
    _damage(alice, "delete")
    with _LyingMirror(port, identity, world.alice) as lying:
        out = _rebuild(world, alice, "--mirror", mallory.agent_id)
    assert lying.fetches >= 1
    assert f"mirror {mallory.agent_id}: INVALID" in out
    _check_rebuilt(world, alice)
    (entry,) = json.loads(CLI.ok(alice, "audit", "query", "--type", "MIRROR_REBUILT", "--json"))
    assert entry["data"]["invalid_mirrors"] == [mallory.agent_id]


def test_an_offline_mirror_is_skipped(world: World, alice: Path) -> None:
    world.carol.stop()
    try:
        _damage(alice, "delete")
        out = _rebuild(world, alice, "--mirror", world.carol.agent_id)
    finally:
        world.restart_carol()
    assert f"mirror {world.carol.agent_id}: unavailable" in out
    assert f"mirror {world.bob.agent_id}: ok" in out
    _check_rebuilt(world, alice)


def test_bad_input_is_refused_and_nothing_is_lost(world: World, alice: Path) -> None:
    intact = _rebuild(world, alice)
    assert f"audit chain intact: {world.size} entries" in intact  # an intact log is left as it is
    # Without --from-peers it is the local rebuild: an intact log is left alone too,
    # and the mirror options are refused without it.
    assert "nothing to rebuild" in CLI.ok(alice, "audit", "rebuild")
    usage = CLI.fails(alice, 2, "audit", "rebuild", "--mirror", world.bob.agent_id)
    assert "--mirror goes with --from-peers" in usage.stderr
    bad = CLI.fails(alice, 2, "audit", "rebuild", "--from-peers", "--mirror", "not-an-id")
    assert "is not an agent id" in bad.stderr
    lonely = alice.parent / "lonely"
    CLI.ok(lonely, "init", "--name", "lonely", "--no-passphrase")
    none = CLI.fails(lonely, 1, "audit", "rebuild", "--from-peers")
    assert "no mirror known" in none.stderr
    running = world.launcher.agent(alice, "--offline")
    try:
        busy = CLI.fails(alice, 1, "audit", "rebuild", "--from-peers")
        assert "is running" in busy.stderr
    finally:
        running.stop()
    bad_mirror = CLI.fails(alice, 1, "run", "--offline", "--audit-mirror", "nobody")
    assert "mirror_to" in bad_mirror.stderr
    bad_origin = CLI.fails(alice, 1, "run", "--offline", "--audit-mirror-for", "nobody")
    assert "mirror_for" in bad_origin.stderr
    bad_quota = CLI.fails(alice, 2, "run", "--offline", "--mirror-quota-mb", "-1")
    assert "--mirror-quota-mb" in bad_quota.stderr
    assert not list(alice.glob("audit.damaged-*"))
    with AuditLog.open(alice / "audit", readonly=True) as log:
        assert log.root_at(world.size) == world.root


# -- bad input to a running mirror ---------------------------------------------------------


async def _exchange(
    identity: Identity, mirror: AgentProcess, frames: list[bytes]
) -> list[mirror_bodies.Body]:
    """Send ``frames`` to ``mirror`` on one link; the MIRROR answers, one per frame."""
    answers: asyncio.Queue[mirror_bodies.Body] = asyncio.Queue()

    async def on_frame(link: Link, frame: bytes) -> None:
        envelope = wire.decode(frame)
        if envelope.type is wire.EnvelopeType.MIRROR:
            opened = envelope._envelope
            assert opened.mirror_kind is not None
            answers.put_nowait(mirror_bodies.decode_body(opened.mirror_kind, opened.mirror_body))

    transport = Transport(on_frame)
    try:
        link = await transport.connect(mirror.endpoint)
        got = []
        for frame in frames:
            await link.send(frame)
            got.append(await asyncio.wait_for(answers.get(), 15))
        return got
    finally:
        await transport.close()


_SEEDS = itertools.count(1)


def _frame(
    identity: Identity,
    to: str,
    kind: mirror_bodies.MirrorKind,
    body: bytes,
    *,
    ts: int | None = None,
) -> bytes:
    rng = SeededRng(next(_SEEDS))
    envelope = wire.Envelope(
        type=wire.EnvelopeType.MIRROR,
        message_id=wire.new_message_id(rng),
        sender=identity.agent_id,
        sender_instance=wire.new_instance_id(rng),
        recipient=to,
        timestamp_ms=int(time.time() * 1000) if ts is None else ts,
        mirror_kind=kind,
        mirror_body=body,
    )
    return wire.seal(envelope, identity.signing_key)


def test_bad_mirror_envelopes_are_refused_and_nothing_is_lost(world: World) -> None:
    alice = AgentHome(world.alice).load_identity(passphrase=None)
    bob = world.bob.agent_id
    fetch = mirror_bodies.encode_body(mirror_bodies.Fetch(0, 4))
    fresh = _frame(alice, bob, mirror_bodies.MirrorKind.FETCH, fetch)
    with AuditLog.open(world.alice / "audit", readonly=True) as log:
        entries = tuple(e.to_bytes() for e in log.entries(world.size - 2, world.size))
        root = log.root()
    forged_signer = LogSigner(SigningKey(bytes(32)), alice.agent_id, f"{alice.agent_id}/audit")
    forged = mirror_bodies.Batch(
        world.size - 2, entries, Checkpoint.sign(forged_signer, world.size, root)
    )
    answers = asyncio.run(
        _exchange(
            alice,
            world.bob,
            [
                _frame(alice, bob, mirror_bodies.MirrorKind.FETCH, b"\xa1av\x01"),
                fresh,
                fresh,  # the same FETCH again: a replay
                _frame(alice, bob, mirror_bodies.MirrorKind.FETCH, fetch, ts=1),
                _frame(
                    alice, bob, mirror_bodies.MirrorKind.BATCH, mirror_bodies.encode_body(forged)
                ),
            ],
        )
    )
    malformed, served, replayed, stale, bad_checkpoint = answers
    assert isinstance(malformed, mirror_bodies.Refused)
    assert malformed.code is mirror_bodies.RefusalCode.MALFORMED
    assert isinstance(served, mirror_bodies.Entries)
    assert served.held == world.size
    assert isinstance(replayed, mirror_bodies.Refused)
    assert replayed.code is mirror_bodies.RefusalCode.STALE
    assert isinstance(stale, mirror_bodies.Refused)
    assert stale.code is mirror_bodies.RefusalCode.STALE
    assert isinstance(bad_checkpoint, mirror_bodies.Refused)
    assert bad_checkpoint.code is mirror_bodies.RefusalCode.BAD_CHECKPOINT
    # ... each counted on bob's /metrics (as the mirror).
    port = world.bob_metrics
    served_before = _metric(port, "talos_audit_mirror_entries_served_total")  # rebuilds served too
    whole = mirror_bodies.encode_body(mirror_bodies.Fetch(0, 128))
    (all_of_it,) = asyncio.run(
        _exchange(alice, world.bob, [_frame(alice, bob, mirror_bodies.MirrorKind.FETCH, whole)])
    )
    assert isinstance(all_of_it, mirror_bodies.Entries)
    assert all_of_it.entries
    served = _metric(port, "talos_audit_mirror_entries_served_total")
    assert served - served_before == len(all_of_it.entries)
    assert _metric(port, "talos_audit_mirror_fetches_refused_total") >= 2
    refused = 'talos_audit_mirror_batches_refused_total{{code="{}"}}'
    assert _metric(port, refused.format("malformed")) >= 1
    assert _metric(port, refused.format("bad_checkpoint")) >= 1
    signature = 'talos_signature_failures_by_object_total{object="mirror_batch"}'
    assert _metric(port, signature) >= 1
    # Another agent asking gets only its own entries (none), never alice's.
    carol = AgentHome(world.carol.home).load_identity(passphrase=None)
    (other,) = asyncio.run(
        _exchange(carol, world.bob, [_frame(carol, bob, mirror_bodies.MirrorKind.FETCH, fetch)])
    )
    assert isinstance(other, mirror_bodies.Entries)
    assert (other.held, other.entries) == (0, ())
    # Bob still holds alice's whole log, and still serves it.
    log_text = world.bob.log.read_text()
    assert "mirror_malformed" in log_text
    assert "mirror_fetch_refused" in log_text
    (again,) = asyncio.run(
        _exchange(alice, world.bob, [_frame(alice, bob, mirror_bodies.MirrorKind.FETCH, fetch)])
    )
    assert isinstance(again, mirror_bodies.Entries)
    assert again.held == world.size


def test_only_listed_origins_are_mirrored_and_replayed_batches_are_refused(
    world: World, tmp_path: Path
) -> None:
    alice = AgentHome(world.alice).load_identity(passphrase=None)
    bob = world.bob.agent_id
    # carol signs a valid batch of her own log, but bob's operator never listed her.
    carol = AgentHome(world.carol.home).load_identity(passphrase=None)
    signer = LogSigner(carol.signing_key, carol.agent_id, f"{carol.agent_id}/audit")
    with AuditLog.open(tmp_path / "carol-log", signer=signer) as log:
        log.append_many([("MESSAGE_SENT", {"n": n}, "peer") for n in range(3)])
        own = tuple(e.to_bytes() for e in log.entries(0, 3))
        squat = mirror_bodies.Batch(0, own, Checkpoint.sign(signer, 3, log.root_at(3)), b"c" * 16)
    (refused,) = asyncio.run(
        _exchange(
            carol,
            world.bob,
            [_frame(carol, bob, mirror_bodies.MirrorKind.BATCH, mirror_bodies.encode_body(squat))],
        )
    )
    assert isinstance(refused, mirror_bodies.Refused)
    assert refused.code is mirror_bodies.RefusalCode.NOT_MIRRORING
    assert "--audit-mirror-for" in refused.reason
    assert refused.request == b"c" * 16  # the answer names the request it answers
    # A batch of alice's (listed) is answered with its request id; the same frame
    # replayed, or one signed long ago, is refused stale (echoing its id).
    with AuditLog.open(world.alice / "audit", readonly=True) as log:
        tail = tuple(e.to_bytes() for e in log.entries(world.size - 2, world.size))
        root = log.root_at(world.size)
    checkpoint = Checkpoint.sign(
        LogSigner(alice.signing_key, alice.agent_id, f"{alice.agent_id}/audit"), world.size, root
    )
    batch = mirror_bodies.encode_body(
        mirror_bodies.Batch(world.size - 2, tail, checkpoint, b"a" * 16)
    )
    fresh = _frame(alice, bob, mirror_bodies.MirrorKind.BATCH, batch)
    old = _frame(alice, bob, mirror_bodies.MirrorKind.BATCH, batch, ts=1)
    acked, replayed, stale = asyncio.run(_exchange(alice, world.bob, [fresh, fresh, old]))
    assert isinstance(acked, mirror_bodies.Ack)
    assert (acked.size, acked.request) == (world.size, b"a" * 16)
    for answer in (replayed, stale):
        assert isinstance(answer, mirror_bodies.Refused)
        assert (answer.code, answer.request) == (mirror_bodies.RefusalCode.STALE, b"a" * 16)
    assert "not_mirroring" in world.bob.log.read_text()
    with MirrorStore.open(world.bob.home / "mirrors") as store:
        assert store.origin(carol.agent_id).size == 0  # nothing of carol's was stored
        assert store.origin(alice.agent_id).size == world.size


def test_a_mirror_keeps_an_origin_within_its_quota(world: World, tmp_path: Path) -> None:
    """frank mirrors erin with a 1 MiB quota; erin's log is larger. frank stores whole
    batches up to the quota and refuses the rest (`quota`), counted on both sides."""
    erin_home = tmp_path / "erin"
    erin_id = CLI.ok(erin_home, "init", "--name", "erin", "--no-passphrase").strip()
    identity = AgentHome(erin_home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, erin_id, f"{erin_id}/audit")
    with AuditLog.open(erin_home / "audit", signer=signer, block_entries=64) as log:
        pad = {"a": "x" * 500, "b": "y" * 500}  # about 1 KiB an entry: 1200 are past 1 MiB
        log.append_many([("MESSAGE_SENT", {"n": n, **pad}, "peer") for n in range(1200)])
        log.seal_block()
    ports = free_port(), free_port()
    frank = world.launcher.agent(
        tmp_path / "frank", "--name", "frank", "--registry", world.registry.url,
        "--audit-mirror-for", erin_id, "--mirror-quota-mb", "1", "--metrics-port", str(ports[1]),
    )  # fmt: skip
    erin = world.launcher.agent(
        erin_home, "--registry", world.registry.url, "--metrics-port", str(ports[0]),
        "--audit-mirror", frank.agent_id,
    )  # fmt: skip
    refused = 'talos_audit_mirror_refused_by_peer_total{code="quota"}'
    wait_until(lambda: _metric(ports[0], refused) >= 1.0, 60, what="frank's quota refusal")
    assert _metric(ports[1], 'talos_audit_mirror_batches_refused_total{code="quota"}') >= 1.0
    lag = f'talos_audit_mirror_lag_entries{{mirror="{frank.agent_id}"}}'
    assert _metric(ports[0], lag) > 0  # what a rebuild from frank would lose
    erin.stop()
    frank.stop()
    assert "quota" in erin.log.read_text()
    with MirrorStore.open(frank.home / "mirrors") as store:
        held = store.origin(erin_id)
    assert 0 < held.size < 1200
    assert held.used <= 1 << 20  # within the quota, never past it
    assert _acked(erin_home, frank.agent_id) == held.size  # whole batches, acknowledged


# -- the origin's side: resuming, a mirror that lost its store, one that refuses ---------------
# (last in this module: they grow what bob holds of alice's log)


def _metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else math.nan


def test_mirroring_resumes_where_it_stopped_and_refusals_are_reported(
    world: World, alice: Path, tmp_path: Path
) -> None:
    dave = world.launcher.agent(
        tmp_path / "dave", "--name", "dave", "--registry", world.registry.url,
        "--mirror-quota-mb", "0",
    )  # fmt: skip
    _append(alice, 5, first=world.size)
    assert _acked(alice, world.bob.agent_id) == world.size  # persisted: resumes from here
    port = free_port()
    bob = world.bob.agent_id
    agent = world.launcher.agent(
        alice, "--registry", world.registry.url, "--metrics-port", str(port),
        "--audit-mirror", bob, "--audit-mirror", dave.agent_id,
    )  # fmt: skip
    wait_until(lambda: _acked(alice, bob) >= world.size + 5, 60, what="the 5 new entries mirrored")
    # The acknowledged size was kept across the restart (checked before the start,
    # below): the new entries went in batches of their own. (How many depends on the
    # cosignatures that arrive meanwhile, each an entry too.)
    assert _metric(port, "talos_audit_mirror_batches_sent_total") >= 1.0
    lag = f'talos_audit_mirror_lag_entries{{mirror="{bob}"}}'
    wait_until(lambda: _metric(port, lag) == 0.0, 30, what="bob's lag at 0")
    refused = 'talos_audit_mirror_refused_by_peer_total{code="not_mirroring"}'
    wait_until(lambda: _metric(port, refused) >= 1.0, 30, what="dave's refusal counted")
    assert "mirror_batch_refused" in agent.log.read_text()
    assert _metric(port, f'talos_audit_mirror_lag_entries{{mirror="{dave.agent_id}"}}') > 0
    agent.stop()
    dave.stop()
    # bob loses his mirror store: alice's next batch is refused as a gap, and she
    # sends her whole log again.
    world.bob.stop()
    shutil.rmtree(world.bob.home / "mirrors")
    world.bob = world.launcher.agent(
        world.bob.home,
        *("--registry", world.registry.url, "--audit-mirror-for", world.alice_id),
        *("--metrics-port", str(world.bob_metrics)),
    )
    _append(alice, 1, first=world.size + 5)
    target = _head(alice)[0]
    agent = world.launcher.agent(alice, "--registry", world.registry.url, "--audit-mirror", bob)
    try:
        wait_until(lambda: "gap" in agent.log.read_text(), 60, what="bob's gap refusal")
        wait_until(lambda: _acked(alice, bob) >= target, 60, what="alice's log sent again")
    finally:
        agent.stop()
    acked = _acked(alice, bob)
    with MirrorStore.open(world.bob.home / "mirrors") as store:
        assert store.origin(agent.agent_id).size == acked
