"""CPU time of an isolated operation, old code against new, alternated in one process.

Run with ``python -m benchmarks.paired [--old REV] [--rounds N]``. Timed:
``strict_loads`` and ``canonical_dumps``, and ``check_agent_id`` (what
``send()`` does to its recipient). The old versions of
:mod:`talos.core.encoding` and :mod:`talos.core.agent_id` are loaded from
``git show REV:src/talos/core/...`` (default: ``HEAD~1``) beside the checked-out
ones; both decode the same inputs, and the two are timed in alternation
(A B B A ...) with ``time.process_time``, which counts this process's CPU
only: on a machine shared with other work, a preempted round does not
grow, so the per-round ratio new/old stays meaningful when wall time does
not. Printed: µs per call of each in each round and the median ratio.

Inputs: canonical CBOR of the shapes the receiver decodes per message (an
envelope's field map with a 100-byte body, a ratchet header, a message
payload, an inbox row).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import cbor2

from talos.core import agent_id, encoding

CHECKOUT = Path(__file__).resolve().parents[1]

SAMPLES: dict[str, Any] = {
    "envelope": {
        "v": 1,
        "type": 1,
        "id": b"\x01" * 16,
        "sender": "tls1" + "a" * 46,
        "recipient": "tls1" + "b" * 46,
        "timestamp_ms": 1_765_000_000_000,
        "header": b"\x02" * 80,
        "body": b"\x03" * 144,
        "capability": None,
        "signature": b"\x04" * 64,
    },
    "ratchet header": {"v": 1, "dh": b"\x05" * 32, "pn": 12, "n": 345},
    "payload": {"v": 1, "content_type": "application/octet-stream", "data": b"m" * 100},
    "inbox row": {
        "v": 1,
        "id": b"\x06" * 16,
        "sender": "tls1" + "a" * 46,
        "received_at_ms": 1_765_000_000_123,
        "sent_at_ms": 1_765_000_000_000,
        "data": b"m" * 100,
        "content_type": "application/octet-stream",
    },
}


def old_module(rev: str, path: str = "src/talos/core/encoding.py") -> ModuleType:
    git = shutil.which("git")
    assert git is not None, "git is needed to load the old code"
    source = subprocess.run(  # noqa: S603 -- a fixed git command on this checkout
        [git, "show", f"{rev}:{path}"],
        cwd=CHECKOUT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader(f"old_{Path(path).stem}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # noqa: S102
    return module


def cpu_us(run: Callable[[], object], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        run()
    return (time.process_time() - start) / calls * 1e6


def alternated(
    old: Callable[[], object], new: Callable[[], object], rounds: int, calls: int
) -> tuple[list[float], list[float]]:
    """CPU µs per call of ``old`` and of ``new`` in each round, timed in alternation
    (old new, new old, ...) so neither always runs first."""
    runs = {"old": old, "new": new}
    timings: dict[str, list[float]] = {"old": [], "new": []}
    for round_ in range(rounds):
        order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
        for which in order:
            timings[which].append(cpu_us(runs[which], calls))
    return timings["old"], timings["new"]


def compare(
    operation: str,
    name: str,
    size: int,
    old: Callable[[], object],
    new: Callable[[], object],
    args: argparse.Namespace,
    *,
    digits: int = 2,
) -> None:
    """Time ``old`` against ``new`` and print their row: medians and the median ratio."""
    old_us, new_us = alternated(old, new, args.rounds, args.calls)
    ratios = [n / o for n, o in zip(new_us, old_us, strict=True)]
    print(
        f"{operation:16} {name:15} {size:5} {statistics.median(old_us):7.2f} "
        f"{statistics.median(new_us):7.2f} {statistics.median(ratios):8.{digits}f}"
        f"  (rounds {min(ratios):.{digits}f}–{max(ratios):.{digits}f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--old", default="HEAD~1", help="git revision of the old code")
    parser.add_argument("--rounds", type=int, default=8, help="A/B pairs (default 8)")
    parser.add_argument("--calls", type=int, default=20_000, help="calls per timing")
    args = parser.parse_args()
    old = old_module(args.old)
    print(f"CPU µs per call, {args.old} (old) against the checkout (new)")
    print(f"{'operation':16} {'input':15} {'bytes':>5} {'old':>7} {'new':>7} {'new/old':>8}")
    for operation in ("strict_loads", "canonical_dumps"):
        for name, value in SAMPLES.items():
            data = cbor2.dumps(value, canonical=True)
            assert old.strict_loads(data, max_size=1 << 16) == value
            assert encoding.strict_loads(data, max_size=1 << 16) == value
            assert old.canonical_dumps(value) == encoding.canonical_dumps(value) == data
            if operation == "strict_loads":
                runs = (
                    lambda data=data: old.strict_loads(data, max_size=1 << 16),
                    lambda data=data: encoding.strict_loads(data, max_size=1 << 16),
                )
            else:
                runs = (
                    lambda value=value: old.canonical_dumps(value),
                    lambda value=value: encoding.canonical_dumps(value),
                )
            compare(operation, name, len(data), *runs, args)
    old_ids = old_module(args.old, "src/talos/core/agent_id.py")
    recipient = agent_id.agent_id_from_digest(bytes(range(32)))
    compare(
        "check_agent_id",
        "a recipient",
        len(recipient),
        lambda: old_ids.check_agent_id(recipient),
        lambda: agent_id.check_agent_id(recipient),
        args,
        digits=3,
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
