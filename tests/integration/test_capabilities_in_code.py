"""Capabilities in code: grant, add_capability, capabilities(), revoke between two real
agents (real sockets, LMDB stores, a registry process), and the CLI on the same stores."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.client import TalosClient
from talos.core.capability import Capability
from talos.errors import (
    CapabilitySignatureInvalid,
    Expired,
    InvalidArgument,
    PeerRejected,
    PeerUnknown,
    ScopeMismatch,
)
from talos.storage.agent_state import AgentState
from talos.storage.home import AgentHome
from talos.testing import FakeClock
from talos.testing.cli import TalosCli
from talos.testing.processes import RegistryProcess

CLI = TalosCli()


def audit_kinds(home: Path) -> list[str]:
    with AuditLog.open(home / "audit", readonly=True, extra_databases=AgentState.DATABASES) as log:
        assert log.verify_chain().ok
        return [entry.kind for entry in log.query()]


def counter(client: TalosClient, name: str) -> float | None:
    return client.metrics.registry.get_sample_value(name)


@pytest.mark.asyncio
async def test_grant_add_send_revoke_in_code(tmp_path: Path, registry: RegistryProcess) -> None:
    """Bob grants in code, Alice adds it in code (Bob's key log through the registry), her
    send() attaches it by itself; after Bob revokes it her next message is refused."""
    url = registry.url
    async with (
        TalosClient.create("bob", home=tmp_path / "b", registry_url=url) as bob,
        TalosClient.create("alice", home=tmp_path / "a", registry_url=url) as alice,
    ):
        token = await bob.grant(alice.agent_id, "message.send", expires_in=3600)
        assert counter(bob, "talos_capabilities_granted_total") == 1
        added = await alice.add_capability(token)
        assert (added.direction, added.issuer, added.subject, added.state) == (
            "held",
            bob.agent_id,
            alice.agent_id,
            "valid",
        )

        sent = await alice.send(bob.agent_id, "authorized", timeout=10)
        assert sent.status == "delivered"
        got = await bob.receive(timeout=10)
        assert got is not None
        assert got.capability_id is not None
        assert got.capability_id.hex() == added.token_id

        [granted] = bob.capabilities()
        [held] = alice.capabilities()
        assert granted == dataclasses.replace(held, direction="granted")
        assert (granted.actions, granted.resources, granted.delegable, granted.revoked) == (
            ("message.send",),
            ("*",),
            False,
            False,
        )
        assert granted.token == token

        revoked = await bob.revoke(granted.token_id, reason="the job is done")
        assert (revoked.token_id, revoked.known, revoked.already) == (granted.token_id, True, False)
        assert counter(bob, "talos_capabilities_revoked_total") == 1
        assert [(c.revoked, c.state) for c in bob.capabilities()] == [(True, "revoked")]
        again = await bob.revoke(token, reason="once more")  # the token itself works too
        assert again.already
        assert again.list_version == revoked.list_version
        assert counter(bob, "talos_capabilities_revoked_total") == 1

        with pytest.raises(PeerRejected, match="revoked"):
            await alice.send(bob.agent_id, "after the revocation", timeout=10, on_failure="raise")
        assert alice.queue_depth() == 0
        assert await bob.receive(timeout=0.2) is None
    bob_kinds = audit_kinds(tmp_path / "b")
    assert bob_kinds.count("CAPABILITY_GRANTED") == bob_kinds.count("CAPABILITY_REVOKED") == 1
    assert "CAPABILITY_DENIED" in bob_kinds
    assert audit_kinds(tmp_path / "a").count("CAPABILITY_RECEIVED") == 1


@pytest.mark.asyncio
async def test_bad_calls_are_refused_clearly(tmp_path: Path, registry: RegistryProcess) -> None:
    """Every bad argument raises InvalidArgument; a token for someone else, an expired or
    altered one and one from an unknown issuer each get their own error and hint;
    nothing is stored or audited."""
    url = registry.url
    clock = FakeClock(time.time())
    async with (
        TalosClient.create("bob", home=tmp_path / "b", registry_url=url) as bob,
        TalosClient.create("alice", home=tmp_path / "a", registry_url=url, clock=clock) as alice,
        TalosClient.create("carol", home=tmp_path / "c", discovery=[]) as carol,
    ):
        peer = alice.agent_id
        for bad in (0, -1, math.nan, math.inf, True, "1h", 3651 * 86400):
            with pytest.raises(InvalidArgument, match="expires_in"):
                await bob.grant(peer, "message.send", expires_in=bad)
        with pytest.raises(InvalidArgument, match="unknown action 'message.sned'"):
            await bob.grant(peer, "message.sned", expires_in=60)
        with pytest.raises(InvalidArgument, match="action"):
            await bob.grant(peer, "", expires_in=60)
        with pytest.raises(InvalidArgument, match="not an agent id"):
            await bob.grant("not-a-did", "message.send", expires_in=60)
        with pytest.raises(InvalidArgument, match="delegable"):
            await bob.grant(peer, "message.send", expires_in=60, delegable="yes")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="cannot be issued"):
            await bob.grant(peer, "message.send", expires_in=60, resource="a b")
        assert bob.capabilities() == []
        with pytest.raises(InvalidArgument, match="not a token this agent granted"):
            await bob.revoke("00" * 16, reason="never granted")
        with pytest.raises(InvalidArgument, match="32 hex digits"):
            await bob.revoke("abc", reason="not an id")

        for_bob = await carol.grant(bob.agent_id, "message.send", expires_in=60)
        with pytest.raises(ScopeMismatch, match="granted to") as not_mine:
            await alice.add_capability(for_bob)
        assert f"to {alice.agent_id}" in not_mine.value.hint

        carol_log = AgentHome(tmp_path / "c").keylog_path.read_bytes()  # whoami --export-log
        from_carol = await carol.grant(peer, "message.send", expires_in=60)
        with pytest.raises(PeerUnknown, match=f"issuer {carol.agent_id}") as unknown:
            await alice.add_capability(from_carol)  # carol never announced
        assert "issuer_logs=" in unknown.value.hint
        added = await alice.add_capability(from_carol, issuer_logs=[carol_log])
        assert added.issuer == carol.agent_id

        with pytest.raises(InvalidArgument, match="not a capability token"):
            await alice.add_capability("tcap1.AAAA")
        token = Capability.from_text(await bob.grant(peer, "message.send", expires_in=60))
        altered = dataclasses.replace(token, expires_ms=token.expires_ms + 3_600_000)
        with pytest.raises(CapabilitySignatureInvalid) as forged:
            await alice.add_capability(altered.to_text())
        assert "ask the issuer" in forged.value.hint

        clock.advance(600)  # beyond the 60 s expiry and the 60 s clock-skew allowance
        with pytest.raises(Expired) as expired:
            await alice.add_capability(token.to_text())
        assert "new grant" in expired.value.hint
        assert [c.issuer for c in alice.capabilities()] == [carol.agent_id]
    assert audit_kinds(tmp_path / "b").count("CAPABILITY_GRANTED") == 1  # the altered one's
    assert audit_kinds(tmp_path / "a").count("CAPABILITY_RECEIVED") == 1


@pytest.mark.asyncio
async def test_the_cli_goes_through_the_same_functions(
    tmp_path: Path, registry: RegistryProcess
) -> None:
    """`talos capabilities grant/add/list/revoke` beside running agents: add finds the
    issuer's key log through --registry (no exported file), the running agents see the
    CLI's tokens in capabilities() and use them, and the CLI's revocation is enforced."""
    url = registry.url
    bob_home, alice_home = tmp_path / "b", tmp_path / "a"
    async with (
        TalosClient.create("bob", home=bob_home, registry_url=url) as bob,
        TalosClient.create("alice", home=alice_home, registry_url=url) as alice,
    ):
        token = CLI.ok(
            bob_home,
            "capabilities",
            "grant",
            "--to",
            alice.agent_id,
            "--action",
            "message.send",
            "--expires-in",
            "1h",
        ).strip()
        # Alice sends before she holds the token: refused, and her running agent has
        # read her held tokens (none); the CLI's add below must still show through.
        with pytest.raises(PeerRejected, match="capability"):
            await alice.send(bob.agent_id, "too early", timeout=10, on_failure="raise")
        no_registry = CLI.run(alice_home, "capabilities", "add", token)
        assert no_registry.returncode == 1
        assert "--issuer-log" in no_registry.stderr
        assert "--registry" in no_registry.stderr
        CLI.ok(alice_home, "capabilities", "add", token, "--registry", url)
        [held] = alice.capabilities()
        [granted] = bob.capabilities()
        assert (held.direction, held.token, granted.direction, granted.token) == (
            "held",
            token,
            "granted",
            token,
        )
        rows = json.loads(CLI.ok(alice_home, "capabilities", "list", "--json"))
        assert [(r["token_id"], r["direction"], r["state"]) for r in rows] == [
            (held.token_id, "held", "valid")
        ]

        assert (await alice.send(bob.agent_id, "via the CLI", timeout=10)).status == "delivered"
        CLI.ok(bob_home, "capabilities", "revoke", held.token_id, "--reason", "done")
        assert [c.state for c in bob.capabilities()] == ["revoked"]
        with pytest.raises(PeerRejected, match="revoked"):
            await alice.send(bob.agent_id, "after", timeout=10, on_failure="raise")

        bad = CLI.run(
            bob_home,
            "capabilities",
            "grant",
            "--to",
            alice.agent_id,
            "--action",
            "message.sned",
            "--expires-in",
            "1h",
        )
        assert bad.returncode == 1
        assert "unknown action" in bad.stderr
    assert audit_kinds(alice_home).count("CAPABILITY_RECEIVED") == 1


def test_the_guide_sample_runs_as_written(tmp_path: Path, registry: RegistryProcess) -> None:
    """docs/guide/capabilities.md: its one code sample, run as a script, prints what the
    page says it prints."""
    page = (Path(__file__).parents[2] / "docs" / "guide" / "capabilities.md").read_text()
    blocks = page.split("```")
    [code] = [
        block.removeprefix("python\n") for block in blocks[1::2] if block.startswith("python")
    ]
    expected = next(b for b in blocks[1::2] if b.startswith("\nheld:")).strip().splitlines()
    script = tmp_path / "sample.py"
    script.write_text(code)
    env = {**os.environ, "TALOS_REGISTRY_URL": registry.url}
    result = subprocess.run(  # noqa: S603 -- our own interpreter and a file we wrote
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == expected
