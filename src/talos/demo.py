"""``make demo``: two agents, one X3DH session, ratcheted messages both ways.

Everything is real except the network: identities are written to (and read
back from) encrypted key files in a temporary directory, Bob's prekey bundle
and both key event logs travel as bytes, and every message is a signed
envelope that the receiver decodes, verifies, checks against its replay
window and decrypts. Along the way the demo shows what happens to a
tampered frame, a forged ciphertext and a replayed one.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from talos.core import wire
from talos.core.clock import time_ms
from talos.core.crypto import sha256
from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.ratchet import Session
from talos.core.replay import ReplayWindow
from talos.core.x3dh import InitialHeader, PrekeyBundle, PrekeyStore, initiate, respond
from talos.errors import LocalProtocolError, TalosError
from talos.storage.home import AgentHome
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Agent:
    """One side of the conversation: identity, sessions, replay window."""

    identity: Identity
    instance: bytes = field(default_factory=lambda: wire.new_instance_id(SYSTEM_RNG))
    sessions: dict[str, Session] = field(default_factory=dict)
    replay: ReplayWindow = field(default_factory=ReplayWindow)
    #: Peers' key event logs, verified from bytes: the only source of their keys.
    known: dict[str, KeyLog] = field(default_factory=dict)
    #: Our X3DH prekeys, if we published a bundle.
    prekeys: PrekeyStore | None = None

    @property
    def name(self) -> str:
        return self.identity.name

    def learn(self, log_bytes: bytes) -> str:
        log = KeyLog.from_bytes(log_bytes)
        self.known[log.agent_id] = log
        return log.agent_id

    def envelope(
        self, kind: wire.EnvelopeType, peer: str, text: str, x3dh_header: bytes | None = None
    ) -> bytes:
        header, ciphertext = self.sessions[peer].encrypt(text.encode(), now=SYSTEM_CLOCK.time())
        envelope = wire.Envelope(
            type=kind,
            message_id=wire.new_message_id(SYSTEM_RNG),
            sender=self.identity.agent_id,
            sender_instance=self.instance,
            recipient=peer,
            timestamp_ms=time_ms(SYSTEM_CLOCK),
            ratchet_header=header,
            ciphertext=ciphertext,
            x3dh_header=x3dh_header,
        )
        return wire.seal(envelope, self.identity.signing_key)

    def receive(self, frame: bytes) -> str:
        """Decode, verify, replay-check, decrypt; commit state only on success."""
        unverified = wire.decode(frame)
        sender = self.known[unverified.sender].state
        envelope = wire.verify(unverified, sender.signing_key)
        if envelope.recipient != self.identity.agent_id:
            raise LocalProtocolError("envelope addressed to another agent")
        # Replay ids are scoped by sender: one peer cannot burn another's ids.
        replay_id = sha256(envelope.sender.encode() + envelope.message_id)
        now = SYSTEM_CLOCK.time()
        self.replay.check(replay_id, envelope.timestamp_ms, int(now * 1000))
        prekeys = self.prekeys
        if envelope.type is wire.EnvelopeType.INITIAL and prekeys is not None:
            response = respond(
                prekeys,
                InitialHeader.from_bytes(envelope.x3dh_header or b""),
                peer_agent_id=envelope.sender,
                peer_signing_key=sender.signing_key.raw,
                peer_identity_dh=sender.dh_key,
            )
            session = Session.responder(
                response.shared_key, response.associated_data, response.our_ratchet_key, SYSTEM_RNG
            )
            prekeys = response.store  # the one-time prekey is used up
        else:
            session = self.sessions[envelope.sender]
        text, successor = session.decrypt_uncommitted(
            envelope.ratchet_header, envelope.ciphertext, now=now
        )
        # Commit together: session successor, prekey store, replay record.
        self.sessions[envelope.sender] = successor
        self.prekeys = prekeys
        self.replay.record(replay_id, envelope.timestamp_ms, int(now * 1000))
        return text.decode()


def create_agent(name: str, root: Path) -> Agent:
    """Create an identity, write it to an encrypted key file, read it back."""
    home = AgentHome(root / name)
    identity = Identity.create(name, rng=SYSTEM_RNG, clock=SYSTEM_CLOCK)
    home.save_identity(identity, rng=SYSTEM_RNG, passphrase=None)
    loaded = home.load_identity(passphrase=None)
    console.print(f"[bold]{name}[/] created {loaded.agent_id}")
    console.print(f"      key file {home.identity_path} (fingerprint {loaded.fingerprint})")
    return Agent(loaded)


def step(label: str, action: str) -> None:
    console.print(f"  [cyan]{label:>5}[/] {action}")


def run(root: Path) -> None:
    console.rule("1. identities")
    alice, bob = create_agent("alice", root), create_agent("bob", root)
    bob_id = alice.learn(bob.identity.keylog.to_bytes())
    alice_id = bob.learn(alice.identity.keylog.to_bytes())

    console.rule("2. X3DH")
    bob.prekeys = store = PrekeyStore.create(
        agent_id=bob_id,
        signing_key=bob.identity.signing_key,
        identity_dh=bob.identity.dh_key,
        rng=SYSTEM_RNG,
    ).add_one_time_prekeys(3, SYSTEM_RNG)
    opk = min(store.one_time_prekey_publics())
    bundle = PrekeyBundle.from_bytes(store.bundle(opk).to_bytes())
    console.print(
        f"bob publishes a prekey bundle: signed prekey {bundle.signed_prekey_id}, "
        f"one-time prekey {bundle.one_time_prekey_id}"
    )
    bob_keys = alice.known[bob_id].state
    init = initiate(
        bundle,
        peer_agent_id=bob_id,
        peer_signing_key=bob_keys.signing_key.raw,
        peer_identity_dh=bob_keys.dh_key,
        agent_id=alice_id,
        identity_signing_key=alice.identity.signing_key.public_key.raw,
        identity_dh=alice.identity.dh_key,
        rng=SYSTEM_RNG,
    )
    alice.sessions[bob_id] = Session.initiator(
        init.shared_key, init.associated_data, init.their_ratchet_key, SYSTEM_RNG
    )
    console.print("alice verified bob's key log and signed prekey and derived the shared key")

    console.rule("3. ratcheted messages")
    first = alice.envelope(
        wire.EnvelopeType.INITIAL,
        bob_id,
        "hello bob, this opens our session",
        x3dh_header=init.header.to_bytes(),
    )
    step("a → b", f"{bob.receive(first)!r}  ({len(first)} bytes on the wire)")
    conversation = [
        (bob, alice, "hi alice, session established"),
        (alice, bob, "can you summarize the report?"),
        (alice, bob, "(and send the sources)"),
        (bob, alice, "summary: all systems nominal"),
        (bob, alice, "sources: 3 documents attached"),
        (alice, bob, "thanks!"),
    ]
    for sender, receiver, text in conversation:
        peer = receiver.identity.agent_id
        frame = sender.envelope(wire.EnvelopeType.MESSAGE, peer, text)
        arrow = "a → b" if sender is alice else "b → a"
        step(arrow, repr(receiver.receive(frame)))

    console.rule("4. failures the receiver survives")
    frame = alice.envelope(wire.EnvelopeType.MESSAGE, bob_id, "this one arrives twice")
    step("a → b", repr(bob.receive(frame)))
    expect_rejection(bob, frame, "the same frame replayed")
    frame = alice.envelope(wire.EnvelopeType.MESSAGE, bob_id, "tampered in transit")
    sent = wire.verify(wire.decode(frame), alice.identity.signing_key.public_key)
    tampered = bytearray(frame)
    tampered[frame.index(sent.ciphertext) + 3] ^= 0x01
    expect_rejection(bob, bytes(tampered), "a frame with one flipped ciphertext bit")
    garbled = bytes(b ^ 0xFF for b in sent.ciphertext)
    resigned = wire.seal(
        dataclasses.replace(sent, message_id=wire.new_message_id(SYSTEM_RNG), ciphertext=garbled),
        alice.identity.signing_key,
    )
    expect_rejection(bob, resigned, "a correctly signed frame whose ciphertext is corrupt")
    expect_rejection(bob, b"\xa1\x61v\x02", "garbage bytes")
    step("a → b", repr(bob.receive(alice.envelope(wire.EnvelopeType.MESSAGE, bob_id, "still ok?"))))
    console.print("the session survived: rejected input never changed ratchet state")


def expect_rejection(agent: Agent, frame: bytes, what: str) -> None:
    try:
        agent.receive(frame)
    except TalosError as error:
        step("drop", f"{what}: {type(error).__name__} ({error})")
    else:
        raise SystemExit(f"demo failure: {what} was accepted")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="talos-demo-") as tmp:
        run(Path(tmp))
    console.rule("done")


if __name__ == "__main__":
    main()
