"""What `rebuild --from-peers` prints about the roots it checked (talos.cli.audit.rebuild_peers)."""

from __future__ import annotations

from pathlib import Path

from talos.audit import AuditLog
from talos.audit.peer_rebuild import PeerLog, TrustedRoot
from talos.cli.audit.rebuild_peers import _anchored_note, _trust_lines
from talos.core.audit.checkpoint import LogSigner
from talos.core.audit.merkle import leaf_hash
from talos.core.crypto import SigningKey

KEY = SigningKey(bytes(range(32)))
SIGNER = LogSigner(KEY, "alice", "alice/audit")


def _copy(tmp_path: Path, anchored: bool) -> PeerLog:
    with AuditLog.open(tmp_path / "log", signer=SIGNER, commit_thread=False) as log:
        for n in range(4):
            log.append("MESSAGE_SENT", {"n": n}, peer="bob")
        if anchored:
            log.append("AUDIT_ANCHORED", {"size": 4, "root": log.root_at(4), "chain": 31337})
        copy = PeerLog("alice", "bob", [KEY.public_key])
        copy.entries = [e.to_bytes() for e in log.entries(0, log.size)]
    return copy


def test_an_anchored_copy_asks_for_the_chain(tmp_path: Path) -> None:
    (note,) = _anchored_note(_copy(tmp_path, anchored=True))
    assert "1 anchors, the newest at 4 entries on chain 31337" in note
    assert "--anchor-rpc" in note


def test_a_copy_never_anchored_says_nothing(tmp_path: Path) -> None:
    assert _anchored_note(_copy(tmp_path, anchored=False)) == []


def test_each_trust_root_is_printed_with_its_verdict(tmp_path: Path) -> None:
    copy = _copy(tmp_path, anchored=False)
    for raw in copy.entries:  # as if the 4 entries were verified
        copy.border.append(leaf_hash(raw))
    roots = [
        TrustedRoot(3, bytes(32), "witness w's cosigned head"),
        TrustedRoot(9, b"\1" * 32, "x"),
    ]
    first, second = _trust_lines(roots, copy)
    assert first.startswith("trust root: x at 9 entries")
    assert first.endswith("(a loss)")
    assert second.endswith(": matches")
