"""The replier's memory of what it answered: the audit log backs it once it forgets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from talos.audit import AuditLog, LogSigner
from talos.client import replies as replies_module
from talos.client.replies import Replies
from talos.core.crypto import SigningKey
from talos.core.message import Message
from talos.testing import FakeClock

PEER = "did:talos:z" + "2" * 32


def test_a_reply_forgotten_from_memory_is_found_in_the_audit_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(start=time.time())
    signer = LogSigner(SigningKey(b"\x05" * 32), "replier", "replier/audit")
    with AuditLog.open(tmp_path / "audit", signer=signer, clock=clock) as log:
        replies = Replies(log=log, sender=None, clock=clock, kick=lambda peer: None)  # type: ignore[arg-type]
        clock.advance(120)  # the request below arrives well after the start
        request_id = b"\x07" * 16
        log.append_many([("REPLY_SENT", {"id": b"\x08" * 16, "re": request_id}, PEER)])
        request = Message(
            PEER, request_id.hex(), "q", clock.time(), request_expires_at=clock.time() + 60
        )
        # All of this run's replies in memory: a miss means "not answered".
        assert not replies.attach(request).replied
        # Once the memory is full (older replies forgotten), a miss asks the log.
        monkeypatch.setattr(replies_module, "REMEMBERED", 1)
        replies._replied[(PEER, b"\x09" * 16)] = b"\x0a" * 16
        assert replies.attach(request).replied
