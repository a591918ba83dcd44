"""Benchmarks of the LMDB audit log, with the crypto floor measured in the same run.

Run with ``python -m benchmarks.audit [--quick] [--entries N] [--json PATH]``.
Prints a table and writes JSON (default ``benchmarks/results/audit.json``).

The floor is SHA-256 of one encoded entry (the leaf hash), timed in the
same process; each figure is also given as a ratio to it. Durable means the
LMDB transaction was committed with ``fsync`` before the call returned, so
the append figures also depend on this machine's disk.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from talos.audit import AuditEntry, AuditLog, LogSigner, verify_inclusion
from talos.core.crypto import SigningKey
from talos.testing import FakeClock

RESULTS = Path(__file__).resolve().parent / "results"
SIGNER = LogSigner(SigningKey(bytes(range(32))), "bench.example")


@dataclass
class Result:
    name: str
    unit_us: float
    per_second: float
    ratio: float | None
    target: str | None
    met: bool | None
    note: str


def _record(i: int) -> tuple[str, dict[str, object], str | None]:
    digest = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return ("MESSAGE_SENT", {"message_id": digest[:16], "hash": digest, "size": i}, f"peer{i % 64}")


def _floor() -> float:
    kind, data, peer = _record(1)
    raw = AuditEntry(123_456, 1_700_000_000_000, kind, peer, data).to_bytes()
    return _best(lambda: hashlib.sha256(b"\x00" + raw).digest(), 20_000)


def _best(fn: Callable[[], object], calls: int, repeats: int = 3) -> float:
    """Best per-call time in µs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _group_commit(path: Path, n: int, producers: int) -> float:
    """Entries/s with ``producers`` coroutines each awaiting append_async in turn."""
    log = AuditLog.open(path, signer=SIGNER)
    records = iter([_record(i) for i in range(n)])

    async def producer() -> None:
        for kind, data, peer in records:
            await log.append_async(kind, data, peer=peer)

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(producers)))
        elapsed = time.perf_counter() - start
        await log.aclose()
        return elapsed

    elapsed = asyncio.run(run())
    return n / elapsed


def _single(path: Path, n: int) -> float:
    with AuditLog.open(path, signer=SIGNER) as log:
        start = time.perf_counter()
        for i in range(n):
            kind, data, peer = _record(i)
            log.append(kind, data, peer=peer)
        return n / (time.perf_counter() - start)


def _build(path: Path, n: int) -> float:
    """Build an ``n``-entry log with append_many (10,000 per transaction); entries/s."""
    with AuditLog.open(path, signer=SIGNER, clock=FakeClock()) as log:
        start = time.perf_counter()
        for base in range(0, n, 10_000):
            log.append_many([_record(i) for i in range(base, min(n, base + 10_000))])
        return n / (time.perf_counter() - start)


def run(n: int, group_n: int) -> list[Result]:
    floor = _floor()
    results = [Result("sha256_entry_leaf", floor, 1e6 / floor, None, None, None, "crypto floor")]

    def add(name: str, us: float, target: str | None, met: bool | None, note: str) -> None:
        results.append(Result(name, us, 1e6 / us, us / floor, target, met, note))

    with tempfile.TemporaryDirectory(prefix="talos-audit-bench-") as tmp:
        root = Path(tmp)
        rate = _group_commit(root / "group", group_n, producers=256)
        add(
            "append_async_group_commit",
            1e6 / rate,
            "≥ 50,000/s",
            rate >= 50_000,
            f"{group_n:,} entries, 256 concurrent appenders, fsync per transaction",
        )
        rate = _single(root / "single", 300 if group_n < 100_000 else 1000)
        add("append_single_durable", 1e6 / rate, None, None, "one fsync'd transaction each")
        rate = _build(root / "big", n)
        add("append_many_10k_batches", 1e6 / rate, None, None, f"building the {n:,}-entry log")

        start = time.perf_counter()
        log = AuditLog.open(root / "big", signer=SIGNER)
        size, head = log.size, log.root()
        reopen = (time.perf_counter() - start) * 1e6
        add("reopen_size_root", reopen, None, None, f"open + size + root at {size:,}")

        rng = random.Random(2026)  # noqa: S311 - picks benchmark indices, not secrets
        seqs = [rng.randrange(size) for _ in range(2000)]
        it = iter(seqs * 10)
        gen = _best(lambda: log.prove_inclusion(next(it)), 2000)
        add(
            "prove_inclusion",
            gen,
            "≤ 100 µs",
            gen <= 100,
            f"at {size:,}, entry re-hashed, self-checked",
        )
        proofs = [log.prove_inclusion(s) for s in seqs[:200]]
        pit = iter(proofs * 100)

        def check() -> None:
            p = next(pit)
            verify_inclusion(p.leaf_hash, p.leaf_index, p.tree_size, p.hashes, head)

        add(
            "verify_inclusion",
            _best(check, 2000),
            None,
            None,
            f"{len(proofs[0].hashes)}-hash proof",
        )
        cons = _best(lambda: log.prove_consistency(size // 3), 200)
        add("prove_consistency", cons, None, None, f"{size // 3:,} -> {size:,}")

        start = time.perf_counter()
        report = log.verify_chain()
        seconds = time.perf_counter() - start
        assert report.ok, report.problem
        target_s = 15 * size / 1_000_000
        add(
            "verify_chain",
            seconds * 1e6,
            f"≤ {target_s:g} s",
            seconds <= target_s,
            f"{size:,} entries, {report.blocks} signed blocks; {size / seconds:,.0f} entries/s",
        )
        log.close()
        disk = sum(f.stat().st_size for f in (root / "big").iterdir())
        results[-1].note += f"; data file {disk / size:.0f} B/entry"
    return results


def render(results: list[Result]) -> str:
    lines = [f"{'benchmark':28} {'µs/op':>14} {'ops/s':>12} {'× floor':>10}  target"]
    for r in results:
        ratio = f"{r.ratio:9.1f}×" if r.ratio is not None else " " * 10
        target = "" if r.target is None else f"{r.target} {'ok' if r.met else 'MISSED'}"
        lines.append(f"{r.name:28} {r.unit_us:14.2f} {r.per_second:12,.0f} {ratio}  {target}")
        lines.append(f"{'':28}   {r.note}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="about 20,000 entries (smoke test)")
    parser.add_argument("--entries", type=int, default=None, help="log size (default 1,000,000)")
    parser.add_argument("--json", type=Path, default=RESULTS / "audit.json")
    args = parser.parse_args()
    n = args.entries or (20_000 if args.quick else 1_000_000)
    results = run(n, group_n=min(n, 200_000))
    print(render(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "suite": "audit",
                "entries": n,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "processor_count": os.cpu_count(),
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
