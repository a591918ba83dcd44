"""What `talos audit rebuild --from-peers` trusts, with real processes (issue 16).

alice mirrors her log to bob (who also witnesses it) and has carol as a
witness (``--audit-witness``). The rebuilt log must match the head each
witness cosigned (asked over the witness exchange), a copy that contradicts
a witness is named and refused, a rebuild with no witness nor anchor is
refused unless ``--accept-unwitnessed``, and after a key rotation a copy
whose newest checkpoint is signed by the rotated-away key is refused.
Every refusal changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from talos.audit import AuditLog, LogSigner
from talos.audit.mirror_store import MirrorStore
from talos.client.head_answers import HEAD_QUERY_BURST
from talos.client.head_queries import WitnessAnswers, ask_witnesses
from talos.client.mirror_fetch import MemoryPeerCache
from talos.core.audit.cosignature import WitnessedHead
from talos.core.audit.entry import AuditKind
from talos.discovery.registry_client import RegistryClient
from talos.peers import PeerDirectory, RegistrySource
from talos.storage.home import AgentHome
from talos.storage.tokens import TokenStore
from talos.system import SystemClock, SystemRng
from talos.testing.cli import TalosCli
from talos.testing.processes import AgentProcess, Launcher, RegistryProcess, free_port, launched
from talos.testing.waiting import wait_until

CLI = TalosCli(timeout=120.0)


def _append(home: Path, count: int) -> None:
    identity = AgentHome(home).load_identity(passphrase=None)
    signer = LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")
    with AuditLog.open(home / "audit", signer=signer, block_entries=16) as log:
        log.append_many([("MESSAGE_SENT", {"n": n}, "peer") for n in range(count)])
        log.seal_block()


def _size(home: Path) -> int:
    with AuditLog.open(home / "audit", readonly=True) as log:
        return log.size


def _cosigned_by(home: Path, witness: str) -> bool:
    with AuditLog.open(home / "audit", readonly=True) as log:
        return any(e.peer == witness for e in log.query(kind=AuditKind.CHECKPOINT_COSIGNED))


def _acked(home: Path, mirror: str) -> int:
    with MirrorStore.open(home / "mirrors") as store:
        return store.progress(mirror)


@dataclass
class World:
    launcher: Launcher
    registry: RegistryProcess
    alice: Path
    alice_id: str
    bob: AgentProcess
    carol: AgentProcess
    #: carol's /metrics port (kept across her restarts).
    carol_metrics: int

    def run_alice(self) -> AgentProcess:
        return self.launcher.agent(
            self.alice, "--registry", self.registry.url,
            "--audit-mirror", self.bob.agent_id, "--audit-witness", self.carol.agent_id,
        )  # fmt: skip

    def settle(self) -> None:
        """Until bob holds all of alice's log, twice in a row (cosignatures are entries)."""
        for _ in range(2):
            wait_until(
                lambda: _acked(self.alice, self.bob.agent_id) == _size(self.alice),
                60,
                what="alice's whole log mirrored to bob",
            )
            time.sleep(1.5)  # a cosignature arriving late would show here

    def restart(self, who: str) -> None:
        getattr(self, who).stop()
        self.restart_stopped(who)

    def restart_stopped(self, who: str) -> None:
        agent = getattr(self, who)
        mirroring = ("--audit-mirror-for", self.alice_id) if who == "bob" else ()
        if who == "carol":
            mirroring = ("--metrics-port", str(self.carol_metrics))
        setattr(
            self, who, self.launcher.agent(agent.home, "--registry", self.registry.url, *mirroring)
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("trust")
    with launched() as launcher:
        registry = launcher.registry(base / "registry.db", base / "registry.log")
        homes = {name: base / name for name in ("alice", "bob", "carol")}
        ids = {
            name: CLI.ok(home, "init", "--name", name, "--no-passphrase").strip()
            for name, home in homes.items()
        }
        _append(homes["alice"], 40)
        bob = launcher.agent(
            homes["bob"], "--registry", registry.url, "--audit-mirror-for", ids["alice"]
        )
        port = free_port()
        carol = launcher.agent(
            homes["carol"], "--registry", registry.url, "--metrics-port", str(port)
        )
        world = World(launcher, registry, homes["alice"], ids["alice"], bob, carol, port)
        alice = world.run_alice()
        wait_until(lambda: _cosigned_by(homes["alice"], carol.agent_id), 60, what="carol cosigns")
        world.settle()
        alice.stop()
        yield world


@pytest.fixture
def alice(world: World, tmp_path: Path) -> Path:
    """A copy of alice's home, its audit database deleted (the disk died)."""
    copy = tmp_path / "alice"
    shutil.copytree(world.alice, copy)
    (copy / "audit" / "data.mdb").unlink()
    return copy


def _rebuild(world: World, home: Path, *args: str, fails: bool = False) -> str:
    argv = ("audit", "rebuild", "--from-peers", "--registry", world.registry.url, *args)
    if fails:
        return CLI.fails(home, 1, *argv).stderr
    return CLI.ok(home, *argv)


def _untouched(home: Path) -> None:
    assert not list(home.glob("audit.damaged-*"))
    assert not (home / "audit" / "data.mdb").exists()


def _held(witness: AgentProcess, origin: str) -> bytes:
    with TokenStore.open(witness.home / "capabilities") as tokens:
        held = tokens.witnessed(origin)
    assert held is not None
    return held


def _set_held(world: World, who: str, origin: str, record: bytes) -> None:
    agent: AgentProcess = getattr(world, who)
    agent.stop()
    with TokenStore.open(agent.home / "capabilities") as tokens:
        tokens.put_witnessed(origin, record)
    world.restart_stopped(who)


def test_the_rebuilt_log_matches_the_heads_the_witnesses_cosigned(
    world: World, alice: Path
) -> None:
    carol = world.carol.agent_id
    out = _rebuild(world, alice, "--witness", carol)
    held = WitnessedHead.from_bytes(_held(world.carol, world.alice_id))
    line = f"trust root: witness {carol}'s cosigned head at {held.size} entries, root "
    assert line + f"{held.root.hex()}: matches" in out
    assert f"witness {world.bob.agent_id}'s cosigned head" in out  # the mirror witnessed too
    with AuditLog.open(alice / "audit", readonly=True) as log:
        assert log.root_at(held.size) == held.root
    (entry,) = json.loads(CLI.ok(alice, "audit", "query", "--type", "MIRROR_REBUILT", "--json"))
    assert carol in entry["data"]["witnesses"]
    assert "unwitnessed" not in entry["data"]
    assert "witness_head_served" in world.carol.log.read_text()


def test_a_copy_that_contradicts_a_witness_is_named_and_nothing_changes(
    world: World, alice: Path
) -> None:
    carol = world.carol.agent_id
    original = _held(world.carol, world.alice_id)
    held = WitnessedHead.from_bytes(original)
    forged = WitnessedHead(held.size, bytes(32), held.note, held.accepted_ms, held.sent_ms)
    _set_held(world, "carol", world.alice_id, forged.to_bytes())  # carol saw another head
    try:
        refused = _rebuild(world, alice, "--witness", carol, fails=True)
    finally:
        _set_held(world, "carol", world.alice_id, original)
    assert f"mirror {world.bob.agent_id}: INVALID" in refused
    assert f"witness {carol}'s cosigned head vouches for" in refused
    assert "nothing was changed" in refused
    _untouched(alice)


def test_without_any_witness_or_anchor_the_rebuild_needs_accept_unwitnessed(
    world: World, alice: Path
) -> None:
    original = _held(world.bob, world.alice_id)
    _set_held(world, "bob", world.alice_id, b"not a head")  # bob's witness record is unusable
    world.carol.stop()  # and carol is unreachable
    try:
        refused = _rebuild(world, alice, "--witness", world.carol.agent_id, fails=True)
        assert f"witness {world.bob.agent_id}: unusable" in refused
        assert f"witness {world.carol.agent_id}: unusable" in refused
        assert "UNWITNESSED" in refused
        assert "--accept-unwitnessed" in refused
        _untouched(alice)
        out = _rebuild(world, alice, "--accept-unwitnessed")
        assert "UNWITNESSED" in out
    finally:
        world.restart("carol")
        _set_held(world, "bob", world.alice_id, original)
    (entry,) = json.loads(CLI.ok(alice, "audit", "query", "--type", "MIRROR_REBUILT", "--json"))
    assert entry["data"]["unwitnessed"] is True
    CLI.ok(alice, "audit", "verify-chain")


def test_cosignatures_kept_in_a_damaged_log_are_trust_roots(world: World, tmp_path: Path) -> None:
    damaged = tmp_path / "alice"
    shutil.copytree(world.alice, damaged)
    data = damaged / "audit" / "data.mdb"
    with AuditLog.open(damaged / "audit", readonly=True) as log:
        last = log.entry(log.size - 1).to_bytes()
        kept = [e for e in log.query(kind=AuditKind.CHECKPOINT_COSIGNED) if e.seq < log.size - 1]
    assert kept  # the intact prefix holds cosignatures
    raw = bytearray(data.read_bytes())
    raw[raw.index(last) + 10] ^= 0x10  # the last entry is damaged, the rest intact
    data.write_bytes(bytes(raw))
    original = _held(world.bob, world.alice_id)
    _set_held(world, "bob", world.alice_id, b"not a head")
    world.carol.stop()  # no witness answers: only the kept cosignatures vouch
    try:
        out = _rebuild(world, damaged, "--witness", world.carol.agent_id)
    finally:
        world.restart("carol")
        _set_held(world, "bob", world.alice_id, original)
    assert "cosignature kept locally" in out
    assert "UNWITNESSED" not in out
    newest = max(kept, key=lambda entry: entry.data["size"])
    assert f"{newest.peer}'s cosignature kept locally at {newest.data['size']} entries" in out


async def _ask(world: World, asker: Path, witness: str) -> WitnessAnswers:
    identity = AgentHome(asker).load_identity(passphrase=None)
    clock = SystemClock()
    registry = RegistryClient([world.registry.url], clock=clock)
    try:
        directory = PeerDirectory(
            MemoryPeerCache(), [RegistrySource(registry)], clock=clock, own=identity.keylog
        )
        return await ask_witnesses(identity, [witness], directory, clock=clock, rng=SystemRng())
    finally:
        await registry.aclose()


def _head_queries(world: World, outcome: str) -> float:
    """carol's ``talos_audit_witness_head_queries_total{outcome}``, scraped."""
    return _scraped(world, f'talos_audit_witness_head_queries_total{{outcome="{outcome}"}}')


def _scraped(world: World, name: str) -> float:
    """One sample of carol's /metrics, by its name and labels."""
    text = httpx.get(f"http://127.0.0.1:{world.carol_metrics}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not exported"
    return float(match.group(1))


def test_a_witness_answers_a_head_query_only_about_the_sender_s_own_log(world: World) -> None:
    carol = world.carol.agent_id
    before = _held(world.carol, world.alice_id)
    answered, no_head = _head_queries(world, "answered"), _head_queries(world, "no_head")
    (head,) = asyncio.run(_ask(world, world.alice, carol)).heads
    held = WitnessedHead.from_bytes(before)
    assert (head.witness, head.size, head.root) == (carol, held.size, held.root)
    # bob asks about his own log, which carol never witnessed: nothing to vouch for.
    other = asyncio.run(_ask(world, world.bob.home, carol))
    assert other.heads == []
    ((who, why),) = other.unusable
    assert who == carol
    assert "no_head" in why
    assert _held(world.carol, world.alice_id) == before  # a query stores nothing
    # Counted on the witness, by outcome (the answer is sent after the count).
    assert _head_queries(world, "answered") == answered + 1
    assert _head_queries(world, "no_head") == no_head + 1
    assert _head_queries(world, "rate_limited") == 0


def test_head_queries_have_their_own_rate_limit(world: World) -> None:
    """bob asks carol about his own log (which she never witnessed) more often than the
    burst: the query past it is refused ``rate_limited``, counted as a head query refused
    (not as a refused checkpoint: nothing was submitted), and nothing stored."""
    limited = _head_queries(world, "rate_limited")
    checkpoints = 'talos_audit_checkpoints_refused_total{reason="rate_limited"}'
    refused = _scraped(world, checkpoints)
    before = _held(world.carol, world.alice_id)
    reasons: list[str] = []
    while len(reasons) <= HEAD_QUERY_BURST and not any("rate" in why for why in reasons):
        ((_, why),) = asyncio.run(_ask(world, world.bob.home, world.carol.agent_id)).unusable
        reasons.append(why)
    assert all("holds no head of our log (no_head)" in why for why in reasons[:-1])
    assert reasons[-1] == "refused: rate_limited"  # (bob may have asked before)
    assert _head_queries(world, "rate_limited") == limited + 1
    assert _scraped(world, checkpoints) == refused
    assert "witness_head_query_refused" in world.carol.log.read_text()
    assert _held(world.carol, world.alice_id) == before
    # alice's own queries are not limited by bob's.
    (head,) = asyncio.run(_ask(world, world.alice, world.carol.agent_id)).heads
    assert head.witness == world.carol.agent_id


def test_bad_trust_options_are_refused(world: World, alice: Path) -> None:
    bad = CLI.fails(alice, 2, "audit", "rebuild", "--from-peers", "--witness", "nobody")
    assert "is not an agent id" in bad.stderr
    usage = CLI.fails(alice, 2, "audit", "rebuild", "--accept-unwitnessed")
    assert "--accept-unwitnessed goes with --from-peers" in usage.stderr
    _untouched(alice)


# -- last: a real key rotation (alice's log grows) ---------------------------------------------


def test_after_a_rotation_a_copy_ending_on_the_old_key_is_refused(
    world: World, tmp_path: Path
) -> None:
    bob = world.bob
    bob.stop()
    before = tmp_path / "bob-mirrors-before-rotation"
    shutil.copytree(bob.home / "mirrors", before)
    world.restart_stopped("bob")
    agent = world.run_alice()
    try:
        assert CLI.ok(world.alice, "rotate").startswith("rotated ")
        world.settle()  # the rotation's entries reach bob under a checkpoint by the new key
    finally:
        agent.stop()

    # bob's copy as it is now ends on a checkpoint by the current key: rebuilt.
    fresh = tmp_path / "alice-now"
    shutil.copytree(world.alice, fresh)
    (fresh / "audit" / "data.mdb").unlink()
    assert "rebuilt" in _rebuild(world, fresh, "--mirror", world.bob.agent_id)

    # bob serves the copy he held before the rotation: it ends on the old key.
    world.bob.stop()
    shutil.move(world.bob.home / "mirrors", tmp_path / "bob-mirrors-after")
    shutil.copytree(before, world.bob.home / "mirrors")
    world.restart_stopped("bob")
    stale = tmp_path / "alice-stale"
    shutil.copytree(world.alice, stale)
    (stale / "audit" / "data.mdb").unlink()
    refused = _rebuild(world, stale, "--mirror", world.bob.agent_id, fails=True)
    assert f"mirror {world.bob.agent_id}: REFUSED" in refused
    assert "rotated away" in refused
    assert "nothing was changed" in refused
    _untouched(stale)
