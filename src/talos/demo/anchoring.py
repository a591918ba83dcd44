"""The demo's anchoring step: bob anchors his audit log on a local chain that goes away and returns.

A local EVM chain (anvil, ``--state`` so it survives a restart, a block a
second) runs; ``talos anchor deploy`` puts the TalosAnchor contract on it and
bob restarts with ``--anchor-*``. His first anchor lands and becomes final (2
confirmations). The chain stops: alice keeps messaging bob, bob keeps
auditing, and each failed anchoring attempt is counted in
``talos_audit_anchor_failures_total`` (scraped from his ``/metrics``) while
his retries back off (the ``retry_in`` of his ``anchor_failed`` log lines).
The chain returns with its state on the same port; one anchor of bob's
newest checkpoint covers everything written meanwhile. An auditor holding
only bob's public key log checks a proof of a message received during the
outage against the chain: ``talos audit verify-proof --proof F --rpc URL``.

Without anvil the step says how to install it (``make anvil``) and stops the
demo with a failure rather than a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from talos.demo.cast import Agent
from talos.testing.chain import DEV_KEYS, AnvilProcess, ToolMissing, start_anvil
from talos.testing.child import ChildFailed

if TYPE_CHECKING:
    from talos.demo.steps import Demo

#: Seconds between anchors (and the cap of the retry backoff, which starts at 2 s).
INTERVAL: Final = "4"
#: Blocks that make an anchor final: its own and one more.
CONFIRMATIONS: Final = "2"
#: anvil mines a block every second (not only per transaction), so confirmations come.
_ANVIL_ARGS: Final = ("--block-time", "1")
_FAILURES: Final = "talos_audit_anchor_failures_total"
_SERIES: Final = (_FAILURES, "talos_audit_anchor_lag_entries")
_RETRY_IN: Final = re.compile(r"event=anchor_failed .*retry_in=([\d.]+)")
#: Failed attempts the step waits for while the chain is down.
_DOWN_FAILURES: Final = 3


def start_chain(demo: Demo, port: int = 0) -> AnvilProcess:
    root = demo.root
    try:
        anvil = start_anvil(
            root / "logs" / "anvil.log", port=port, state=root / "chain.json", extra=_ANVIL_ARGS
        )
    except ToolMissing as exc:
        raise demo.out.fail(f"this step runs a local chain: {exc}") from None
    except OSError as exc:  # $ANVIL names something that does not run
        raise demo.out.fail(
            f"this step runs a local chain, and anvil did not start ({exc}); "
            "run `make anvil` (bash .ci/install-anvil.sh) to install it into .tools/"
        ) from None
    except ChildFailed as exc:
        raise demo.out.fail(f"the local chain did not start: {exc}") from None
    demo.cast.launcher.started.append(anvil.child)
    demo.out.say(f"  anvil (pid {anvil.child.pid}) serving {anvil.url}, a block a second")
    return anvil


def _anchors(demo: Demo, agent: Agent) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(
        demo.talos(agent, "audit", "anchors", "--json", quiet=True)
    )
    return found


def _final_past(demo: Demo, agent: Agent, size: int) -> dict[str, Any] | None:
    finals = [a for a in _anchors(demo, agent) if a["state"] == "final" and a["tree_size"] > size]
    return finals[-1] if finals else None


def _retry_waits(log: Path) -> list[float]:
    """The ``retry_in`` of every ``anchor_failed`` line in an agent's (text) log."""
    return [float(wait) for wait in _RETRY_IN.findall(log.read_text(errors="replace"))]


def anchoring(demo: Demo, number: int) -> None:
    alice, bob = demo.alice, demo.bob
    demo.out.step(
        number,
        "anchoring on a chain that goes away and comes back",
        "bob's audit log is signed by bob alone, so bob could show one history to one auditor "
        "and another to the next. Anchoring publishes his checkpoints (tree size and root) on "
        "a public chain where anyone can list them. Here a local chain (anvil) stands in: "
        "`talos anchor deploy` puts the anchoring contract on it and bob restarts with "
        "--anchor-*. An anchor goes pending, included, then final (2 blocks here; the "
        "chain's finalized block by default). Then the chain stops: messaging and local "
        "audit go on, each failed attempt is counted and the retries back off. The chain "
        "returns with its state, one anchor covers everything written meanwhile, and an "
        "auditor checks a proof against the chain.",
    )
    anvil = start_chain(demo)
    wallet = demo.root / "anchor-wallet.hex"
    wallet.write_text(DEV_KEYS[0])  # anvil's funded development account: public knowledge
    wallet.chmod(0o600)
    deployed = demo.talos(None, "anchor", "deploy", "--rpc", anvil.url, "--key-file", str(wallet))
    contract = deployed.strip().splitlines()[-1]
    demo.cast.stop(bob.child)
    demo.cast.start(bob, bob.port, "--anchor-rpc", anvil.url, "--anchor-contract", contract,
                    "--anchor-key-file", str(wallet), "--anchor-interval", INTERVAL,
                    "--anchor-confirmations", CONFIRMATIONS)  # fmt: skip
    demo.within(lambda: _final_past(demo, bob, 0) is not None, "bob's first anchor is final")
    first = _final_past(demo, bob, 0)
    assert first is not None  # noqa: S101 -- just waited for it
    demo.talos(bob, "audit", "anchors")
    demo.out.check(f"{number}.anchored", f"bob's log is anchored at size {first['tree_size']}")

    before = bob.scrape()
    demo.cast.stop(anvil.child)
    demo.send(alice, bob, "the chain is down and we keep talking")
    demo.expect_inbox(bob, "the chain is down")
    demo.within(
        lambda: bob.metric(_FAILURES) >= before[_FAILURES] + _DOWN_FAILURES,
        f"{_FAILURES} counts {_DOWN_FAILURES} failed attempts",
    )
    down = demo.deltas(number, bob, before, _SERIES)
    assert bob.child is not None  # noqa: S101 -- started above
    waits = _retry_waits(bob.child.log)
    demo.out.say(
        "  bob's anchor_failed log lines: next try in "
        + ", ".join(f"{wait:.1f} s" for wait in waits)
        + f" (backoff from 2 s, never past the {INTERVAL} s interval)"
    )
    if len(waits) < _DOWN_FAILURES or waits[1] < waits[0]:
        raise demo.out.fail(f"bob's retries do not back off: {waits}")
    demo.out.check(
        f"{number}.counted", "messages flowed while the chain was down; failures were counted"
    )

    anvil = start_chain(demo, anvil.port)
    size = int(first["tree_size"])
    demo.within(
        lambda: (_final_past(demo, bob, size) or {}).get("tree_size", 0) > size,
        "bob anchors again once the chain is back",
    )
    again = _final_past(demo, bob, size)
    assert again is not None  # noqa: S101 -- just waited for it
    demo.talos(bob, "audit", "anchors")
    demo.deltas(number, bob, down, _SERIES)
    demo.out.check(
        f"{number}.recovered",
        f"the chain is back: one anchor at size {again['tree_size']} covers the outage",
    )
    demo.talos(bob, "audit", "verify-anchors", "--rpc", anvil.url)

    entries = json.loads(
        demo.talos(bob, "audit", "query", "--type", "MESSAGE_RECEIVED", "--json", quiet=True)
    )
    covered = [e for e in entries if e["seq"] < again["tree_size"]]
    if not covered:
        raise demo.out.fail("no MESSAGE_RECEIVED entry is covered by bob's new anchor")
    proof = demo.root / "anchored-proof.json"
    demo.talos(bob, "audit", "prove", str(covered[-1]["seq"]), "--out", str(proof))
    # The auditor of step 5: nothing but bob's public key log, and now an RPC URL.
    auditor = Agent("auditor", demo.root / "auditor")
    out = demo.talos(auditor, "audit", "verify-proof", "--proof", str(proof), "--rpc", anvil.url)
    if "anchored on chain" not in out:
        raise demo.out.fail("verify-proof --rpc did not check the anchor on chain")
    demo.out.check(f"{number}.proof", "an auditor checked a proof against the chain")
