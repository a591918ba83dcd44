"""The soak's verdict on one direction of traffic (sender X to receiver Y), pure.

Inputs: what X's audit log says it committed (``MESSAGE_SENT``, in commit
order: the send order), X's journal (calls, returned sends, recoveries,
starts) and Y's journal (reads and starts), as written by ``soak_driver.py``.

What must hold (each violation is a line in :attr:`Verdict.problems`):

- **Each number committed once**: X's audit log holds ``X:0`` .. ``X:N-1``,
  each exactly once (the driver never sends a committed number again).
- **Queued in call order**: X's audit log commits the numbers in the order of
  their (last) ``send()`` calls, though up to eight run at once.
- **Returned sends are durable**: every send whose call returned (``sent``)
  is in X's audit log under the same message id.
- **Exactly once, in order**: the messages Y read from X, first reads only,
  are exactly X's committed messages, in X's commit order, each with its
  payload: none lost, none twice (under any id), none reordered, none
  unknown. A send interrupted by a kill before it returned is delivered
  once if its commit happened (``recovered``), else never (the number is
  sent again, as a new message, after the restart).
- **Re-reads only where the design allows them**: a read of an id Y had
  already journaled (at least once to the application) is the first read
  after a restart of Y and is the last message Y journaled before it was
  killed (journaled, not yet acknowledged).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Verdict", "judge"]


@dataclass
class Verdict:
    sender: str
    committed: int = 0
    calls: int = 0
    returned: int = 0
    #: Interrupted calls whose commit happened (found in the audit log on restart).
    recovered: int = 0
    #: Interrupted calls that had not committed: sent again after the restart.
    resent: int = 0
    delivered: int = 0
    rereads: int = 0
    problems: list[str] = field(default_factory=list)


def judge(
    sender: str,
    sender_id: str,
    count: int,
    committed: list[tuple[int, str]],
    sender_records: list[dict[str, Any]],
    receiver_records: list[dict[str, Any]],
) -> Verdict:
    """Check the direction ``sender`` → the receiver (see the module docstring)."""
    verdict = Verdict(sender, committed=len(committed))
    problems = verdict.problems
    id_of: dict[int, str] = {}
    for n, message_id in committed:
        if n in id_of:
            problems.append(f"{sender}:{n} committed twice ({id_of[n]}, {message_id})")
        id_of[n] = message_id
    if missing := sorted(set(range(count)) - id_of.keys()):
        problems.append(f"never committed: {[f'{sender}:{n}' for n in missing[:10]]}")
    number_of = {message_id: n for n, message_id in committed}

    calls = [r["n"] for r in sender_records if r["kind"] == "call"]
    last_call = {n: index for index, n in enumerate(calls)}
    called = [n for n, _ in committed if n in last_call]
    if called != sorted(called, key=last_call.__getitem__):
        pairs = zip(called, sorted(called, key=last_call.__getitem__), strict=True)
        at = next(i for i, (a, b) in enumerate(pairs) if a != b)
        names = [f"{sender}:{n}" for n in called[at : at + 3]]
        problems.append(f"queued out of call order at send {at}: {names}")
    returned = {r["n"]: r["id"] for r in sender_records if r["kind"] == "sent"}
    verdict.calls, verdict.returned = len(calls), len(returned)
    verdict.recovered = sum(1 for r in sender_records if r["kind"] == "recovered")
    verdict.resent = len(calls) - len(set(calls))
    for n, message_id in returned.items():
        if id_of.get(n) != message_id:
            problems.append(f"returned send {sender}:{n} ({message_id}) is not in the audit log")

    first: list[tuple[str, str]] = []
    seen: set[str] = set()
    segments: list[list[dict[str, Any]]] = []
    for record in receiver_records:
        if record["kind"] == "start":
            segments.append([])
        elif record["kind"] == "read" and segments:
            segments[-1].append(record)
    last_read: str | None = None
    for index, segment in enumerate(segments):
        for position, record in enumerate(segment):
            message_id = record["id"]
            if message_id in seen:
                verdict.rereads += 1
                if position != 0 or message_id != last_read:
                    problems.append(
                        f"{message_id} read again at read {position} of start {index}, "
                        f"not only as the unacknowledged last read before a kill"
                    )
            elif record["sender"] == sender_id:
                seen.add(message_id)
                first.append((message_id, record["data"]))
            last_read = message_id
    verdict.delivered = len(first)

    expected = [message_id for _, message_id in committed]
    got = [message_id for message_id, _ in first]
    for message_id, data in first:
        n = number_of.get(message_id)
        if n is None:
            problems.append(f"read {message_id} ({data!r}), which {sender} never committed")
        elif data != f"{sender}:{n}":
            problems.append(f"read {message_id} with {data!r}, committed as {sender}:{n}")
    datas = [data for _, data in first]
    if twice := sorted(d for d, c in Counter(datas).items() if c > 1):
        problems.append(f"delivered twice under different ids: {twice[:10]}")
    if lost := [m for m in expected if m not in seen]:
        names = [f"{sender}:{number_of[m]}" for m in lost]
        problems.append(f"lost ({len(lost)}): {names[:10]}")
    both = seen & set(expected)
    got_common = [m for m in got if m in both]
    expected_common = [m for m in expected if m in both]
    if got_common != expected_common:
        at = next(
            i for i, (a, b) in enumerate(zip(got_common, expected_common, strict=True)) if a != b
        )
        problems.append(
            f"out of order at delivery {at}: got {sender}:{number_of[got_common[at]]}, "
            f"expected {sender}:{number_of[expected_common[at]]}"
        )
    return verdict
