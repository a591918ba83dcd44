"""Equivocations on the record (talos.client.equivocations), over a real audit log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from talos.audit import AuditKind, AuditLog, LogSigner
from talos.client.equivocations import Equivocations
from talos.core.crypto import SigningKey

SIGNER = LogSigner(SigningKey(bytes(range(32))), "alice", "alice/audit")
WITNESS = "did:talos:witness"


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    opened = AuditLog.open(tmp_path / "log", signer=SIGNER, commit_thread=False)
    for n in range(8):
        opened.append("MESSAGE_SENT", {"n": n}, peer="bob")
    yield opened
    opened.close()


def _fields(role: str, size: int, root: bytes) -> dict[str, object]:
    return {"role": role, "reason": "rollback", "held_size": size, "held_root": root}


def test_a_conflict_is_new_once_and_the_log_remembers_it(log: AuditLog) -> None:
    seen = Equivocations(log)
    fields = _fields("witness", 20, b"\x01" * 32)
    assert seen.first(WITNESS, fields)
    assert not seen.first(WITNESS, fields)  # the same held head again
    assert seen.first(WITNESS, _fields("witness", 21, b"\x02" * 32))  # another head: new
    assert seen.first(WITNESS, _fields("origin", 20, b"\x01" * 32))  # the other role: new
    log.append(AuditKind.AUDIT_EQUIVOCATION, fields, peer=WITNESS)
    assert not Equivocations(log).first(WITNESS, fields)  # after a restart: on the record


def test_an_origin_pauses_until_its_log_holds_the_witness_head(log: AuditLog) -> None:
    held = _fields("origin", 20, b"\x01" * 32)
    log.append(AuditKind.AUDIT_EQUIVOCATION, held, peer=WITNESS)
    seen = Equivocations(log)
    assert seen.paused(WITNESS)  # read from the log: a restart keeps the pause
    assert not seen.paused("did:talos:other")
    assert not seen.pause(WITNESS, 20, b"\x01" * 32)  # the same pause: nothing new to say
    # The witness holds a head the log does contain (its root at size 5): resumed.
    assert seen.pause(WITNESS, 5, log.root_at(5))
    assert not seen.paused(WITNESS)
