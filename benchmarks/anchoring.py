"""Anchoring on a real chain: gas per anchor, and anchors per minute the driver completes.

Run with ``python -m benchmarks.anchoring [--quick] [--json PATH]`` (needs
anvil: ``make anvil``). Prints a table and writes JSON (default
``benchmarks/results/anchoring.json``).

One anvil (automine: each transaction is mined at once), the shipped
contract, and an audit log in a temporary LMDB environment. The
:class:`~talos.audit.anchoring.driver.Anchorer` runs its steps back to back
(time is a FakeClock advanced past the interval before each anchor; a new
entry each time, so there is something to anchor), with one confirmation:

* **gas**: ``gasUsed`` of each anchoring transaction's receipt (and of the
  deployment), from the chain;
* **anchors per minute**: complete anchors (sign, save, broadcast,
  receipt, final, the ``AUDIT_ANCHORED`` entry) per minute of wall time.
  This is the driver's own ceiling over loopback JSON-RPC; a real chain is
  bounded by its block time and the finality rule (on Ethereum with the
  default ``finalized`` rule, about 13 minutes per anchor, one in flight).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.core import RESULTS, Result, write_results
from talos.audit import AuditLog, LogSigner
from talos.audit.anchoring.chain import Chain
from talos.audit.anchoring.deploy import deploy
from talos.audit.anchoring.driver import Anchorer
from talos.audit.anchoring.store import DATABASE
from talos.audit.anchoring.wallet import load_wallet
from talos.core.anchoring import Finality, Schedule
from talos.core.crypto import SigningKey
from talos.testing import FakeClock, SeededRng
from talos.testing.chain import DEV_KEYS, start_anvil

INTERVAL = 600.0


def run(anchors: int) -> tuple[list[Result], dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="talos-bench-anchor-") as tmp:
        root = Path(tmp)
        anvil = start_anvil(root / "anvil.log")
        chain = Chain(anvil.url, timeout=10.0)
        try:
            key = root / "wallet.hex"
            key.write_text(DEV_KEYS[0])
            wallet = load_wallet(key, lambda: None)
            deployment = deploy(chain, wallet)
            deploy_receipt = chain.receipt(deployment.tx_hash)
            assert deploy_receipt is not None
            clock = FakeClock()
            signer = LogSigner(SigningKey(b"\x05" * 32), "bench", "bench/audit")
            with AuditLog.open(
                root / "audit", signer=signer, clock=clock, extra_databases=(DATABASE,)
            ) as log:
                anchorer = Anchorer(
                    log,
                    chain,
                    wallet,
                    deployment.address,
                    schedule=Schedule(interval=INTERVAL, poll=1.0, retry_base=2.0),
                    finality=Finality(1),
                    clock=clock,
                    rng=SeededRng(7),
                )
                steps = 0
                start = time.perf_counter()
                for n in range(anchors):
                    log.append("MESSAGE_SENT", {"n": n})
                    clock.advance(INTERVAL)
                    while len(anchorer.store.finals()) <= n:
                        anchorer.step()
                        steps += 1
                        if anchorer.last.error is not None:
                            raise anchorer.last.error
                elapsed = time.perf_counter() - start
                gas = []
                for anchor in anchorer.store.finals():
                    assert anchor.inclusion is not None
                    receipt = chain.receipt(anchor.inclusion.tx_hash)
                    assert receipt is not None
                    gas.append(receipt.gas_used)
        finally:
            chain.close()
            anvil.stop()
    per_anchor = elapsed / anchors
    figures = {
        "anchors": anchors,
        "gas_per_anchor_median": statistics.median(gas),
        "gas_per_anchor_max": max(gas),
        "gas_deploy": deploy_receipt.gas_used,
        "anchors_per_minute": 60.0 / per_anchor,
        "steps_per_anchor": steps / anchors,
    }
    results = [
        Result(
            name="anchor, pending to final",
            unit_us=per_anchor * 1e6,
            floor=None,
            ratio=None,
            target_us=None,
            note=f"{anchors} anchors on anvil, 1 confirmation, "
            f"{steps / anchors:.1f} driver steps each, gas {statistics.median(gas):.0f} each",
        )
    ]
    return results, figures


def render(figures: dict[str, float]) -> str:
    rows = [
        ("gas per anchor (median)", f"{figures['gas_per_anchor_median']:,.0f}"),
        ("gas per anchor (max)", f"{figures['gas_per_anchor_max']:,.0f}"),
        ("gas to deploy the contract", f"{figures['gas_deploy']:,.0f}"),
        ("anchors per minute (driver, anvil)", f"{figures['anchors_per_minute']:,.0f}"),
        ("ms per anchor, pending to final", f"{60_000 / figures['anchors_per_minute']:.1f}"),
        ("driver steps per anchor", f"{figures['steps_per_anchor']:.1f}"),
    ]
    return "\n".join(f"{name:38} {value:>12}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--json", type=Path, default=RESULTS / "anchoring.json")
    args = parser.parse_args()
    results, figures = run(10 if args.quick else 100)
    print(render(figures))
    write_results(args.json, "anchoring", results)
    document = json.loads(args.json.read_text())
    args.json.write_text(json.dumps({**document, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
