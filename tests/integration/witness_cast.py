"""Shared cast for the witness tests: agents with witness options, forged checkpoint
frames signed with an agent's real key, and a stranger's link that reads the answer.

Used by test_witnesses.py, test_witness_limits.py and test_equivocation_alert.py,
which import the fixtures below by name (``registry``, ``launcher``, ``cast``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rotation_cast import Peer, ok
from websockets.asyncio.client import connect

from talos.client.own_keys import audit_signer
from talos.core import wire
from talos.core.audit.checkpoint import Checkpoint
from talos.core.identity import Identity
from talos.system import SystemClock
from talos.testing import SeededRng
from talos.testing.processes import Launcher, RegistryProcess, launched


@dataclasses.dataclass
class WitnessPeer(Peer):
    """A :class:`Peer` with the witness records of its audit log at hand."""

    def cosigned(self, by: Peer) -> list[dict[str, Any]]:
        """Our CHECKPOINT_COSIGNED entries from witness ``by``."""
        return [e for e in self.audit("CHECKPOINT_COSIGNED") if e["peer"] == by.agent_id]

    def equivocations(self) -> list[dict[str, Any]]:
        return self.audit("AUDIT_EQUIVOCATION")

    def log_text(self) -> str:
        assert self.process is not None
        return self.process.log.read_text(errors="replace")

    def copy_home(self, dest: Path) -> None:
        """A copy of the (stopped) home, as a backup of the whole directory would be."""
        shutil.copytree(self.home, dest)

    def put_home_back(self, copy: Path) -> None:
        """Replace the (stopped) home with an earlier copy (the damaged one moved aside)."""
        self.home.rename(self.home.with_name(self.home.name + ".moved-aside"))
        shutil.copytree(copy, self.home)


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    """Starts agents; stops every one still running after the test."""
    with launched() as started:
        yield started


@pytest.fixture
def cast(
    tmp_path: Path, registry: RegistryProcess, launcher: Launcher
) -> Callable[..., WitnessPeer]:
    """``cast(name, *options)``: a new agent home (initialised, not started) under
    ``tmp_path``, its ``talos run`` given ``options``."""

    def make(name: str, *extra: str) -> WitnessPeer:
        peer = WitnessPeer(tmp_path / name, registry, launcher, extra=extra)
        return peer.init(name)  # type: ignore[return-value]

    return make


def checkpoint_frame(
    sender: Identity,
    recipient: str,
    checkpoint: Checkpoint,
    *,
    old: int = 0,
    proof: tuple[bytes, ...] = (),
    note: bytes | None = None,
    sent_ms: int | None = None,
) -> bytes:
    """A CHECKPOINT envelope from ``sender`` (signed with its real current key)."""
    rng = SeededRng(int.from_bytes(checkpoint.root[:4], "big"))
    return wire.seal(
        wire.Envelope(
            type=wire.EnvelopeType.CHECKPOINT,
            message_id=wire.new_message_id(rng),
            sender=sender.agent_id,
            sender_instance=wire.new_instance_id(rng),
            recipient=recipient,
            timestamp_ms=int(SystemClock().time() * 1000) if sent_ms is None else sent_ms,
            checkpoint_note=checkpoint.to_text().encode() if note is None else note,
            old_size=old,
            consistency=proof,
        ),
        sender.signing_key,
    )


def signed_checkpoint(identity: Identity, size: int, root: bytes) -> Checkpoint:
    """A checkpoint of ``identity``'s audit log, signed as the agent signs its own."""
    return Checkpoint.sign(audit_signer(identity), size, root)


async def _exchange(url: str, frame: bytes, within: float) -> list[wire.Envelope]:
    answers: list[wire.Envelope] = []
    async with connect(url, proxy=None, open_timeout=5, max_size=wire.MAX_FRAME_SIZE) as socket:
        await socket.send(frame)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        with contextlib.suppress(TimeoutError):
            while loop.time() < deadline:
                raw = await asyncio.wait_for(socket.recv(), deadline - loop.time())
                envelope = wire.decode(raw if isinstance(raw, bytes) else raw.encode())._envelope
                answers.append(envelope)
                if envelope.type is wire.EnvelopeType.COSIGNATURE:
                    break
    return answers


def cosignature_answer(url: str, frame: bytes, *, within: float = 10.0) -> wire.Envelope | None:
    """Send ``frame`` on a new link to ``url``; the COSIGNATURE answered on it, if any
    (the witness's own offers on the link are skipped)."""
    answers = asyncio.run(_exchange(url, frame, within))
    found = [e for e in answers if e.type is wire.EnvelopeType.COSIGNATURE]
    return found[0] if found else None


def audit_size(peer: Peer) -> int:
    """The size of a peer's audit log (read beside the running agent)."""
    last = json.loads(ok(peer.home, "audit", "query", "--last", "1", "--json"))
    return int(last[-1]["seq"]) + 1 if last else 0
