"""What each durable commit writes: pages and bytes per LMDB commit, by the agent-state call.

Benchmark-only instrumentation used by :mod:`benchmarks.network` (in both agent
processes); nothing in ``src/`` knows about it. :func:`install` replaces
:meth:`talos.storage.environment.Environment.write` (every commit of the
agent's state and audit log goes through it) with a copy that reads the
committing thread's ``/proc/thread-self/io`` just before and just after
``txn.commit()``:

- ``wchar`` counts the bytes this thread handed to ``write``-family system
  calls. Inside ``commit()`` LMDB (no ``writemap``) makes exactly two kinds:
  ``pwrite``/``pwritev`` of every dirty page of the transaction (whole pages)
  and, with ``metasync``, one partial write of the meta page (the part after
  its fixed header, under a page) through its ``O_DSYNC`` descriptor. So
  ``wchar // page size`` is the number of B-tree pages the commit wrote, and
  the remainder is the meta write. Exact and per thread: ACK removals that
  commit in a worker thread, frames sent by the event loop, or the other
  process do not leak into the figure, however loaded the machine is.
- ``syscw`` is the number of those system calls (contiguous pages go out in
  one ``pwritev``).

Each commit is labelled with the :class:`~talos.storage.agent_state.AgentState`
method that made it (the innermost one on the stack), e.g. ``enqueue_many``
(the sender's outbox commit), ``commit_receive_many`` (the receiver's
receive commit), ``acknowledge`` (the receiver's application ACK),
``remove_many`` (the sender's ACK processing), with how many messages it
carried where the method takes a batch.

:func:`one_record_floor` measures the same figures for the smallest durable
commit: one 300-byte record in a fresh environment with Talos's sync settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from talos.storage import environment as _environment
from talos.storage.lmdb import lmdb_errors

PAGE = 4096
_IO = Path("/proc/thread-self/io")

#: Where a commit's messages are counted: method name → argument holding the batch.
_BATCH_ARGS = {
    "enqueue_many": "requests",
    "commit_receive_many": "batch",
    "remove_many": "removals",
    "record_attempts": "attempts",
    "acknowledge": "seqs",
}

#: Roles of the message path, in the order of a message's life.
ROLES = {
    "enqueue_many": "sender: outbox commit (queue, attempt, ratchet)",
    "enqueue": "sender: outbox commit, one message",
    "record_attempts": "sender: attempt commit (queued path)",
    "commit_receive_many": "receiver: receive commit",
    "commit_receive": "receiver: receive commit, one message",
    "acknowledge": "receiver: application ACK commit",
    "remove_many": "sender: ACK processing (outbox removal)",
    "remove": "sender: ACK processing, one message",
    "take": "reader: take from inbox",
}


def _io() -> tuple[int, int]:
    fields = dict(line.split(": ") for line in _IO.read_text().splitlines())
    return int(fields["wchar"]), int(fields["syscw"])


class Recorder:
    """Per-label lists of (pages, bytes, write calls, messages) of each commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
        self.tables: dict[str, Counter[str]] = defaultdict(Counter)
        self.cpu_start = time.process_time()
        self.times_start = os.times()
        self.threads_start = _thread_ticks()
        #: Off outside a phase, so that timed runs pay nothing but one attribute check.
        self.enabled = False

    def reset(self, *, record: bool = True) -> None:
        """Start a phase: CPU from now, and commits recorded if ``record``."""
        self.enabled = record
        with self._lock:
            self.rows.clear()
            self.tables.clear()
            self.cpu_start = time.process_time()
            self.times_start = os.times()
            self.threads_start = _thread_ticks()

    def report(self, messages: int) -> dict[str, Any]:
        """The summary, and this process's CPU µs per message since :meth:`reset`
        (in all, user and system, and per thread: ``/proc`` clock ticks, 10 ms steps)."""
        self.enabled = False
        cpu = time.process_time() - self.cpu_start
        times = os.times()
        threads = _thread_ticks()
        tick = 1e6 / os.sysconf("SC_CLK_TCK") / messages
        return {
            "cpu_us_per_message": round(cpu / messages * 1e6, 1),
            "user_us_per_message": round((times.user - self.times_start.user) / messages * 1e6),
            "system_us_per_message": round(
                (times.system - self.times_start.system) / messages * 1e6
            ),
            "threads_us_per_message": {
                name: round((n - self.threads_start.get(name, 0)) * tick)
                for name, n in sorted(threads.items())
                if n - self.threads_start.get(name, 0)
            },
            "commits": self.summary(),
        }

    def add(
        self,
        label: str,
        wchar: int,
        syscw: int,
        messages: int,
        tables: list[str] = (),  # type: ignore[assignment]
    ) -> None:
        with self._lock:
            self.rows[label].append((wchar // PAGE, wchar, syscw, messages))
            for table in tables:
                self.tables[label][table] += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        """Median and p90 pages per commit, bytes, write calls, messages per commit."""
        out = {}
        with self._lock:
            items = sorted(self.rows.items(), key=lambda kv: -len(kv[1]))
            for label, rows in items:
                pages = [r[0] for r in rows]
                messages = sum(r[3] for r in rows)
                out[label] = {
                    "role": ROLES.get(label, ""),
                    "commits": len(rows),
                    "pages_p50": statistics.median(pages),
                    "pages_p90": _p90(pages),
                    "pages_max": max(pages),
                    "bytes_p50": statistics.median(r[1] for r in rows),
                    "write_calls_p50": statistics.median(r[2] for r in rows),
                    "messages_per_commit": round(messages / len(rows), 2) if messages else None,
                    "pages_per_message": round(sum(pages) / messages, 2) if messages else None,
                    # Databases written, with the share of this label's commits that wrote each.
                    "tables": {
                        t: round(n / len(rows), 2) for t, n in sorted(self.tables[label].items())
                    },
                }
        return out


def _thread_ticks() -> dict[str, int]:
    """utime + stime of each thread of this process, by ``name:tid``, in clock ticks."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
            out[f"{name}:{task.name}"] = int(fields[11]) + int(fields[12])
    return out


def _p90(values: list[int]) -> float:
    return statistics.quantiles(values, n=10)[8] if len(values) >= 2 else float(values[0])


RECORDER = Recorder()


def dump(path: str, messages: int) -> None:
    """Write :data:`RECORDER`'s report as JSON to ``path`` (the worker's answer)."""
    Path(path).write_text(json.dumps(RECORDER.report(messages)))


def _label() -> tuple[str, int]:
    """The innermost AgentState method on the stack, and its batch size (0 if none)."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_filename.endswith("agent_state.py") and not code.co_name.startswith("_"):
            name = code.co_name
            batch = frame.f_locals.get(_BATCH_ARGS.get(name, ""), None)
            if batch is not None:
                return name, len(batch)
            return name, 1 if name in ROLES else 0
        frame = frame.f_back  # type: ignore[assignment]
    return "other (audit, setup)", 0


_WRITES = frozenset({"put", "delete", "replace", "pop", "putmulti"})


class _Proxy:
    """A transaction or cursor that notes which databases its writes touch."""

    def __init__(self, inner: Any, db: Any, touched: set[Any]) -> None:
        self._inner, self._db, self._touched = inner, db, touched

    def cursor(self, db: Any = None) -> _Proxy:
        return _Proxy(self._inner.cursor(db=db), db, self._touched)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in _WRITES:
            return attr
        touched, default = self._touched, self._db

        def noted(*args: Any, **kwargs: Any) -> Any:
            if not (name == "putmulti" and isinstance(args[0], list) and not args[0]):
                touched.add(kwargs.get("db", default))
            return attr(*args, **kwargs)

        return noted

    def __iter__(self) -> Any:
        return iter(self._inner)


def _names(environment: Any) -> dict[Any, str]:
    audit = environment.audit
    names = {
        getattr(audit, f): f"audit.{f}" for f in ("entries", "nodes", "blocks", "index", "meta")
    }
    names.update({db: name for name, db in environment._extra.items()})
    names[None] = "main"
    return names


def install() -> None:
    """Replace ``Environment.write`` with a copy that records each commit's writes."""

    @contextlib.contextmanager
    def write(self: Any) -> Iterator[lmdb.Transaction[bytes]]:
        if not RECORDER.enabled:
            with original(self) as txn:
                yield txn
            return
        label, messages = _label()
        with lmdb_errors(str(self.path)):
            txn = self._env.begin(write=True)
            touched: set[Any] = set()
            try:
                yield _Proxy(txn, None, touched)
            except BaseException:
                txn.abort()
                raise
            before = _io()
            txn.commit()
            after = _io()
        names = _names(self)
        tables = sorted(names.get(db, "?") for db in touched)
        RECORDER.add(label, after[0] - before[0], after[1] - before[1], messages, tables)

    original = _environment.Environment.write
    _environment.Environment.write = write  # type: ignore[method-assign]


def one_record_floor(directory: Path, count: int) -> dict[str, Any]:
    """Pages and bytes of a one-record durable commit (Talos's sync settings)."""
    env = lmdb.open(str(directory), map_size=64 << 20, sync=True, metasync=True)
    rows = []
    try:
        for n in range(count):
            txn = env.begin(write=True)
            txn.put(n.to_bytes(8, "big"), b"m" * 300)
            before = _io()
            txn.commit()
            after = _io()
            rows.append((after[0] - before[0], after[1] - before[1]))
    finally:
        env.close()
    pages = [w // PAGE for w, _ in rows]
    return {
        "role": "one 300-byte record, fresh environment",
        "commits": count,
        "pages_p50": statistics.median(pages),
        "pages_p90": _p90(pages),
        "pages_max": max(pages),
        "bytes_p50": statistics.median(w for w, _ in rows),
        "write_calls_p50": statistics.median(c for _, c in rows),
        "messages_per_commit": None,
        "pages_per_message": None,
    }


def by_databases(
    directory: Path, counts: tuple[int, ...] = (1, 2, 4, 6, 8), commits: int = 300
) -> list[dict[str, Any]]:
    """Time and pages of a durable commit that writes one 300-byte record into each of
    ``n`` databases (each first filled with 3,000 rows, so that its tree has a branch
    level like the agent's), for each ``n`` in ``counts``: whether the pages a commit
    writes cost time on this disk, or only the number of commits in series does.

    The rows are interleaved (one commit of each size in turn) so that a change
    in the disk's speed during the run reaches every size alike.
    """
    envs = []
    try:
        for n in counts:
            path = directory / f"dbs-{n}"
            path.mkdir()
            env = lmdb.open(str(path), map_size=256 << 20, max_dbs=16, sync=True, metasync=True)
            dbs = [env.open_db(f"db{i}".encode()) for i in range(n)]
            with env.begin(write=True) as txn:
                for db in dbs:
                    for _ in range(3000):
                        txn.put(os.urandom(16), os.urandom(200), db=db)
            envs.append((n, env, dbs))
        times: dict[int, list[float]] = {n: [] for n in counts}
        pages: dict[int, list[int]] = {n: [] for n in counts}
        for _ in range(commits):
            for n, env, dbs in envs:
                txn = env.begin(write=True)
                for db in dbs:
                    txn.put(os.urandom(16), os.urandom(300), db=db)
                before, started = _io(), time.perf_counter()
                txn.commit()
                times[n].append((time.perf_counter() - started) * 1e6)
                pages[n].append((_io()[0] - before[0]) // PAGE)
    finally:
        for _, env, _ in envs:
            env.close()
    return [
        {
            "databases": n,
            "pages_p50": statistics.median(pages[n]),
            "commit_us_p50": statistics.median(times[n]),
            "commit_us_p90": _p90([round(t) for t in times[n]]),
        }
        for n in counts
    ]


def render_by_databases(rows: list[dict[str, Any]]) -> str:
    lines = ["durable commit by databases written (one record each, interleaved):"]
    lines.append(f"  {'databases':>9} {'pages p50':>9} {'µs p50':>8} {'µs p90':>8}")
    for row in rows:
        lines.append(
            f"  {row['databases']:>9} {row['pages_p50']:>9.0f} "
            f"{row['commit_us_p50']:>8.0f} {row['commit_us_p90']:>8.0f}"
        )
    return "\n".join(lines)


def render(phases: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> str:
    """One table per phase and side: label, commits, pages p50/p90/max, bytes, calls."""
    lines = []
    for phase, sides in phases.items():
        for side, report in sides.items():
            labels = report["commits"]
            cpu = report.get("cpu_us_per_message")
            lines.append(
                f"\npages per durable commit, {phase}, {side}"
                + ("" if cpu is None else f" (process CPU {cpu:.0f} µs per message)")
                + ":"
            )
            if cpu is not None:
                threads = ", ".join(f"{k} {v}" for k, v in report["threads_us_per_message"].items())
                lines.append(
                    f"  CPU µs/msg: user {report['user_us_per_message']}, "
                    f"system {report['system_us_per_message']}; threads: {threads}"
                )
            if not labels:
                continue
            lines.append(
                f"  {'commit':28} {'n':>6} {'pages p50':>9} {'p90':>6} {'max':>5} "
                f"{'bytes p50':>10} {'writes':>6} {'msg/commit':>10} {'pages/msg':>9}"
            )
            for label, row in labels.items():
                per = row["messages_per_commit"]
                ppm = row["pages_per_message"]
                lines.append(
                    f"  {label:28} {row['commits']:6} {row['pages_p50']:9.1f} "
                    f"{row['pages_p90']:6.1f} {row['pages_max']:5} {row['bytes_p50']:10.0f} "
                    f"{row['write_calls_p50']:6.1f} {'' if per is None else per:>10} "
                    f"{'' if ppm is None else ppm:>9}"
                )
                tables = row.get("tables")
                if tables:
                    lines.append(
                        f"    {len(tables)} tables: "
                        + ", ".join(t if n == 1 else f"{t} ({n:.0%})" for t, n in tables.items())
                    )
    return "\n".join(lines)


def message_commits(directory: Path, cycles: int) -> dict[str, Any]:
    """Wall time per commit and CPU per cycle of the agent-state commits of one message
    each way, on a real environment and without the network: queue one (with its
    ``MESSAGE_SENT``), receive one (session, replay row, inbox, ``MESSAGE_RECEIVED``),
    remove the first on its ACK (``MESSAGE_DELIVERED``), take the second from the
    inbox. The storage layout's share of a round trip, measurable in paired runs
    (it uses only ``AgentState``'s public calls, so the same harness runs any
    commit); the first 100 cycles warm the trees and are not counted."""
    from talos.audit import AuditKind, AuditLog, AuditRecord
    from talos.core.agent_id import agent_id_from_digest
    from talos.core.clock import time_ms
    from talos.storage.agent_state import AgentState, InboxMessage
    from talos.testing import FakeClock, SeededRng

    peer = agent_id_from_digest(b"\x02" * 32)
    rng = SeededRng(5)
    clock = FakeClock()
    times: dict[str, list[float]] = {"enqueue": [], "commit_receive": [], "remove": []}
    with AuditLog.open(directory, clock=clock, extra_databases=AgentState.DATABASES) as log:
        state = AgentState(log, storage_key=bytes(32), clock=clock, rng=rng)
        state.put_session(peer, rng.bytes(800))
        cpu = 0.0
        for n in range(cycles + 100):
            clock.advance(0.003)
            sent, received = rng.bytes(16), rng.bytes(16)
            started, cpu_started = time.perf_counter(), time.process_time()
            state.enqueue(
                peer,
                sent,
                b"x" * 100,
                capability=None,
                queue_limit=1000,
                audit=[AuditRecord(AuditKind.MESSAGE_SENT, {"id": sent}, peer)],
            )
            queued = time.perf_counter()
            now = time_ms(clock)
            state.commit_receive(
                peer,
                session=rng.bytes(800),
                replay_id=received,
                timestamp_ms=now,
                message=InboxMessage(peer, received, b"y" * 100, now - 5, now, None),
                audit=[AuditRecord(AuditKind.MESSAGE_RECEIVED, {"id": received}, peer)],
            )
            received_at = time.perf_counter()
            state.remove(sent, audit=[AuditRecord(AuditKind.MESSAGE_DELIVERED, {"id": sent}, peer)])
            removed = time.perf_counter()
            state.take(1)
            if n >= 100:
                cpu += time.process_time() - cpu_started
                times["enqueue"].append(queued - started)
                times["commit_receive"].append(received_at - queued)
                times["remove"].append(removed - received_at)
    return {
        "cycles": cycles,
        **{f"{label}_us_p50": round(statistics.median(v) * 1e6, 1) for label, v in times.items()},
        "cpu_us_per_cycle": round(cpu / cycles * 1e6, 1),
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        floor = {"commits": {"one record": one_record_floor(Path(tmp), 50)}}
        print(render({"floor": {"this process": floor}}))
        rows = by_databases(Path(tmp))
        print(render_by_databases(rows))
        cycle = message_commits(Path(tmp) / "state", 1500)
        print(
            "\nagent-state commits of a message each way (p50 wall per commit, CPU per cycle):\n  "
            + "  ".join(f"{k} {v}" for k, v in cycle.items())
        )
        out = Path(__file__).resolve().parent / "results" / "commits.json"
        out.write_text(
            json.dumps(
                {"suite": "commits", "by_databases": rows, "message_commits": cycle}, indent=2
            )
            + "\n"
        )
