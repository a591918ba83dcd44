"""Agent ids parse once: a valid id checked again is answered from a bounded cache, and
nothing invalid is ever cached or let through."""

from __future__ import annotations

from typing import Any

import pytest

from talos.core import agent_id
from talos.core.agent_id import agent_id_from_digest, check_agent_id, digest_from_agent_id
from talos.errors import MalformedFrame


def test_a_valid_id_is_parsed_once() -> None:
    digest = bytes(range(32))
    text = agent_id_from_digest(digest)
    before = agent_id._parsed.cache_info()
    assert digest_from_agent_id(text) == digest
    assert check_agent_id(text) == text
    after = agent_id._parsed.cache_info()
    assert after.hits == before.hits + 1
    assert after.maxsize == 1024


@pytest.mark.parametrize(
    "bad",
    [
        ["did:talos:z"],  # unhashable: refused before the cache, as MalformedFrame
        None,
        "did:talos:z",
        "did:talos:z0OIl",  # outside base58btc
        "did:talos:z" + "1" * 45,
        "did:web:example.com",
    ],
)
def test_invalid_ids_always_raise(bad: Any) -> None:
    for _ in range(2):
        with pytest.raises(MalformedFrame):
            digest_from_agent_id(bad)


def test_a_str_subclass_parses_like_its_text() -> None:
    class Name(str):
        pass

    text = agent_id_from_digest(b"\x07" * 32)
    assert digest_from_agent_id(Name(text)) == b"\x07" * 32
