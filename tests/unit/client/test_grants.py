"""talos.client.grants without a network: two homes' token stores and audit logs, the
issuer's key log handed over as bytes (what `talos whoami --export-log` writes)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from talos.audit import AuditLog
from talos.cli.capabilities import StoreKeyLogs
from talos.client.capability_arguments import (
    check_actions,
    check_lifetime,
    check_patterns,
    check_reason,
    check_token,
    check_token_id,
)
from talos.client.grants import Grants
from talos.core.identity import Identity
from talos.core.revocation import RevocationState
from talos.errors import Expired, InvalidArgument, PeerUnknown, ScopeMismatch
from talos.peers import PeerDirectory
from talos.storage.tokens import TokenStore
from talos.testing import FakeClock, SeededRng


@dataclass
class Home:
    identity: Identity
    grants: Grants
    log: AuditLog

    def kinds(self) -> list[str]:
        return [entry.kind for entry in self.log.query()]


def open_home(stack: ExitStack, path: Path, name: str, clock: FakeClock, rng: SeededRng) -> Home:
    identity = Identity.create(name, rng=rng, clock=clock)
    tokens = stack.enter_context(TokenStore.open(path / "tokens"))
    log = stack.enter_context(AuditLog.open(path / "audit", clock=clock))

    def record(kind: str, data: dict[str, Any], peer: str | None) -> None:
        log.append(kind, data, peer=peer)

    grants = Grants(
        identity=lambda: identity,
        tokens=tokens,
        revocations=RevocationState(),
        peers=PeerDirectory(StoreKeyLogs(tokens), [], clock=clock, own=identity.keylog),
        record=record,
        clock=clock,
        rng=rng,
    )
    return Home(identity, grants, log)


@pytest.fixture
def homes(tmp_path: Path, clock: FakeClock, rng: SeededRng) -> Iterator[tuple[Home, Home]]:
    with ExitStack() as stack:
        yield (
            open_home(stack, tmp_path / "alice", "alice", clock, rng),
            open_home(stack, tmp_path / "bob", "bob", clock, rng),
        )


@pytest.mark.parametrize("bad", [0, 0.5, -1, math.nan, math.inf, True, "1h", None, 3651 * 86400])
def test_a_lifetime_is_1_second_to_3650_days(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="expires_in"):
        check_lifetime(bad)
    assert check_lifetime(1) == 1.0
    assert check_lifetime(3650 * 86400) == 3650 * 86400.0


def test_actions_in_the_agents_namespace_must_be_known() -> None:
    assert check_actions("message.send") == {"message.send"}
    assert check_actions(["tool.invoke", "message.*"]) == {"tool.invoke", "message.*"}
    for bad in ("message.sned", ["tool.invoke", "message.receive"]):
        with pytest.raises(InvalidArgument, match="unknown action"):
            check_actions(bad)
    for bad in ("", [], [""], b"message.send", 7, {"message.send": 1}):
        with pytest.raises(InvalidArgument, match="action"):
            check_actions(bad)
    with pytest.raises(InvalidArgument, match="resource"):
        check_patterns("resource", [1])


def test_token_ids_reasons_and_tokens() -> None:
    assert check_token_id("ab" * 16) == b"\xab" * 16
    assert check_token_id(b"\x01" * 16) == b"\x01" * 16
    for bad in ("ab" * 15, "zz" * 16, b"\x01" * 15, 16, None):
        with pytest.raises(InvalidArgument, match="32 hex digits"):
            check_token_id(bad)
    for bad in ("", "x" * 513, "two\nlines", 5):
        with pytest.raises(InvalidArgument, match="reason"):
            check_reason(bad)
    for bad in ("tcap1.AAAA", "hello", 5):
        with pytest.raises(InvalidArgument):
            check_token(bad)


@pytest.mark.asyncio
async def test_grant_add_list_revoke_between_two_stores(
    homes: tuple[Home, Home], clock: FakeClock
) -> None:
    alice, bob = homes
    token = alice.grants.grant(bob.identity.agent_id, "message.send", expires_in=60)
    assert alice.kinds() == ["CAPABILITY_GRANTED"]

    with pytest.raises(ScopeMismatch, match="granted to"):
        await alice.grants.add(token.to_text())
    with pytest.raises(PeerUnknown, match=alice.identity.agent_id) as unknown:
        await bob.grants.add(token.to_text())
    assert "--issuer-log" in unknown.value.hint
    held = await bob.grants.add(token, issuer_logs=[alice.identity.keylog.to_bytes()])
    assert (held.direction, held.issuer, held.state, held.delegable) == (
        "held",
        alice.identity.agent_id,
        "valid",
        False,
    )
    assert await bob.grants.add(token.to_text()) == held  # the issuer's log is kept now
    assert bob.grants.listing() == [held]
    assert bob.kinds() == ["CAPABILITY_RECEIVED", "CAPABILITY_RECEIVED"]

    with pytest.raises(InvalidArgument, match="not a token this agent granted"):
        await bob.grants.revoke(token.token_id, reason="not mine")
    done = await alice.grants.revoke(token.token_id.hex(), reason="done")
    assert (done.list_version, done.known, done.already) == (2, True, False)  # 1: the empty list
    assert (await alice.grants.revoke(token.to_text(), reason="again")).already
    assert [(i.revoked, i.state) for i in alice.grants.listing()] == [(True, "revoked")]
    assert alice.kinds() == ["CAPABILITY_GRANTED", "CAPABILITY_REVOKED"]

    later = alice.grants.grant(bob.identity.agent_id, "tool.invoke", expires_in=60)
    clock.advance(3600)
    with pytest.raises(Expired) as expired:
        await bob.grants.add(later)
    assert "new grant" in expired.value.hint
