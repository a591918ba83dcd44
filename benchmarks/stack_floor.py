"""The least a durable, signed, encrypted round trip costs on this stack, and what Talos adds.

Run with ``python -m benchmarks.stack_floor [--trips N] [--store bare|audited|talos]
[--wire]``; :mod:`benchmarks.network` runs the variants in :data:`VARIANTS` in the
same run as its own round trips, so they compare.

The round-trip floor of :mod:`benchmarks.network` (four one-record commits and
two messages' crypto, summed) leaves out what no implementation on this stack
can leave out: two Python processes, an asyncio event loop in each, frames
through the ``websockets`` library over loopback TCP, the Double Ratchet's DH
step on every message of a ping-pong, and the other process's commits landing
on the same disk at the same moment. This benchmark measures a round trip
that does exactly what Talos's durability and crypto rules require, in the
least Python we could write, so what Talos adds on top of the stack is
measured rather than guessed:

- the sender derives a message key (two HMACs and an HKDF), encrypts (AES-GCM),
  **commits** the sealed message before it leaves (one 300-byte record, one
  table: the one-record floor's commit), signs the frame (Ed25519) and sends it;
- the receiver verifies the signature, takes a DH ratchet step (a new key pair,
  two X25519 exchanges, two HKDFs), decrypts, **commits** the receipt, then
  signs and sends an ACK;
- the sender verifies the ACK and **commits** the removal of the message
  before its ``send`` returns (as ``TalosClient.send`` does);
- the receiver answers the same way, and the first process's round trip ends
  when the answer is committed and its ACK sent.

So each process commits three times per round trip (queue, receipt, removal),
four of the six in series. ``--store`` says what each commit writes:

- ``bare``: one 300-byte record in one table, the one-record floor's commit;
- ``audited``: that and a hash-chained audit entry with its head row beside it
  in a second table, the least an append-only audit log in the same
  transaction writes;
- ``talos``: Talos's own agent-state commits (``AgentState.enqueue_many``,
  ``commit_receive_many``, ``remove_many``: its tables, sealing at rest, the
  audit log with its Merkle tree), called as the client calls them (the log
  here has no block signer: a block is signed once per many entries).

``--wire`` makes the frames Talos's envelopes (:mod:`talos.core.wire`: built,
canonical CBOR, signed; on receipt decoded strictly and verified) instead of
plain ``cbor2`` maps signed with Ed25519.

So ``bare`` to ``audited`` is what recording every message costs at least,
``audited`` to ``talos`` is what Talos's storage layer adds, ``--wire`` what
its envelopes add, and ``talos --wire`` to the RTT of :mod:`benchmarks.network`
is what the rest of Talos adds (the delivery machinery, the sessions'
serialization, replay and freshness checks, metrics, the benchmark
application's at-least-once acknowledgement).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2
import lmdb
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from talos.audit import AuditKind
from talos.audit.log import AuditLog
from talos.core import wire
from talos.core.agent_id import agent_id_from_digest
from talos.core.clock import time_ms
from talos.core.crypto import SigningKey
from talos.storage.agent_state import AgentState, Enqueue, InboxMessage, OutboxItem, Received
from talos.system import SYSTEM_CLOCK

CHECKOUT = Path(__file__).resolve().parents[1]
PAYLOAD = b"x" * 100
RECORD = b"r" * 300
#: What each commit writes: one record in one table; that and an audit entry beside it;
#: Talos's own agent-state commits (its tables, sealing, audit log with its tree).
STORES = ("bare", "audited", "talos")
#: What benchmarks.network runs: each store with plain frames, and Talos's commits with
#: Talos's envelopes (``--store talos --wire``).
VARIANTS = (("bare", False), ("audited", False), ("talos", False), ("talos", True))
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class Peer:
    """One side's keys, ratchet and store: the minimum each message touches."""

    def __init__(
        self, directory: Path, seed: bytes, peer_seed: bytes, *, store: str, wire: bool = False
    ) -> None:
        self.public, self.secret = crypto_sign_seed_keypair(seed)
        self.peer_public, _ = crypto_sign_seed_keypair(peer_seed)
        self.peer = agent_id_from_digest(hashlib.sha256(peer_seed).digest())
        self.me = agent_id_from_digest(hashlib.sha256(seed).digest())
        #: With ``wire``, frames are Talos's envelopes: built, encoded, signed, and on
        #: receipt decoded strictly and verified, by :mod:`talos.core.wire`.
        self.wire = wire
        self.signing = SigningKey(seed)
        self.peer_key = SigningKey(peer_seed).public_key
        self.instance = hashlib.sha256(b"instance" + seed).digest()[:16]
        self.root = hashlib.sha256(seed + peer_seed).digest()
        self.chain = hashlib.sha256(b"chain" + seed).digest()
        self.ratchet = X25519PrivateKey.generate()
        self.store = store
        self.log: AuditLog | None = None
        if store == "talos":
            self.log = AuditLog.open(directory, extra_databases=AgentState.DATABASES)
            self.agent = AgentState(
                self.log, storage_key=hashlib.sha256(seed).digest(), clock=SYSTEM_CLOCK
            )
            return
        self.env = lmdb.open(str(directory), map_size=64 << 20, sync=True, metasync=True, max_dbs=2)
        self.state = self.env.open_db(b"state")
        #: ``audited``: every commit also appends a hash-chained entry here (one row,
        #: and the head row beside it): the least an append-only audit log writes.
        self.audit = self.env.open_db(b"audit") if store == "audited" else None
        self.head = hashlib.sha256(b"audit").digest()
        self.entries = 0

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        else:
            self.env.close()

    def commit(self, key: bytes, value: bytes | None) -> None:
        """One durable commit of one record (put, or delete when ``value`` is None)."""
        with self.env.begin(write=True) as txn:
            if value is None:
                txn.delete(key, db=self.state)
            else:
                txn.put(key, value, db=self.state)
            if self.audit is not None:
                entry = cbor2.dumps(
                    {"k": key[:1], "id": key[1:], "t": time.time_ns(), "p": self.head}
                )
                self.head = hashlib.sha256(b"\x00" + entry).digest()
                txn.put(self.entries.to_bytes(8, "big"), entry, db=self.audit)
                txn.put(b"\xffhead", self.head + self.entries.to_bytes(8, "big"), db=self.audit)
                self.entries += 1

    # With ``store="talos"`` the three commits are Talos's own (AgentState: its tables,
    # sealing at rest and audit entries), called as the client calls them.

    def queued(self, message_id: bytes) -> None:
        if self.log is None:
            self.commit(b"o" + message_id, RECORD)
            return
        audit = {
            "id": message_id,
            "sha256": hashlib.sha256(PAYLOAD).digest(),
            "size": 100,
            "trace": os.urandom(8).hex(),
        }
        request = Enqueue(
            self.peer, message_id, PAYLOAD, None, [(AuditKind.MESSAGE_SENT, audit, self.peer)]
        )
        [outcome] = self.agent.enqueue_many(
            [request], queue_limit=1000, attempted={self.peer: RECORD}, attempt_at=time.time()
        )
        if not isinstance(outcome, OutboxItem):
            raise outcome  # a run that did not commit would measure nothing

    def received(self, message_id: bytes, *, taken: bool) -> None:
        if self.log is None:
            self.commit(b"i" + message_id, RECORD)
            return
        now = time_ms(SYSTEM_CLOCK)
        message = InboxMessage(self.peer, message_id, PAYLOAD, now, now)
        audit = {"id": message_id, "sha256": hashlib.sha256(PAYLOAD).digest()}
        replay = hashlib.sha256(self.peer.encode() + message_id).digest()
        received = Received(
            self.peer,
            RECORD,
            replay,
            now,
            message,
            None,
            [(AuditKind.MESSAGE_RECEIVED, audit, self.peer)],
        )
        self.agent.commit_receive_many([received], taken=int(taken))

    def removed(self, message_id: bytes) -> None:
        if self.log is None:
            self.commit(b"o" + message_id, None)
            return
        audit = {"id": message_id, "status": 0}
        records = [(AuditKind.MESSAGE_DELIVERED, audit, self.peer)]
        if self.agent.remove_many([(message_id, records)]) != [True]:
            raise RuntimeError("the acknowledged message was not in the outbox")

    def seal(self, kind: int, body: dict[str, Any]) -> bytes:
        if not self.wire:
            return crypto_sign(cbor2.dumps({"k": kind, **body}), self.secret)
        message = kind == 1
        envelope = wire.Envelope(
            type=wire.EnvelopeType.MESSAGE if message else wire.EnvelopeType.ACK,
            message_id=body["i"] if message else os.urandom(16),
            sender=self.me,
            sender_instance=self.instance,
            recipient=self.peer,
            timestamp_ms=time_ms(SYSTEM_CLOCK),
            ratchet_header=body["h"] if message else b"",
            ciphertext=body["c"] if message else b"",
            ref_ids=None if message else (body["r"],),
            status=None if message else wire.AckStatus.ACCEPTED,
        )
        return wire.seal(envelope, self.signing)

    def opened(self, data: bytes) -> dict[str, Any]:
        if not self.wire:
            body: dict[str, Any] = cbor2.loads(crypto_sign_open(data, self.peer_public))
            return body
        envelope = wire.verify(wire.decode(data), self.peer_key)
        if envelope.type is wire.EnvelopeType.ACK:
            assert envelope.ref_ids is not None
            return {"k": 2, "r": envelope.ref_ids[0]}
        return {
            "k": 1,
            "i": envelope.message_id,
            "h": envelope.ratchet_header,
            "c": envelope.ciphertext,
        }

    def message_key(self) -> tuple[bytes, bytes]:
        """The next message key and nonce: a chain step (two HMACs) and an HKDF."""
        seed = hmac.digest(self.chain, b"\x01", "sha256")
        self.chain = hmac.digest(self.chain, b"\x02", "sha256")
        keys = HKDF(hashes.SHA256(), 44, None, b"message").derive(seed)
        return keys[:32], keys[32:]

    def encrypt(self) -> tuple[bytes, bytes, bytes]:
        """A message id, the ratchet header (our public key) and the ciphertext."""
        key, nonce = self.message_key()
        message_id = os.urandom(16)
        header = self.ratchet.public_key().public_bytes(*_RAW)
        sealed = AESGCM(key).encrypt(nonce, PAYLOAD, header)
        return message_id, header, sealed

    def step(self, header: bytes) -> None:
        """The DH ratchet step a ping-pong pays on every message it receives."""
        theirs = X25519PublicKey.from_public_bytes(header)
        for _ in range(2):
            shared = self.ratchet.exchange(theirs)
            derived = HKDF(hashes.SHA256(), 64, self.root, b"ratchet").derive(shared)
            self.root, self.chain = derived[:32], derived[32:]
            self.ratchet = X25519PrivateKey.generate() if _ == 0 else self.ratchet

    def decrypt(self, body: dict[str, Any]) -> None:
        self.step(body["h"])
        key, nonce = self.message_key()
        # The two sides' keys are not agreed (no X3DH here), so the tag fails to
        # verify; AES-GCM does the same work either way.
        with contextlib.suppress(InvalidTag):
            AESGCM(key).decrypt(nonce, body["c"], body["h"])

    async def send_message(self, socket: Any) -> bytes:
        message_id, header, sealed = self.encrypt()
        self.queued(message_id)  # queued (and the ratchet) before it leaves
        await socket.send(self.seal(1, {"i": message_id, "h": header, "c": sealed}))
        return message_id

    async def receive_message(self, socket: Any, body: dict[str, Any], *, taken: bool) -> None:
        self.decrypt(body)
        self.received(body["i"], taken=taken)  # received, before the ACK
        await socket.send(self.seal(2, {"r": body["i"]}))

    def acknowledged(self, body: dict[str, Any]) -> None:
        self.removed(body["r"])  # removed, before send() returns


async def worker(directory: Path, *, store: str, wire: bool) -> None:
    """The answering process: prints its port, answers every message, until stdin closes."""
    peer = Peer(directory, b"b" * 32, b"a" * 32, store=store, wire=wire)

    async def handle(socket: ServerConnection) -> None:
        async for data in socket:
            assert isinstance(data, bytes)
            body = peer.opened(data)
            if body["k"] == 1:
                await peer.receive_message(socket, body, taken=False)  # at least once
                await peer.send_message(socket)
            else:
                peer.acknowledged(body)

    try:
        async with serve(handle, "127.0.0.1", 0, compression=None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            print(port, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        peer.close()


async def round_trips(
    directory: Path, trips: int, *, store: str, wire: bool = False, warm: int = 50
) -> list[float]:
    """µs of each of ``trips`` round trips (after ``warm`` not counted)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.stack_floor",
        "--worker",
        str(directory / "answerer"),
        "--store",
        store,
        *(["--wire"] if wire else []),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=CHECKOUT,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    port = int((await process.stdout.readline()).decode())
    times: list[float] = []
    peer: Peer | None = None
    try:
        peer = asker = Peer(directory / "asker", b"a" * 32, b"b" * 32, store=store, wire=wire)
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as socket:
            delivered: asyncio.Future[None] | None = None
            answered: asyncio.Future[None] | None = None

            async def read() -> None:
                async for data in socket:
                    assert isinstance(data, bytes)
                    body = asker.opened(data)
                    if body["k"] == 2:
                        asker.acknowledged(body)
                        if delivered is not None and not delivered.done():
                            delivered.set_result(None)
                    else:
                        await asker.receive_message(socket, body, taken=True)  # handed over
                        if answered is not None and not answered.done():
                            answered.set_result(None)

            reader = asyncio.create_task(read())

            async def until(event: asyncio.Future[None]) -> None:
                """Wait for ``event``; if the reader ends first, say why."""
                done, _ = await asyncio.wait({event, reader}, return_when=asyncio.FIRST_COMPLETED)
                if event not in done:
                    reader.result()  # what ended it, if it failed
                    raise RuntimeError("the answering process closed the connection")

            loop = asyncio.get_running_loop()
            for n in range(warm + trips):
                start = time.perf_counter()
                delivered, answered = loop.create_future(), loop.create_future()
                await asker.send_message(socket)
                await until(delivered)
                await until(answered)
                if n >= warm:
                    times.append((time.perf_counter() - start) * 1e6)
            reader.cancel()
    finally:
        process.stdin.close()
        await process.wait()
        if peer is not None:
            peer.close()
    return times


def measure(trips: int, *, store: str, wire: bool) -> dict[str, float]:
    """p50 and p99 (µs) of ``trips`` stack-floor round trips, in a fresh directory."""
    with tempfile.TemporaryDirectory(prefix="talos-stack-floor-") as root:
        times = asyncio.run(round_trips(Path(root), trips, store=store, wire=wire))
    cuts = statistics.quantiles(times, n=100)
    return {"p50": statistics.median(times), "p99": cuts[98], "trips": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trips", type=int, default=1000)
    parser.add_argument("--store", choices=STORES, default="bare", help="what each commit writes")
    parser.add_argument("--wire", action="store_true", help="Talos's envelopes as the frames")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        args.worker.mkdir(parents=True, exist_ok=True)
        asyncio.run(worker(args.worker, store=args.store, wire=args.wire))
        return
    print(json.dumps(measure(args.trips, store=args.store, wire=args.wire), indent=1))


if __name__ == "__main__":
    main()
