"""The pure rules of pruning an anchored audit log (talos.core.audit.pruning)."""

from __future__ import annotations

import pytest

from talos.core.audit.entry import AuditKind
from talos.core.audit.pruning import (
    KEPT_KINDS,
    anchor_problem,
    drops_payload,
    pruned_record,
    step_end,
)

ROOT = b"\x42" * 32


@pytest.mark.parametrize(
    ("pruned", "anchored", "sealed", "end"),
    [
        (0, 100, 100, 100),  # everything anchored and sealed
        (0, 100, 64, 64),  # never past the last sealed block
        (0, 50, 64, 50),  # never past the anchored size
        (70, 50, 64, 70),  # the point never moves back (an older anchor)
        (0, 100, 0, 0),  # no block sealed yet: nothing
        (10, 10, 10, 10),  # nothing new
    ],
)
def test_a_step_ends_at_the_anchor_or_the_last_block_whichever_is_first(
    pruned: int, anchored: int, sealed: int, end: int
) -> None:
    assert step_end(pruned=pruned, anchored=anchored, sealed=sealed) == end


def test_a_hold_stops_a_step_before_what_it_still_needs() -> None:
    assert step_end(pruned=0, anchored=100, sealed=100, held=40) == 40
    assert step_end(pruned=0, anchored=30, sealed=100, held=40) == 30
    assert step_end(pruned=50, anchored=100, sealed=100, held=40) == 50  # never back
    assert step_end(pruned=0, anchored=100, sealed=100, held=None) == 100


def test_anchors_and_pruning_records_keep_their_payload() -> None:
    assert {AuditKind.AUDIT_ANCHORED, AuditKind.AUDIT_PRUNED} <= KEPT_KINDS
    # Evidence nothing can recompute keeps its payload too.
    assert not drops_payload(AuditKind.CHECKPOINT_COSIGNED)
    assert not drops_payload(AuditKind.AUDIT_EQUIVOCATION)
    assert not drops_payload("STATE_LOSS_ACCEPTED")
    assert not drops_payload("AUDIT_ANCHORED")
    assert not drops_payload(AuditKind.AUDIT_PRUNED)
    assert drops_payload("MESSAGE_SENT")
    assert drops_payload("APP_DEFINED_KIND")


def test_an_anchor_licenses_pruning_only_with_the_logs_own_root() -> None:
    data = {"size": 10, "root": ROOT}
    assert anchor_problem(data, 12, ROOT) is None
    assert "not the log's root" in str(anchor_problem(data, 12, b"\x00" * 32))
    assert "not inside the log" in str(anchor_problem(data, 9, None))
    assert "not inside the log" in str(anchor_problem({"size": 0, "root": ROOT}, 9, ROOT))
    for bad in ({"size": "10", "root": ROOT}, {"size": 10, "root": b"short"}, {}):
        assert "no tree size and root" in str(anchor_problem(bad, 12, ROOT))


def test_the_pruning_record_names_the_range_and_the_covering_anchor() -> None:
    anchor = {"size": 10, "root": ROOT, "chain": 31337, "tx": b"\x11" * 32, "block": 5}
    record = pruned_record(start=0, end=8, entries=7, anchor_seq=10, anchor=anchor)
    assert record == {
        "from": 0,
        "to": 8,
        "entries": 7,
        "anchor_seq": 10,
        "anchor_size": 10,
        "anchor_root": ROOT,
        "chain": 31337,
        "tx": b"\x11" * 32,
    }
    # An anchor written without chain details still names its size and root.
    bare = pruned_record(
        start=0, end=8, entries=7, anchor_seq=10, anchor={"size": 10, "root": ROOT}
    )
    assert set(bare) == {"from", "to", "entries", "anchor_seq", "anchor_size", "anchor_root"}
