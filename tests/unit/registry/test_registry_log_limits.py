"""What any client can make the registry log is rate-limited, with suppressed counts."""

from __future__ import annotations

import logging

import pytest
from registry_fixtures import CBOR, Agent, Served

from talos.testing import FakeClock

pytestmark = pytest.mark.asyncio


async def test_a_stream_of_refused_submissions_logs_a_bounded_number_of_lines(
    served: Served, alice: Agent, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"/v1/agents/{alice.agent_id}/keylog"
    with caplog.at_level(logging.INFO, logger="talos.registry"):
        for _ in range(100):
            answer = await served.http.put(url, content=b"\xff not a key log", headers=CBOR)
            assert answer.status_code == 400
        clock.advance(10)  # the client's bucket earns one line back
        await served.http.put(url, content=b"\xff not a key log", headers=CBOR)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "registry_rejected"]
    assert len(lines) == 6  # a burst of 5, then one after 10 s
    assert lines[-1].__dict__["suppressed"] == 95
    assert "95 more suppressed in the last 10 s" in lines[-1].getMessage()
    text = (await served.http.get("/metrics")).text
    assert 'talos_registry_rejections_total{kind="keylog",reason="MalformedFrame"} 101.0' in text
    assert 'talos_registry_log_lines_suppressed_total{event="registry_rejected"}' in text
