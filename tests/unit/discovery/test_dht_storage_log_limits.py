"""Values any DHT node can send us are refused in a bounded number of log lines."""

from __future__ import annotations

import logging

import pytest

from talos.discovery.dht_storage import ValidatingStorage
from talos.testing import FakeClock


def test_a_stream_of_invalid_values_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = ValidatingStorage(FakeClock())
    with caplog.at_level(logging.DEBUG, logger="talos.discovery.dht"):
        for n in range(1_000):
            assert not storage.put(n.to_bytes(20, "big"), b"\xff not a value")
    refused = [r for r in caplog.records if getattr(r, "event", None) == "dht_datagram_refused"]
    assert 1 <= len(refused) <= 20
