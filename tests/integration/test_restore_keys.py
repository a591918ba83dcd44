"""A restore or rebuild never rewinds keys: real agents, a wiretap, and old frames replayed.

alice and bob talk through two relays that copy every frame in both
directions (what an attacker on the path sees). alice's audit log is backed
up mid-conversation, the conversation goes on, then the log is restored
from that backup (or rebuilt after damage) and the conversation goes on
again. The wiretap's copies must show that no ratchet message key was used
twice: no two different messages from alice carry the same ratchet key and
message number (the AES-GCM key and nonce derive from them). Every frame
bob sent before the restore, injected again into alice, must be refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, WebSocketException

from talos.audit import AuditLog
from talos.audit.mirror_store import MirrorStore
from talos.core import wire
from talos.core.crypto import VerifyKey
from talos.demo.wiretap import inject
from talos.storage.home import AgentHome
from talos.storage.lmdb import u64
from talos.testing.cli import TalosCli
from talos.testing.damage import flip_stored_bit
from talos.testing.processes import AgentProcess, RegistryProcess, free_port, launched
from talos.testing.processes import registry_process as _registry_process
from talos.testing.waiting import wait_until

pytestmark = pytest.mark.slow

CLI = TalosCli()
_WS: dict[str, Any] = {"compression": None, "max_size": wire.MAX_FRAME_SIZE}


def ok(home: Path, *args: str) -> str:
    return CLI.ok(home, *args).strip()


class Tap:
    """A relay on ``port`` to ``upstream`` keeping a copy of every frame, both directions."""

    def __init__(self, port: int, upstream: str) -> None:
        self.port, self.upstream = port, upstream
        self.frames: list[bytes] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    def __enter__(self) -> Tap:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._relay, "127.0.0.1", self.port, **_WS):
            self._ready.set()
            await self._stop.wait()

    async def _relay(self, down: ServerConnection) -> None:
        with contextlib.suppress(OSError, TimeoutError, WebSocketException):
            async with connect(self.upstream, proxy=None, open_timeout=5, **_WS) as up:
                pumps = {asyncio.create_task(self._pump(a, b)) for a, b in ((down, up), (up, down))}
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def _pump(self, source: Any, sink: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in source:
                if isinstance(frame, bytes):
                    self.frames.append(frame)
                await sink.send(frame)
        with contextlib.suppress(ConnectionClosed):
            await sink.close()


def _messages(frames: list[bytes], sender: str, key: VerifyKey) -> list[wire.Envelope]:
    """The MESSAGE and INITIAL envelopes ``sender`` sent, verified, in the order seen."""
    seen: list[wire.Envelope] = []
    for frame in frames:
        envelope = wire.decode(frame)
        if envelope.sender == sender and envelope.type in (
            wire.EnvelopeType.MESSAGE,
            wire.EnvelopeType.INITIAL,
        ):
            seen.append(wire.verify(envelope, key))
    return seen


def _reused_keys(envelopes: list[wire.Envelope]) -> dict[tuple[bytes, int], set[bytes]]:
    """(ratchet key, message number) pairs carried by more than one message id."""
    ids: dict[tuple[bytes, int], set[bytes]] = {}
    for envelope in envelopes:
        header = envelope.ratchet_header
        ratchet_key, number = header[:32], struct.unpack(">I", header[36:40])[0]
        ids.setdefault((ratchet_key, number), set()).add(envelope.message_id)
    return {pair: found for pair, found in ids.items() if len(found) > 1}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with _registry_process(tmp_path_factory.mktemp("registry")) as server:
        yield server


class Pair:
    """alice and bob, each behind a tap, on fixed ports so restarts keep their addresses."""

    def __init__(self, base: Path, registry: RegistryProcess, start: Callable[..., Any]) -> None:
        self.alice_home, self.bob_home = base / "alice", base / "bob"
        self.alice_id = ok(self.alice_home, "init", "--name", "alice")
        self.bob_id = ok(self.bob_home, "init", "--name", "bob")
        self.ports = {name: (free_port(), free_port()) for name in ("alice", "bob")}
        self.registry, self._start = registry, start
        self.alice_key = AgentHome(self.alice_home).load_identity(passphrase=None).signing_key
        self.bob_key = AgentHome(self.bob_home).load_identity(passphrase=None).signing_key

    def tap(self, name: str) -> Tap:
        listen, announce = self.ports[name]
        return Tap(announce, f"ws://127.0.0.1:{listen}")

    def start(self, name: str, *extra: str) -> AgentProcess:
        listen, announce = self.ports[name]
        home = self.alice_home if name == "alice" else self.bob_home
        return self._start(  # type: ignore[no-any-return]
            home,
            *("--registry", self.registry.url, "--accept", "open"),
            *("--listen", f"127.0.0.1:{listen}", "--announce", f"127.0.0.1:{announce}"),
            *("--reconnect-interval", "1"),
            *extra,
        )

    def send(self, home: Path, peer: str, text: str) -> str:
        sent = ok(home, "send", peer, text, "--timeout", "20")
        assert sent.startswith("delivered "), sent
        return sent.split()[1]


def _inbox(home: Path) -> list[str]:
    return [m["data"] for m in json.loads(ok(home, "inbox", "--json"))]


@pytest.fixture
def start() -> Iterator[Callable[..., AgentProcess]]:
    with launched() as launcher:
        yield launcher.agent


def _mirrored(home: Path, mirror: str) -> bool:
    """Whether ``mirror`` acknowledged all of the audit log in ``home``."""
    with AuditLog.open(home / "audit", readonly=True) as log:
        size = log.size
    with MirrorStore.open(home / "mirrors") as store:
        return store.progress(mirror) == size


@pytest.mark.parametrize("recovery", ["restore", "rebuild", "from-peers"])
def test_no_key_is_used_twice_and_old_messages_stay_refused(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess], recovery: str
) -> None:
    pair = Pair(tmp_path, registry, start)
    alice_home, bob_home = pair.alice_home, pair.bob_home
    # from-peers: bob keeps a mirror of alice's log, which is rebuilt from it.
    mirroring = recovery == "from-peers"
    serve = ("--audit-mirror-for", pair.alice_id) if mirroring else ()
    send = ("--audit-mirror", pair.bob_id) if mirroring else ()
    with pair.tap("alice") as alice_tap, pair.tap("bob") as bob_tap:
        bob = pair.start("bob", *serve)
        alice = pair.start("alice", *send)
        pair.send(alice_home, pair.bob_id, "a1")
        pair.send(bob_home, pair.alice_id, "b1")
        assert _inbox(alice_home) == ["b1"]
        ok(alice_home, "audit", "backup", "--out", str(tmp_path / "backup"))
        pair.send(alice_home, pair.bob_id, "a2")
        pair.send(alice_home, pair.bob_id, "a3")
        pair.send(bob_home, pair.alice_id, "b2")
        assert _inbox(alice_home) == ["b2"]
        before = len(alice_tap.frames), len(bob_tap.frames)
        if mirroring:
            for _ in range(2):  # cosignatures are entries too: settled twice in a row
                wait_until(lambda: _mirrored(alice_home, pair.bob_id), 60, what="log mirrored")
                time.sleep(1.5)
        assert alice.stop() == 0
        if recovery == "restore":
            out = ok(alice_home, "audit", "restore", "--backup", str(tmp_path / "backup"))
        elif recovery == "rebuild":
            flip_stored_bit(alice_home / "audit", b"entries", u64(3), 40)
            out = ok(alice_home, "audit", "rebuild")
        else:
            flip_stored_bit(alice_home / "audit", b"entries", u64(3), 40)
            rebuild = ("audit", "rebuild", "--from-peers", "--registry", registry.url)
            out = ok(alice_home, *rebuild, "--accept-loss")
            assert f"mirror {pair.bob_id}: ok" in out
            assert "matches" in out  # bob's cosigned head is a trust root
        assert "agent state kept" in out
        alice = pair.start("alice", *send)
        pair.send(alice_home, pair.bob_id, "a4")
        pair.send(alice_home, pair.bob_id, "a5")
        pair.send(bob_home, pair.alice_id, "b3")
        assert _inbox(alice_home) == ["b3"]
        assert _inbox(bob_home) == ["a1", "a2", "a3", "a4", "a5"]
        frames = alice_tap.frames + bob_tap.frames
        from_alice = _messages(frames, pair.alice_id, pair.alice_key.public_key)
        assert len({e.message_id for e in from_alice}) >= 5
        assert _reused_keys(from_alice) == {}
        old = alice_tap.frames[: before[0]] + bob_tap.frames[: before[1]]
        from_bob = _messages(old, pair.bob_id, pair.bob_key.public_key)
        assert {e.message_id for e in from_bob}
        for envelope in from_bob:
            frame = next(f for f in old if wire.decode(f).message_id == envelope.message_id)
            listen = pair.ports["alice"][0]
            answer = inject(f"ws://127.0.0.1:{listen}", frame, answer_within=10)
            assert answer is not None
            ack = wire.verify(wire.decode(answer), pair.alice_key.public_key)
            assert ack.status is wire.AckStatus.DUPLICATE, ack
        wait_until(lambda: _inbox(alice_home) == [], 5.0, what="no replay reaches the inbox")
        assert bob.stop() == 0
        assert alice.stop() == 0
    ok(alice_home, "audit", "verify-chain")


@pytest.mark.parametrize("recovery", ["restore", "from-peers"])
def test_a_lost_state_is_reset_not_rolled_back(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess], recovery: str
) -> None:
    """alice's whole environment is gone: the restore (or the rebuild from bob's mirror)
    starts her state empty. Her old sessions are re-established, and bob's old frames are
    refused as stale."""
    pair = Pair(tmp_path, registry, start)
    alice_home, bob_home = pair.alice_home, pair.bob_home
    mirroring = recovery == "from-peers"
    serve = ("--audit-mirror-for", pair.alice_id) if mirroring else ()
    send = ("--audit-mirror", pair.bob_id) if mirroring else ()
    with pair.tap("alice") as alice_tap, pair.tap("bob"):
        bob = pair.start("bob", *serve)
        alice = pair.start("alice", *send)
        pair.send(alice_home, pair.bob_id, "a1")
        pair.send(bob_home, pair.alice_id, "b1")
        ok(alice_home, "audit", "backup", "--out", str(tmp_path / "backup"))
        pair.send(bob_home, pair.alice_id, "b2")
        assert _inbox(alice_home) == ["b1", "b2"]
        old = list(alice_tap.frames)
        if mirroring:
            for _ in range(2):  # cosignatures are entries too: settled twice in a row
                wait_until(lambda: _mirrored(alice_home, pair.bob_id), 60, what="log mirrored")
                time.sleep(1.5)
        assert alice.stop() == 0
        shutil.rmtree(alice_home / "audit")
        if mirroring:
            rebuild = ("audit", "rebuild", "--from-peers", "--registry", registry.url)
            out = ok(alice_home, *rebuild, "--accept-loss")
            assert "no agent state could be kept" in out
        else:
            result = CLI.run(alice_home, "audit", "restore", "--backup", str(tmp_path / "backup"))
            assert result.returncode == 0, result.stderr
            assert "no agent state was kept (there was none)" in result.stderr
        alice = pair.start("alice", *send)
        pair.send(alice_home, pair.bob_id, "a2")
        pair.send(bob_home, pair.alice_id, "b3")
        wait_until(lambda: "b3" in _inbox(alice_home), 30.0, what="bob's new message arrives")
        assert _inbox(bob_home) == ["a1", "a2"]
        from_bob = _messages(old, pair.bob_id, pair.bob_key.public_key)
        listen = pair.ports["alice"][0]
        for envelope in from_bob:
            frame = next(f for f in old if wire.decode(f).message_id == envelope.message_id)
            answer = inject(f"ws://127.0.0.1:{listen}", frame, answer_within=10)
            assert answer is not None
            refusal = wire.verify(wire.decode(answer), pair.alice_key.public_key)
            assert refusal.type is wire.EnvelopeType.ERROR, refusal
            assert refusal.error_code is wire.ErrorCode.STALE, refusal
        assert _inbox(alice_home) == []
        assert bob.stop() == 0
        assert alice.stop() == 0
