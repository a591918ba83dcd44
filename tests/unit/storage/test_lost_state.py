"""The start-up guard on real stores: adopt, refuse, and keep the watermark following."""

from __future__ import annotations

import pytest

from talos.audit import AuditLog, LogSigner
from talos.core.identity import Identity
from talos.errors import StateLost
from talos.storage.home import AgentHome
from talos.storage.lost_state import guard
from talos.storage.tokens import TokenStore
from talos.storage.watermark import WATERMARK_FILE, load_watermark
from talos.testing import FakeClock


def _open(home: AgentHome, identity: Identity) -> tuple[AuditLog, TokenStore]:
    signer = LogSigner(identity.signing_key, identity.agent_id, f"{identity.agent_id}/audit")
    log = AuditLog.open(home.audit_path, signer=signer, block_entries=4, clock=FakeClock())
    return log, TokenStore.open(home.path / "capabilities")


def test_the_watermark_follows_blocks_and_capability_writes(
    home: AgentHome, identity: Identity
) -> None:
    log, tokens = _open(home, identity)
    with log, tokens:
        keeper = guard(home, identity, log, tokens)
        assert (home.path / WATERMARK_FILE).exists()
        log.append_many([("MESSAGE_SENT", {"n": n}, None) for n in range(6)])
        tokens.add_granted(b"\x01" * 16, b"token")
        recorded = load_watermark(home, identity.keylog)
        assert recorded is not None
        assert (recorded.marks.audit_size, recorded.marks.audit_blocks) == (4, 1)
        assert recorded.marks.capabilities == 1
        assert recorded.marks.audit_root == log.root_at(4)
        assert keeper.marks == recorded.marks


def test_a_lagging_watermark_is_brought_forward(home: AgentHome, identity: Identity) -> None:
    log, tokens = _open(home, identity)
    with log, tokens:
        guard(home, identity, log, tokens)
    log, tokens = _open(home, identity)
    with log, tokens:  # written without a guard: the watermark lags, as after a crash
        log.append_many([("MESSAGE_SENT", {"n": n}, None) for n in range(8)])
        tokens.add_held(b"\x02" * 16, b"token")
    log, tokens = _open(home, identity)
    with log, tokens:
        guard(home, identity, log, tokens)
    recorded = load_watermark(home, identity.keylog)
    assert recorded is not None
    assert (recorded.marks.audit_size, recorded.marks.capabilities) == (8, 1)


def test_a_shorter_store_is_refused_before_anything_is_written(
    home: AgentHome, identity: Identity
) -> None:
    log, tokens = _open(home, identity)
    with log, tokens:
        guard(home, identity, log, tokens)
        log.append_many([("MESSAGE_SENT", {"n": n}, None) for n in range(4)])
    (home.audit_path / "data.mdb").unlink()
    before = (home.path / WATERMARK_FILE).read_bytes()
    log, tokens = _open(home, identity)
    with log, tokens, pytest.raises(StateLost) as caught:
        guard(home, identity, log, tokens)
    assert caught.value.where == str(home.audit_path / "data.mdb")
    assert (home.path / WATERMARK_FILE).read_bytes() == before
