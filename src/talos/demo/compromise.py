"""The demo's key-compromise step: alice's key is stolen, she rotates while running.

A copy of alice's signing key is taken off her disk (the "thief"), then she runs
``talos emergency-rotate --revoke-old --reason "compromise detected"`` through
her running agent. bob learns her new key log, refuses a frame the thief signs
with the old key, sessions are re-established under the new keys, and the token
alice gave bob under her old key is refused until she grants him a new one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from talos.core import wire
from talos.core.clock import time_ms
from talos.core.identity import Identity
from talos.demo.wiretap import inject
from talos.storage.home import AgentHome
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG

if TYPE_CHECKING:
    from talos.demo.steps import Demo

#: The operator's reason, exactly as the seed spells the recovery.
REASON = "compromise detected"
#: The series of bob's that this step prints.
_BOB_SERIES = ("talos_peer_key_updates_total", "talos_signature_failures_total")
_REVOKED = 'talos_signature_failures_total{reason="revoked_key"}'


def stolen_frame(thief: Identity, recipient: str) -> bytes:
    """A new MESSAGE frame 'from alice', signed with the key the thief copied."""
    return wire.seal(
        wire.Envelope(
            type=wire.EnvelopeType.MESSAGE,
            message_id=wire.new_message_id(SYSTEM_RNG),
            sender=thief.agent_id,
            sender_instance=wire.new_instance_id(SYSTEM_RNG),
            recipient=recipient,
            timestamp_ms=time_ms(SYSTEM_CLOCK),
            ratchet_header=b"h" * 40,
            ciphertext=b"c" * 64,
        ),
        thief.signing_key,
    )


def key_compromise(demo: Demo, number: int) -> None:
    alice, bob = demo.alice, demo.bob
    demo.out.step(
        number,
        "a stolen key: emergency rotation while running",
        "Someone copied alice's signing key off her disk. The registry is back. alice runs "
        f'`talos emergency-rotate --revoke-old --reason "{REASON}"`: her running agent '
        "promotes the key she committed to in advance (the thief does not have it), revokes "
        "the old one and everything she signed with it, publishes her new key log and pushes "
        "it to her peers. bob follows: he audits PEER_KEY_ROTATED, drops his sessions with "
        "her and refuses whatever the old key signs. New sessions run X3DH against her new "
        "keys, and the token she gave bob under the old key is refused until she grants a "
        "new one.",
    )
    demo.cast.restart_registry()
    thief = AgentHome(alice.home).load_identity(passphrase=None)
    demo.out.say(f"  the thief copied alice's key at sequence {thief.sequence}")
    before = bob.scrape()
    out = demo.talos(alice, "emergency-rotate", "--revoke-old", "--reason", REASON)
    if "(running agent)" not in out or "key sequence 1" not in out:
        raise demo.out.fail("alice's running agent did not rotate to key sequence 1")
    demo.out.check("6.rotated", "alice rotated while running and revoked her old key")
    demo.send(alice, bob, "my key was stolen; this is my new one")
    demo.expect_inbox(bob, "my key was stolen")
    demo.within(
        lambda: bob.metric("talos_peer_key_updates_total") > before["talos_peer_key_updates_total"],
        "bob follows alice's rotation",
    )
    demo.out.check("6.followed", "bob learned alice's new key; a new session carried her message")
    answer = inject(
        f"ws://127.0.0.1:{bob.port}", stolen_frame(thief, bob.agent_id), answer_within=0.5
    )
    demo.out.say(
        "  the thief sent bob a frame signed with alice's old key: "
        f"{'no answer' if answer is None else 'an answer (unexpected)'}"
    )
    demo.within(
        lambda: bob.scrape().get(_REVOKED, 0.0) > before.get(_REVOKED, 0.0),
        'talos_signature_failures_total{reason="revoked_key"} counts the stolen key',
    )
    demo.deltas(number, bob, before, list(_BOB_SERIES))
    demo.out.check("6.stolen", "bob refused the frame signed with the revoked key")
    demo.audit_query("PEER_KEY_ROTATED")
    why = demo.talos(bob, "send", alice.agent_id, "with my old token", "--capability",
                     demo.bob_token, "--timeout", "10", expect=6)  # fmt: skip
    if "revoked by the emergency rotation" not in why or "fresh grant" not in why:
        raise demo.out.fail(f"bob's refusal of the old token does not name the rotation: {why}")
    demo.out.check("6.token", "bob's token from alice's old key is refused, naming the rotation")
    # A grant writes alice's audit log, which her running agent owns: stop, grant, start.
    demo.cast.stop(alice.child)
    token = demo.talos(
        alice, "capabilities", "grant", "--to", bob.agent_id, "--action", "message.send",
        "--expires-in", "1h",
    ).strip()  # fmt: skip
    demo.cast.start(alice, alice.port)
    demo.talos(bob, "send", alice.agent_id, "thanks for the new grant", "--capability", token,
               "--timeout", "15", "--retry-count", "10")  # fmt: skip
    demo.expect_inbox(alice, "thanks for the new grant")
    demo.out.check("6.granted", "with a fresh grant under her new key, bob's messages flow again")
