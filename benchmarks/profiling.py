"""Where a message's CPU goes: cProfile statistics summed into steps of the message path.

Used by :mod:`benchmarks.network` on both agents. cProfile's clock is wall
time, so two kinds of entry are not CPU and are set apart: the event loop
waiting in ``epoll`` (idle) and LMDB's ``commit`` (mostly its ``fdatasync``
and the meta page's ``O_DSYNC`` write, on the event-loop thread while frames
wait). Every other function's own time is assigned to one step by its module
(or, for C functions, its name); the shares of those steps are proportional
to CPU even on a loaded machine, because preemption lands on all of them
alike.
"""

from __future__ import annotations

import pstats
from pathlib import Path
from typing import Any

IDLE = "idle (epoll wait)"
COMMIT_STEP = "LMDB commit (fsync wait, event-loop thread)"

#: (step, what to match): C functions by a substring of their name, Python ones
#: by a substring of their file's path. The first match wins, in this order.
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (IDLE, ("'poll' of 'select.epoll'",)),
    (COMMIT_STEP, ("'commit' of 'Transaction'",)),
    ("Ed25519 sign/verify", ("_sodium.crypto_sign",)),
    (
        "ratchet crypto (AES-GCM, HKDF, HMAC, X25519) and its Python",
        ("cryptography", "_rust", "_openssl", "core/crypto.py", "core/ratchet.py", "hmac.py"),
    ),
    ("canonical CBOR encode/decode/check", ("cbor2", "core/encoding.py")),
    ("envelope fields, agent ids (base58)", ("core/wire.py", "core/agent_id.py", "divmod")),
    (
        "audit entries (hashing, tree, writer)",
        ("talos/audit/", "core/audit/", "sha256", "_hashlib"),
    ),
    ("LMDB reads and puts (no commit)", ("lmdb", "Cursor", "Transaction", "Environment")),
    ("agent state (rows, sealing, outbox, inbox)", ("talos/storage/",)),
    ("metrics and logs", ("prometheus_client", "talos/metrics", "talos/logs", "logging/")),
    (
        "event loop, sockets, websockets",
        ("asyncio/", "selectors", "websockets", "socket", "select.", "threading.py", "queue"),
    ),
    (
        "delivery bookkeeping (client, core rules, messages)",
        ("talos/client/", "talos/core/", "talos/transport/", "talos/peers"),
    ),
    ("benchmark application", ("benchmarks/",)),
)


def _step(filename: str, name: str) -> str:
    text = name if filename == "~" else filename
    for step, needles in STEPS:
        if any(needle in text for needle in needles):
            return step
    return "other (Python builtins, dataclasses, typing, ...)"


def breakdown(stats: pstats.Stats, messages: int) -> dict[str, Any]:
    """Own time per step: µs per message, and its share of the busy (non-idle) time."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    steps: dict[str, float] = {}
    for (filename, _, name), (_, _, tottime, _, _) in raw.items():
        step = _step(filename, name)
        steps[step] = steps.get(step, 0.0) + tottime
    busy = sum(t for s, t in steps.items() if s != IDLE) or 1.0
    cpu = sum(t for s, t in steps.items() if s not in (IDLE, COMMIT_STEP)) or 1.0
    rows = sorted(steps.items(), key=lambda item: -item[1])
    return {
        "busy_us_per_message": round(busy / messages * 1e6, 1),
        "steps": [
            {
                "step": step,
                "us_per_message": round(t / messages * 1e6, 1),
                "share_of_busy": None if step == IDLE else round(t / busy, 3),
                "share_of_cpu": None if step in (IDLE, COMMIT_STEP) else round(t / cpu, 3),
            }
            for step, t in rows
        ],
    }


def render(side: str, summary: dict[str, Any]) -> str:
    lines = [
        f"\nwhere the time goes, {side}: {summary['busy_us_per_message']:.0f} µs busy per message "
        "(profiled, wall clock)",
        f"  {'µs/msg':>8} {'busy':>6} {'cpu':>6}  step",
    ]
    for row in summary["steps"]:
        busy = "" if row["share_of_busy"] is None else f"{row['share_of_busy']:.0%}"
        cpu = "" if row["share_of_cpu"] is None else f"{row['share_of_cpu']:.0%}"
        lines.append(f"  {row['us_per_message']:8.1f} {busy:>6} {cpu:>6}  {row['step']}")
    return "\n".join(lines)


COMMIT = ("~", 0, "<method 'commit' of 'Transaction' objects>")


def commit_summary(stats: pstats.Stats, messages: int) -> dict[str, float]:
    """LMDB write commits (each one fsync) per message, and their mean time."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    row = raw.get(COMMIT)
    if row is None:
        return {"commits_per_message": 0.0, "mean_commit_us": 0.0, "share": 0.0}
    total = sum(r[2] for r in raw.values()) or 1.0
    return {
        "commits_per_message": round(row[1] / messages, 2),
        "mean_commit_us": round(row[2] / row[1] * 1e6, 1),
        "share": round(row[2] / total, 3),
    }


def top_entries(stats: pstats.Stats, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` functions with the most own time, with their share of the total."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in raw.values()) or 1.0
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:limit]
    out = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in rows:
        where = name if filename == "~" else f"{Path(filename).name}:{line}({name})"
        out.append(
            {
                "function": where,
                "calls": calls,
                "tottime_s": round(tottime, 4),
                "share": round(tottime / total, 3),
                "cumtime_s": round(cumtime, 4),
            }
        )
    return out
