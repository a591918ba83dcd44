"""The control socket's ``rotate`` op against a real in-process agent (real LMDB, key file)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from talos.cli.control_server import ControlServer
from talos.client import TalosClient
from talos.storage.home import AgentHome

pytestmark = pytest.mark.asyncio

PASSPHRASE = b"the operator's passphrase"


def files(home: Path) -> tuple[bytes, bytes]:
    return (home / "identity.key").read_bytes(), (home / "keylog.cbor").read_bytes()


async def test_rotate_op_checks_every_field_and_the_passphrase(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    async with TalosClient.create(
        "alice", home=home, discovery=[], passphrase=PASSPHRASE
    ) as client:
        server = ControlServer(client, home / "control.sock")

        async def ask(**request: Any) -> dict[str, Any]:
            return await server.handle(json.dumps({"op": "rotate", **request}).encode())

        before = files(home)
        good = base64.b64encode(PASSPHRASE).decode()
        refusals = [
            ({"reason": "", "emergency": True, "passphrase": good}, "ConfigurationError"),
            ({"emergency": True, "passphrase": good}, "ConfigurationError"),  # no reason
            ({"reason": "r", "revoke_old": True, "passphrase": good}, "ConfigurationError"),
            ({"emergency": "yes", "reason": "r", "passphrase": good}, "ConfigurationError"),
            ({"bogus": 1, "passphrase": good}, "ConfigurationError"),
            ({"reason": "r"}, "WrongPassphrase"),  # the key file has one: prove it
            ({"reason": "r", "passphrase": base64.b64encode(b"nope").decode()}, "WrongPassphrase"),
            ({"reason": "r", "passphrase": "not base64!"}, "ConfigurationError"),
        ]
        for request, error in refusals:
            answer = await ask(**request)
            assert (answer["ok"], answer["error"]) == (False, error), (request, answer)
            assert files(home) == before
        assert client.status()["agent_id"] == client.agent_id
        answer = await ask(reason="stolen", emergency=True, revoke_old=True, passphrase=good)
        assert answer["ok"] is True, answer
        assert answer["sequence"] == 1
        assert answer["agent_id"] == client.agent_id
        on_disk = AgentHome(home).load_identity(passphrase=PASSPHRASE)  # same passphrase
        assert on_disk.fingerprint == answer["fingerprint"]
        assert on_disk.keylog.revoking_event() is not None
