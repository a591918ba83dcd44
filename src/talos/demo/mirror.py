"""The demo's mirror step: bob mirrors alice's audit log; her database is destroyed and rebuilt.

bob restarts with ``--audit-mirror-for ALICE`` (he agrees to keep her log) and
alice with ``--audit-mirror BOB``: her entries go to bob in signed,
verified batches (``talos_audit_mirror_lag_entries`` falls to 0). She stops,
takes an inclusion proof of her oldest entry, and her audit database is
deleted. ``talos audit rebuild --from-peers`` fetches the log back from bob,
verifies every stretch against alice's key log, and puts it in place with
the same root; the proof taken before still verifies, and alice starts again.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from talos.demo.steps import Demo

_ROOT_LINE = re.compile(r"^root ([0-9a-f]{64})$", re.MULTILINE)


def audit_mirror(demo: Demo, number: int) -> None:
    alice, bob = demo.alice, demo.bob
    demo.out.step(
        number,
        "bob mirrors alice's audit log; her database is destroyed and rebuilt",
        "bob restarts with `--audit-mirror-for` naming alice (a mirror keeps only the logs "
        "its operator agreed to) and alice with `--audit-mirror` naming bob: her audit "
        "entries go to him in "
        "batches, each with a checkpoint she signs, and bob verifies each batch against her "
        "key log before he stores it (he learns her peers, times and message hashes, never "
        "contents). Then alice stops, takes a proof of her first entry, and her audit "
        "database is deleted. `talos audit rebuild --from-peers` asks bob for the entries, "
        "verifies every stretch, and puts the log back with the same root; the older proof "
        "still verifies.",
    )
    lag = f'talos_audit_mirror_lag_entries{{mirror="{bob.agent_id}"}}'
    # Mirroring is opt-in on both sides: bob's operator agrees to keep alice's log.
    demo.cast.stop(bob.child)
    demo.cast.start(bob, bob.port, "--audit-mirror-for", alice.agent_id)
    demo.cast.stop(alice.child)
    demo.cast.start(alice, alice.port, "--audit-mirror", bob.agent_id)
    demo.within(
        lambda: (
            alice.scrape().get(lag) == 0.0
            and alice.metric("talos_audit_mirror_batches_sent_total") > 0
        ),
        "alice's audit log is mirrored to bob",
    )
    demo.out.say(f"  {lag} = 0 on alice")
    demo.out.check(f"{number}.mirrored", "bob holds alice's whole audit log, verified")
    demo.cast.stop(alice.child)
    before = _root(demo)
    proof = demo.root / "alice-proof.json"
    demo.talos(alice, "audit", "prove", "0", "--out", str(proof))
    (alice.home / "audit" / "data.mdb").unlink()
    demo.out.say("  alice's audit database (audit/data.mdb) is deleted")
    out = demo.talos(
        alice, "audit", "rebuild", "--from-peers", "--registry", demo.cast.registry_url
    )
    if f"root {before}" not in out:
        raise demo.out.fail("the rebuilt log does not have alice's root")
    demo.out.check(f"{number}.rebuilt", "rebuilt from bob with the same root")
    # The proof was taken at the size the log had when alice stopped: the root the
    # rebuilt entries were just checked to have.
    if json.loads(proof.read_text())["tree_size"] < 1:
        raise demo.out.fail("the proof covers no entry")
    demo.talos(alice, "audit", "verify-proof", "--proof", str(proof), "--root", before)
    demo.out.check(f"{number}.proof", "the proof taken before the loss still verifies")
    demo.cast.start(alice, alice.port, "--audit-mirror", bob.agent_id)


def _root(demo: Demo) -> str:
    match = _ROOT_LINE.search(demo.talos(demo.alice, "audit", "root", quiet=True))
    if match is None:
        raise demo.out.fail("`talos audit root` printed no root")
    return match.group(1)
