"""Recording the frames a real client sends, for tests that replay or tamper with them.

Not a test module. Used by test_client.py and test_request_reply.py.
"""

from __future__ import annotations

from talos.client import TalosClient
from talos.transport.link import Link


def record_sent(client: TalosClient) -> list[bytes]:
    """From now on, every frame ``client`` sends on a link it opens to a peer is
    appended to the returned list (and still sent)."""
    captured: list[bytes] = []
    deliverer = client._drivers.deliverer
    original = deliverer.link

    async def recording_link(peer: str) -> Link:
        link = await original(peer)
        send = link.send

        async def record(frame: bytes) -> None:
            captured.append(frame)
            await send(frame)

        link.send = record  # type: ignore[method-assign]
        return link

    deliverer.link = recording_link  # type: ignore[method-assign]
    return captured
