"""What ``talos inbox`` prints for data a non-conforming peer chose: never a failure.

A peer's JSON message can hold NaN or an infinity (its JSON text decodes to
them), its text can hold terminal escapes, and its ``sent_at`` can be a time
no calendar holds. The daemon's answer must still encode as strict JSON, and
the command must print every message.
"""

from __future__ import annotations

import json

import pytest

from talos.cli.agent import _print_message
from talos.cli.control import encode_line
from talos.cli.control_server import message_json
from talos.core.message import Message

_PEER = "did:talos:z6MkpeerExample"


def _message(data: object, sent_at: float = 1_700_000_000.0) -> Message:
    return Message(sender=_PEER, message_id=bytes(16).hex(), data=data, sent_at=sent_at)


@pytest.mark.parametrize(
    "data", [float("nan"), [float("inf")], {"x": float("-inf")}, {"n": [1, float("nan")]}]
)
def test_non_finite_json_travels_as_its_json_text(data: object) -> None:
    entry = message_json(_message(data))
    assert entry["type"] == "json-text"
    line = encode_line({"ok": True, "messages": [entry]})  # strict JSON: no NaN token
    (back,) = json.loads(line)["messages"]
    assert back["data"] == json.dumps(data, sort_keys=True)


def test_finite_json_is_unchanged() -> None:
    entry = message_json(_message({"a": [1, 2.5, None, "x"], "big": 10**300}))
    assert entry["type"] == "json"
    assert entry["data"] == {"a": [1, 2.5, None, "x"], "big": 10**300}


@pytest.mark.parametrize("as_json", [True, False])
def test_inbox_prints_hostile_messages(as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    messages = [
        message_json(_message("clear\x1b[2J\u202eevil\x00")),
        message_json(_message([float("nan")])),
        message_json(_message("late", sent_at=1e300)),
    ]
    for message in json.loads(encode_line({"messages": messages}))["messages"]:
        _print_message(message, as_json)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    if as_json:
        assert [json.loads(line)["type"] for line in lines] == ["text", "json-text", "text"]
    else:
        assert not {"\x1b", "\u202e", "\x00"} & set(lines[0])
        assert lines[0].endswith("clear\\x1b[2J\\u202eevil\\x00")
        assert lines[1].endswith("[NaN]")
        assert lines[2].startswith("1e+300 (Unix time)")
