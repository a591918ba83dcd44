"""`talos capabilities` between two real homes, as two operators would use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from talos.audit import AuditLog
from talos.testing.cli import TalosCli

CLI = TalosCli()
talos, ok = CLI.run, CLI.ok


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, str, Path, str]:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    return (
        alice,
        ok(alice, "init", "--name", "alice").strip(),
        bob,
        ok(bob, "init", "--name", "bob").strip(),
    )


def test_grant_verify_revoke(homes: tuple[Path, str, Path, str]) -> None:
    alice, _, _, bob_id = homes
    token = ok(
        alice,
        "capabilities",
        "grant",
        "--to",
        bob_id,
        "--action",
        "message.send",
        "--resource",
        "inbox/*",
        "--expires-in",
        "1h",
    ).strip()
    assert token.startswith("tcap1.")
    ok(
        alice,
        "capabilities",
        "verify",
        token,
        "--action",
        "message.send",
        "--resource",
        "inbox/a",
        "--holder",
        bob_id,
    )

    wrong = talos(alice, "capabilities", "verify", token, "--action", "tool.invoke", "--json")
    assert wrong.returncode == 6
    verdict = json.loads(wrong.stdout)
    assert verdict["valid"] is False
    assert verdict["reason"] == "ScopeMismatch"

    impostor = talos(
        alice,
        "capabilities",
        "verify",
        token,
        "--action",
        "message.send",
        "--resource",
        "inbox/a",
        "--holder",
        homes[1],
    )
    assert impostor.returncode == 6

    token_id = verdict["token_id"]
    ok(alice, "capabilities", "revoke", token_id, "--reason", "laptop stolen")
    revoked = talos(
        alice,
        "capabilities",
        "verify",
        token,
        "--action",
        "message.send",
        "--resource",
        "inbox/a",
        "--json",
    )
    assert revoked.returncode == 6
    assert json.loads(revoked.stdout)["reason"] == "Revoked"
    listed = json.loads(ok(alice, "capabilities", "list", "--json"))
    assert [(r["token_id"], r["direction"], r["state"]) for r in listed] == [
        (token_id, "granted", "revoked")
    ]
    with AuditLog.open(alice / "audit", readonly=True) as log:
        kinds = [(e.kind, e.peer) for e in log.query()]
        assert log.verify_chain().ok
    assert kinds == [
        ("CAPABILITY_GRANTED", bob_id),
        ("CAPABILITY_DENIED", bob_id),
        ("CAPABILITY_DENIED", homes[1]),
        ("CAPABILITY_REVOKED", None),
        ("CAPABILITY_DENIED", bob_id),
    ]


def test_tampered_token_is_refused(homes: tuple[Path, str, Path, str]) -> None:
    alice, _, _, bob_id = homes
    token = ok(
        alice,
        "capabilities",
        "grant",
        "--to",
        bob_id,
        "--action",
        "message.send",
        "--expires-in",
        "10m",
    ).strip()
    middle = len(token) // 2
    flipped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    result = talos(alice, "capabilities", "verify", flipped, "--action", "message.send")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_holder_adds_a_granted_token_after_verifying_it(
    homes: tuple[Path, str, Path, str], tmp_path: Path
) -> None:
    alice, alice_id, bob, bob_id = homes
    token = ok(
        alice,
        "capabilities",
        "grant",
        "--to",
        bob_id,
        "--action",
        "tool.invoke",
        "--expires-in",
        "2h",
        "--delegable",
    ).strip()
    unknown = talos(bob, "capabilities", "add", token)
    assert unknown.returncode == 1  # PeerUnknown: no registry, no file names the issuer
    assert "--issuer-log" in unknown.stderr

    log = tmp_path / "alice.keylog"
    ok(alice, "whoami", "--export-log", str(log))
    ok(bob, "capabilities", "add", token, "--issuer-log", str(log))
    held = json.loads(ok(bob, "capabilities", "list", "--json"))
    assert [(r["direction"], r["issuer"], r["state"], r["delegations"]) for r in held] == [
        ("held", alice_id, "valid", 4)
    ]

    not_mine = talos(alice, "capabilities", "add", token)
    assert not_mine.returncode == 6
    assert "granted to" in not_mine.stderr


def test_bad_arguments_are_clear(homes: tuple[Path, str, Path, str]) -> None:
    alice = homes[0]
    result = talos(
        alice, "capabilities", "grant", "--to", "bob", "--action", "x", "--expires-in", "1h"
    )
    assert result.returncode == 1
    assert "--to must be an agent id" in result.stderr
    result = talos(
        alice, "capabilities", "grant", "--to", homes[3], "--action", "x", "--expires-in", "soon"
    )
    assert "not a duration" in result.stderr
