"""What the errors a developer meets first say: an unknown peer in plain grammar
naming the sources asked, a refusal by the peer with a hint about grants, and a
bad capability signature pointing at key-log discovery as well as import."""

from __future__ import annotations

import pytest

from talos.core.identity import Identity
from talos.core.keylog import KeyLog
from talos.core.peer_record import PeerRecord
from talos.errors import CapabilitySignatureInvalid, PeerNotFound, PeerRejected, PeerUnknown
from talos.peers import PeerDirectory
from talos.testing import FakeClock, SeededRng


class _NoCache:
    def keylog(self, agent_id: str, /) -> bytes | None:
        return None

    def put_keylog(self, agent_id: str, data: bytes, /) -> None:
        return None

    def peer_record(self, agent_id: str, /) -> bytes | None:
        return None

    def put_peer_record(self, record: bytes, /) -> None:
        return None

    def put_contact(self, agent_id: str, keylog: bytes, record: bytes | None, /) -> None:
        return None


class _Nobody:
    """A discovery source that answers: no such agent."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def keylog(self, agent_id: str, known: KeyLog | None) -> KeyLog:
        raise PeerNotFound(f"{self.name}: no agent {agent_id}")

    async def record(self, agent_id: str, keys: object, now: float) -> PeerRecord:
        raise PeerNotFound(f"{self.name}: no agent {agent_id}")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sources", "says"),
    [
        (["registry"], "not in the cache; the registry does not know it"),
        (["registry", "dht"], "not in the cache; neither the registry nor the DHT knows it"),
        ([], "not in the cache"),
    ],
)
async def test_an_unknown_peer_names_the_sources_that_answered(
    sources: list[str], says: str
) -> None:
    clock = FakeClock()
    me = Identity.create("me", rng=SeededRng(1), clock=clock)
    stranger = Identity.create("stranger", rng=SeededRng(2), clock=clock).agent_id
    directory = PeerDirectory(
        _NoCache(), [_Nobody(name) for name in sources], clock=clock, own=me.keylog
    )
    with pytest.raises(PeerUnknown) as unknown:
        await directory.keylog(stranger)
    assert str(unknown.value) == f"no agent {stranger}: {says}"
    assert "check the agent id" in unknown.value.hint


def test_a_refusal_by_the_peer_says_how_to_get_a_grant() -> None:
    refused = PeerRejected("did:talos:zX refused the message: no capability attached")
    assert "its reason says why" in refused.hint
    assert "ask the peer for a grant" in refused.hint
    assert "add_capability(TOKEN)" in refused.hint
    assert "hint: " in refused.diagnostics()


def test_a_bad_capability_signature_points_at_discovery_and_import() -> None:
    hint = CapabilitySignatureInvalid("forged").hint
    assert "add_capability(TOKEN)" in hint
    assert "--registry URL" in hint
    assert "--issuer-log FILE" in hint
    assert "suspect tampering" in hint
