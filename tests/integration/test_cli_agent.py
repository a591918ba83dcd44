"""``talos run`` and the commands that use it, as real processes over a real registry."""

from __future__ import annotations

import json
import re
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from talos.cli.control import MAX_REQUEST
from talos.cli.exit_codes import exit_code_for_name
from talos.cli.lockfile import running_agent_pid
from talos.testing.child import spawn
from talos.testing.cli import TalosCli, clean_env, talos_argv
from talos.testing.processes import AgentProcess, RegistryProcess, launched
from talos.testing.waiting import wait_until

CLI = TalosCli()
talos = CLI.run


def ok(home: Path, *args: str) -> str:
    return CLI.ok(home, *args).strip()


@pytest.fixture
def start() -> Iterator[Callable[..., AgentProcess]]:
    """Starts ``talos run`` processes; every one is stopped at the end."""
    with launched() as launcher:
        yield launcher.agent


def test_send_inbox_status_and_delivery_after_restart(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    ok(alice_home, "init", "--name", "alice")
    bob_id = ok(bob_home, "init", "--name", "bob")
    # Granted before the agent runs: the agent owns the audit log while it runs.
    own = ok(alice_home, "capabilities", "grant", "--to", bob_id, "--action", "message.send",
             "--expires-in", "1h")  # fmt: skip
    url = ["--registry", registry.url]
    bob = start(bob_home, *url, "--accept", "open")
    alice = start(alice_home, *url, "--reconnect-interval", "1")
    assert bob.agent_id == bob_id

    sent = ok(alice_home, "send", bob_id, "hello bob", "--timeout", "10")
    assert sent.startswith("delivered ")
    assert ok(alice_home, "send", bob_id, '{"n": 1}', "--json").startswith("delivered ")
    messages = json.loads(ok(bob_home, "inbox", "--json"))
    assert [(m["sender"], m["type"], m["data"]) for m in messages] == [
        (alice.agent_id, "text", "hello bob"),
        (alice.agent_id, "json", {"n": 1}),
    ]
    assert messages[0]["message_id"] == sent.split()[1]
    assert json.loads(ok(bob_home, "inbox", "--json")) == []  # taken: shown once

    state = json.loads(ok(alice_home, "status", "--json"))
    assert state["queue_depth"] == 0
    assert bob_id in state["sessions"]
    assert state["registry_reachable"] is True
    assert "queue depth   0" in ok(alice_home, "status")
    assert bob_id in [row["agent_id"] for row in json.loads(ok(alice_home, "peers", "--json"))]

    # A capability not valid for this peer is refused before anything is queued (exit 6).
    refused = talos(alice_home, "send", bob_id, "x", "--capability", own)
    assert refused.returncode == exit_code_for_name("CapabilityDenied") == 6, refused.stderr
    assert "error: " in refused.stderr

    assert bob.stop() == 0
    assert not (bob_home / "control.sock").exists()
    queued = ok(alice_home, "send", bob_id, "while you were away", "--timeout", "1")
    assert queued.startswith("queued ")
    timed_out = talos(
        alice_home, "send", bob_id, "given up", "--timeout", "0.5", "--on-failure", "raise"
    )
    assert timed_out.returncode == 1
    assert "error: DeliveryTimeout:" in timed_out.stderr
    assert json.loads(ok(alice_home, "status", "--json"))["queue_depth"] == 1

    start(bob_home, *url, "--accept", "open")
    follow = spawn(
        talos_argv("--home", str(bob_home), "inbox", "--follow", "--json"),
        env=clean_env(),
        log=tmp_path / "follow.log",
        name="inbox --follow",
    )
    try:
        line = follow.read_line(30)
        assert json.loads(line)["data"] == "while you were away"
        follow.signal(signal.SIGINT)
        assert follow.wait(timeout=15) == 0
    finally:
        follow.stop()
    wait_until(
        lambda: json.loads(ok(alice_home, "status", "--json"))["queue_depth"] == 0,
        30.0,
        what="alice's queue drained",
        interval=0.2,
    )


def test_one_agent_per_home(tmp_path: Path, start: Callable[..., AgentProcess]) -> None:
    home = tmp_path / "solo"
    ok(home, "init", "--name", "solo")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home / "control.sock"))  # left behind as a crashed agent would
    stale.close()

    first = start(home)  # the stale socket is replaced
    assert stat.S_IMODE((home / "control.sock").stat().st_mode) == 0o600
    second = start(home, ready=False)
    assert second.process.wait(timeout=30) == 1
    assert "AgentAlreadyRunning" in second.log.read_text()
    assert ok(home, "status").startswith("agent")
    assert running_agent_pid(home) == first.process.pid

    assert first.stop() == 0
    assert not (home / "control.sock").exists()
    assert running_agent_pid(home) is None
    result = talos(home, "send", first.agent_id, "anyone?")
    assert result.returncode == 1
    assert f"no Talos agent is running for home {home}" in result.stderr
    assert "talos run" in result.stderr


def _ask(conn: socket.socket, stream: Any, request: bytes) -> dict[str, Any]:
    conn.sendall(request)
    answer: dict[str, Any] = json.loads(stream.readline())
    return answer


def test_control_socket_refuses_bad_requests(
    tmp_path: Path, start: Callable[..., AgentProcess]
) -> None:
    home = tmp_path / "c"
    ok(home, "init", "--name", "c")
    daemon = start(home, "--offline")
    peer = daemon.agent_id
    bad = {
        b"not json\n": "MalformedFrame",
        b"[1, 2]\n": "MalformedFrame",
        b'{"op": 7}\n': "MalformedFrame",
        b"\xff\xfe\n": "MalformedFrame",
        b'{"op": "reboot"}\n': "ConfigurationError",
        b'{"op": "status", "verbose": true}\n': "ConfigurationError",
        b'{"op": "send", "peer": "bob", "text": "hi"}\n': "ConfigurationError",
        b'{"op": "send", "peer": "%s", "text": 5}\n' % peer.encode(): "ConfigurationError",
        b'{"op": "send", "peer": "%s"}\n' % peer.encode(): "ConfigurationError",
        b'{"op": "send", "peer": "%s", "text": "x", "timeout": -1}\n'
        % peer.encode(): "ConfigurationError",
        b'{"op": "send", "peer": "%s", "text": "x", "capability": "nope"}\n'
        % peer.encode(): "InvalidArgument",
        b'{"op": "send", "peer": "%s", "text": "\\ud800"}\n' % peer.encode(): "ConfigurationError",
        b"[" * 100_000 + b"\n": "MalformedFrame",
        b'{"op": "send", "peer": "%s", "text": "x", "wait": "no"}\n'
        % peer.encode(): "ConfigurationError",
        b'{"op": "send", "peer": "%s", "text": "x", "expires_in": -1}\n'
        % peer.encode(): "ConfigurationError",
        b'{"op": "outbox", "peer": "x"}\n': "ConfigurationError",
        b'{"op": "cancel"}\n': "ConfigurationError",
        b'{"op": "cancel", "message_id": "xyz"}\n': "InvalidArgument",
        b'{"op": "cancel", "message_id": "%s"}\n' % (b"ab" * 16): "MessageNotFound",
        b'{"op": "inbox", "take": "yes"}\n': "ConfigurationError",
        b'{"op": "inbox", "limit": 0}\n': "ConfigurationError",
        b"{" + b" " * MAX_REQUEST + b"}\n": "MalformedFrame",
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(home / "control.sock"))
        with conn.makefile("rb") as stream:
            for request, error in bad.items():
                answer = _ask(conn, stream, request)
                assert (answer["ok"], answer["error"]) == (False, error), request[:80]
                assert answer["message"]
            # The same connection still works, and so does the daemon.
            assert _ask(conn, stream, b'{"op": "inbox"}\n') == {"ok": True, "messages": []}
            assert _ask(conn, stream, b'{"op": "peers"}\n') == {"ok": True, "peers": []}
            queued = _ask(
                conn, stream, b'{"op": "send", "peer": "%s", "json": [1]}\n' % peer.encode()
            )
            assert (queued["ok"], queued["status"]) == (True, "queued")  # offline: queued at once
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(home / "control.sock"))
        conn.sendall(b'{"op": "status"}')  # no newline: the end of input ends it
        conn.shutdown(socket.SHUT_WR)
        with conn.makefile("rb") as stream:
            assert json.loads(stream.readline())["status"]["agent_id"] == peer
    assert daemon.process.poll() is None
    assert json.loads(ok(home, "status", "--json"))["queue_depth"] == 1


def test_exit_codes_follow_the_error_class() -> None:
    assert exit_code_for_name("StoreCorrupted") == 3
    assert exit_code_for_name("Expired") == 6
    assert exit_code_for_name("PeerRejected") == 1
    assert exit_code_for_name("NoSuchError") == 1
    assert exit_code_for_name("ConfigurationError") == 1


def test_metrics_port_is_announced_and_a_busy_one_is_a_clean_error(
    tmp_path: Path, start: Callable[..., AgentProcess]
) -> None:
    home = tmp_path / "metered"
    ok(home, "init", "--name", "metered")
    daemon = start(home, "--offline", "--metrics-port", "0")
    line = daemon.read_line()  # printed and flushed with the first
    found = re.search(r"metrics on (http://127\.0\.0\.1:(\d+)/metrics)", line)
    assert found, line
    import urllib.request

    with urllib.request.urlopen(found.group(1), timeout=10) as response:  # noqa: S310 -- loopback
        assert b"talos_messages_queued" in response.read()

    other = tmp_path / "second"
    ok(other, "init", "--name", "second")
    busy = start(other, "--offline", "--metrics-port", found.group(2), ready=False)
    assert busy.process.wait(timeout=30) == 1
    text = busy.log.read_text()
    assert "cannot serve metrics" in text
    assert "Traceback" not in text


def test_listening_on_every_interface_needs_an_announced_address(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    """``--listen 0.0.0.0:PORT`` alone would announce an address nobody can reach;
    with ``--announce`` peers find the agent through the registry at that address."""
    carol_home, dave_home = tmp_path / "carol", tmp_path / "dave"
    ok(carol_home, "init", "--name", "carol")
    ok(dave_home, "init", "--name", "dave")
    url = ["--registry", registry.url]
    refused = talos(carol_home, "run", *url, "--listen", "0.0.0.0:0")
    assert refused.returncode != 0
    assert "--announce" in refused.stderr
    carol = start(
        carol_home, *url, "--listen", "0.0.0.0:0", "--announce", "127.0.0.1", "--accept", "open"
    )
    endpoint = json.loads(ok(carol_home, "status", "--json"))["endpoint"]
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+", endpoint), endpoint
    start(dave_home, *url)
    sent = ok(dave_home, "send", carol.agent_id, "found you", "--timeout", "10")
    assert sent.startswith("delivered ")


def test_commands_that_replace_what_the_agent_holds_wait_until_it_stops(
    tmp_path: Path, registry: RegistryProcess, start: Callable[..., AgentProcess]
) -> None:
    """init --new-identity, recover and audit restore are refused while the home's agent
    runs (it would sign with a replaced key, or write into a log swapped under it);
    rotate goes through the running agent (test_key_rotation.py)."""
    home = tmp_path / "erin"
    ok(home, "init", "--name", "erin")
    passfile = tmp_path / "pass"
    passfile.write_text("correct horse battery staple\n")
    backup = tmp_path / "erin.backup"
    ok(home, "backup", "--out", str(backup), "--passphrase-file", str(passfile))
    assert start(home, "--registry", registry.url).stop() == 0  # creates its audit log
    ok(home, "audit", "backup", "--out", str(tmp_path / "log-backup"))
    before = ok(home, "whoami", "--json")
    erin = start(home, "--registry", registry.url)
    for command in (
        ["init", "--new-identity"],
        ["recover", "--backup", str(backup), "--passphrase-file", str(passfile), "--force"],
        ["audit", "restore", "--backup", str(tmp_path / "log-backup")],
        ["audit", "rebuild"],
    ):
        refused = talos(home, *command)
        assert refused.returncode == exit_code_for_name("AgentAlreadyRunning"), refused.stderr
        assert "AgentAlreadyRunning" in refused.stderr
        assert f"talos {command[0]}" in refused.stderr
    assert ok(home, "whoami", "--json") == before  # nothing changed
    assert erin.stop() == 0
    assert ok(home, "rotate").startswith("rotated ")
    assert ok(home, "whoami", "--json") != before


def test_send_no_wait_and_the_outbox_commands(
    tmp_path: Path, start: Callable[..., AgentProcess]
) -> None:
    """`send --no-wait` returns queued at once; `outbox` lists, `outbox cancel` removes."""
    alice_home = tmp_path / "alice"
    ok(alice_home, "init", "--name", "alice")
    start(alice_home, "--offline")
    nobody = "did:talos:z" + "1" * 32
    first = ok(alice_home, "send", nobody, "one", "--no-wait", "--expires-in", "3600")
    second = ok(alice_home, "send", nobody, "two", "--no-wait")
    assert first.startswith("queued ")
    assert second.startswith("queued ")
    first_id, second_id = first.split()[1], second.split()[1]
    listed = json.loads(ok(alice_home, "outbox", "--json"))
    assert [e["message_id"] for e in listed[nobody]] == [first_id, second_id]
    assert 3500 < listed[nobody][0]["expires_in"] <= 3600
    assert listed[nobody][1]["expires_in"] is None
    assert second_id in ok(alice_home, "outbox", "list")
    assert ok(alice_home, "outbox", "cancel", first_id).startswith(f"cancelled {first_id}")
    again = talos(alice_home, "outbox", "cancel", "ab" * 16)
    assert again.returncode == 1
    assert "MessageNotFound" in again.stderr
    bad = talos(alice_home, "send", nobody, "x", "--no-wait", "--expires-in", "-1")
    assert bad.returncode == 2  # refused by the command line, nothing sent
    listed = json.loads(ok(alice_home, "outbox", "--json"))
    assert [e["message_id"] for e in listed[nobody]] == [second_id]
