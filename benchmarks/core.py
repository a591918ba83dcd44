"""Benchmarks of the sans-I/O core, with the crypto floor measured in the same run.

Run with ``make bench`` or ``python -m benchmarks.core [--quick] [--json PATH]``.
Prints a table and writes JSON (default ``benchmarks/results/core.json``).

Each figure is the best of several timed repeats (least disturbed by the
other core's load) and is also given as a ratio to the primitive it is built
on, measured in the same process: that ratio is what a code change moves,
while the absolute figure also moves with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from talos.core import wire
from talos.core.crypto import (
    DHKey,
    SigningKey,
    aead_decrypt,
    aead_encrypt,
    hkdf_sha256,
)
from talos.core.identity import Identity
from talos.core.ratchet import Session
from talos.core.x3dh import PrekeyStore, initiate, respond
from talos.testing import FakeClock, SeededRng

RESULTS = Path(__file__).resolve().parent / "results"
PAYLOAD = b"m" * 100


@dataclass
class Result:
    name: str
    unit_us: float
    floor: str | None
    ratio: float | None
    target_us: float | None
    note: str


def measure(fn: Callable[[], object], *, seconds: float, repeats: int) -> float:
    """Best per-call time in microseconds over ``repeats`` runs of about ``seconds``."""
    calls = 1
    while True:  # calibrate the batch size to roughly `seconds`
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4 or calls > 1 << 22:
            break
        calls *= 2
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def floor_cases(rng: SeededRng) -> dict[str, Callable[[], object]]:
    signer = SigningKey.generate(rng)
    signature = signer.sign(PAYLOAD)
    a, b = DHKey.generate(rng), DHKey.generate(rng)
    key, nonce = rng.bytes(32), rng.bytes(12)
    sealed = aead_encrypt(key, nonce, PAYLOAD, b"ad")
    return {
        "ed25519_sign": lambda: signer.sign(PAYLOAD),
        "ed25519_verify": lambda: signer.public_key.verify(signature, PAYLOAD),
        "x25519": lambda: a.exchange(b.public),
        "aes_gcm_encrypt_100B": lambda: aead_encrypt(key, nonce, PAYLOAD, b"ad"),
        "aes_gcm_decrypt_100B": lambda: aead_decrypt(key, nonce, sealed, b"ad"),
        "hkdf_sha256_64B": lambda: hkdf_sha256(key, salt=key, info=b"i", length=64),
    }


class Agents:
    """Two identities and a prekey store for Bob, as a real deployment has them."""

    def __init__(self, rng: SeededRng, clock: FakeClock) -> None:
        self.rng, self.clock = rng, clock
        self.alice = Identity.create("alice", rng=rng, clock=clock)
        self.bob = Identity.create("bob", rng=rng, clock=clock)
        store = PrekeyStore.create(
            agent_id=self.bob.agent_id,
            signing_key=self.bob.signing_key,
            identity_dh=self.bob.dh_key,
            rng=rng,
        )
        self.store = store.add_one_time_prekeys(1, rng)

    def establish(self) -> tuple[Session, Session]:
        """Full X3DH (signature check, 4 DH each side) and both ratchet inits."""
        bob, alice = self.bob, self.alice
        opk = next(iter(self.store.one_time_prekey_publics()))
        init = initiate(
            self.store.bundle(opk),
            peer_agent_id=bob.agent_id,
            peer_signing_key=bob.signing_key.public_key.raw,
            peer_identity_dh=bob.dh_key.public,
            agent_id=alice.agent_id,
            identity_signing_key=alice.signing_key.public_key.raw,
            identity_dh=alice.dh_key,
            rng=self.rng,
        )
        resp = respond(
            self.store,
            init.header,
            peer_agent_id=alice.agent_id,
            peer_signing_key=alice.signing_key.public_key.raw,
            peer_identity_dh=alice.dh_key.public,
        )
        a = Session.initiator(
            init.shared_key, init.associated_data, init.their_ratchet_key, self.rng
        )
        b = Session.responder(resp.shared_key, resp.associated_data, resp.our_ratchet_key, self.rng)
        return a, b


def session_cases(agents: Agents) -> dict[str, Callable[[], object]]:
    now = agents.clock.time()
    a, b = agents.establish()
    first = a.encrypt(PAYLOAD, now=now)
    b.decrypt(*first, now=now)

    def same_direction() -> None:
        b.decrypt(*a.encrypt(PAYLOAD, now=now), now=now)

    turn = [a, b]

    def ping_pong() -> None:
        sender, receiver = turn
        receiver.decrypt(*sender.encrypt(PAYLOAD, now=now), now=now)
        turn.reverse()

    return {
        "x3dh_establish": agents.establish,
        "ratchet_same_direction_100B": same_direction,
        "ratchet_ping_pong_100B": ping_pong,
    }


def envelope_cases(agents: Agents) -> dict[str, Callable[[], object]]:
    rng, alice = agents.rng, agents.alice
    envelope = wire.Envelope(
        type=wire.EnvelopeType.MESSAGE,
        message_id=wire.new_message_id(rng),
        sender=alice.agent_id,
        sender_instance=wire.new_instance_id(rng),
        recipient=agents.bob.agent_id,
        timestamp_ms=1_700_000_000_000,
        ratchet_header=b"h" * 40,
        ciphertext=b"c" * (len(PAYLOAD) + 16),
    )
    frame = wire.seal(envelope, alice.signing_key)
    key = alice.signing_key.public_key
    return {
        "envelope_encode_sign": lambda: wire.seal(envelope, alice.signing_key),
        "envelope_decode_verify": lambda: wire.verify(wire.decode(frame), key),
    }


#: Benchmark name -> (floor it is compared with, target in µs or None).
RELATIONS: dict[str, tuple[str, float | None]] = {
    "x3dh_establish": ("x25519", 1000.0),
    "ratchet_same_direction_100B": ("aes_gcm_encrypt_100B", 40.0),
    "ratchet_ping_pong_100B": ("x25519", None),
    "envelope_encode_sign": ("ed25519_sign", None),
    "envelope_decode_verify": ("ed25519_verify", None),
}

NOTES = {
    "x3dh_establish": "both sides: SPK signature check, 4+4 X25519, HKDF, ratchet init",
    "ratchet_same_direction_100B": "encrypt + decrypt, one message",
    "ratchet_ping_pong_100B": "encrypt + decrypt with a DH ratchet step each turn",
    "envelope_encode_sign": "validate, canonical CBOR, Ed25519 sign",
    "envelope_decode_verify": "strict decode, Ed25519 verify",
}


def run(seconds: float, repeats: int) -> list[Result]:
    rng, clock = SeededRng(2026), FakeClock()
    agents = Agents(rng, clock)
    floors = {
        name: measure(fn, seconds=seconds, repeats=repeats) for name, fn in floor_cases(rng).items()
    }
    results = [Result(name, us, None, None, None, "crypto floor") for name, us in floors.items()]
    for name, fn in {**session_cases(agents), **envelope_cases(agents)}.items():
        us = measure(fn, seconds=seconds, repeats=repeats)
        floor, target = RELATIONS[name]
        results.append(Result(name, us, floor, us / floors[floor], target, NOTES[name]))
    return results


def render(results: list[Result]) -> str:
    lines = [f"{'benchmark':32} {'µs/op':>10} {'ops/s':>12} {'× floor':>9}  floor / target"]
    for r in results:
        ratio = f"{r.ratio:8.2f}×" if r.ratio is not None else " " * 9
        extra = f"{r.floor}" if r.floor else ""
        if r.target_us is not None:
            verdict = "ok" if r.unit_us <= r.target_us else "MISSED"
            extra += f" / ≤ {r.target_us:g} µs {verdict}"
        lines.append(f"{r.name:32} {r.unit_us:10.2f} {1e6 / r.unit_us:12,.0f} {ratio}  {extra}")
    return "\n".join(lines)


def write_results(path: Path, suite: str, results: list[Result]) -> None:
    """Write one suite's results, with the machine they were measured on, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "suite": suite,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor_count": os.cpu_count(),
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(document, indent=2))
    print(f"\nJSON written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--json", type=Path, default=RESULTS / "core.json")
    args = parser.parse_args()
    seconds, repeats = (0.05, 2) if args.quick else (0.5, 5)
    results = run(seconds, repeats)
    print(render(results))
    write_results(args.json, "core", results)


if __name__ == "__main__":
    main()
