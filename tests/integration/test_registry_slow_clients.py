"""Slow and surplus clients of a real ``talos registry serve``, over real sockets.

Each server runs with deadlines shortened to about a second, so that a
client trickling its request head or body is seen cut within the deadline,
a flood past ``--max-connections`` is refused (and logged only a few times),
and ``/docs`` / ``/openapi.json`` exist only with ``--openapi``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from talos.core.identity import Identity
from talos.registry.limits import LOG_BURST
from talos.system import SYSTEM_CLOCK, SYSTEM_RNG
from talos.testing.processes import RegistryProcess, start_registry
from talos.testing.waiting import wait_until

HEADER_TIMEOUT = 1.0
REQUEST_TIMEOUT = 2.0
#: Time the server may take beyond a deadline on a loaded test machine.
SLACK = 1.5


def serve(directory: Path, header: float, request: float, cap: int) -> RegistryProcess:
    return start_registry(
        directory / "registry.db",
        directory / "stderr.log",
        extra=[
            *("--header-timeout", str(header), "--request-timeout", str(request)),
            *("--max-connections", str(cap), "--metrics-port", "0", "--log-format", "json"),
        ],
    )


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    served = serve(tmp_path, HEADER_TIMEOUT, REQUEST_TIMEOUT, 20)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[RegistryProcess]:
    """Deadlines long enough that the flood's connections stay open during the test."""
    served = serve(tmp_path, 20, 20, 20)
    try:
        yield served
    finally:
        served.stop()


def metric(registry: RegistryProcess, name: str, **labels: str) -> float:
    """A sample read from the registry's own metrics port (not capped)."""
    text = httpx.get(f"{registry.metrics_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def events(registry: RegistryProcess, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in registry.child.log_text().splitlines() if line[:1] == "{"]
    return [line for line in lines if line.get("event") == name]


def connect(registry: RegistryProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", registry.port), timeout=5)


def trickle(sock: socket.socket, data: bytes, interval: float, limit: float) -> tuple[bytes, float]:
    """Send ``data`` one byte per ``interval`` s until the server answers or closes.

    Returns what the server sent and the seconds it took; fails if the
    connection is still open after ``limit`` seconds.
    """
    started = time.monotonic()
    sock.settimeout(interval)
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # closed under us: read what was answered
            break
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            if time.monotonic() - started > limit:
                raise AssertionError(f"still open after {limit} s") from None
            continue
        except OSError:
            return b"", time.monotonic() - started
        return answer + read_all(sock), time.monotonic() - started
    return read_all(sock), time.monotonic() - started


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    chunks = []
    try:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, the connection left open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    [length] = [
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    ]
    while len(body) < length:
        body += sock.recv(4096)
    return data


def test_a_client_trickling_its_head_is_dropped(registry: RegistryProcess) -> None:
    silent = connect(registry)
    head = b"GET /v1/time HTTP/1.1\r\nHost: registry\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with connect(registry) as slow:
        answer, seconds = trickle(slow, head, 0.2, HEADER_TIMEOUT + SLACK)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert HEADER_TIMEOUT - 0.2 <= seconds <= HEADER_TIMEOUT + SLACK
    with silent:  # a connection that never sends a byte goes the same way
        assert read_all(silent).startswith(b"HTTP/1.1 408 ")
    assert metric(registry, "talos_registry_clients_dropped_total", reason="header_timeout") == 2
    [first, *_] = events(registry, "registry_client_dropped")
    assert (first["reason"], first["level"]) == ("header_timeout", "warning")
    assert httpx.get(f"{registry.url}/v1/time").status_code == 200  # others are served


def test_the_next_request_on_a_kept_alive_connection_has_the_same_deadline(
    registry: RegistryProcess,
) -> None:
    request = b"GET /v1/time HTTP/1.1\r\nHost: registry\r\nUpgrade: websocket\r\n\r\n"
    with connect(registry) as sock:
        sock.sendall(request)  # the Upgrade header is ignored: a plain answer
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        answer, seconds = trickle(sock, request, 0.2, HEADER_TIMEOUT + SLACK)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert HEADER_TIMEOUT - 0.2 <= seconds <= HEADER_TIMEOUT + SLACK


def test_a_body_trickled_at_one_byte_a_second_is_cut(registry: RegistryProcess) -> None:
    agent = Identity.create("slow", rng=SYSTEM_RNG, clock=SYSTEM_CLOCK).agent_id
    head = (
        f"PUT /v1/agents/{agent}/keylog HTTP/1.1\r\nHost: registry\r\n"
        "Content-Type: application/cbor\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    with connect(registry) as slow:
        slow.sendall(head)  # at once: only the body is slow
        answer, seconds = trickle(slow, b"\x00" * 100, 1.0, REQUEST_TIMEOUT + SLACK)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
    assert REQUEST_TIMEOUT - 1.0 <= seconds <= REQUEST_TIMEOUT + SLACK
    assert metric(registry, "talos_registry_clients_dropped_total", reason="request_timeout") == 1
    [dropped] = events(registry, "registry_client_dropped")
    assert dropped["reason"] == "request_timeout"


def test_connections_past_the_cap_are_refused_until_the_flood_ends(
    capped: RegistryProcess,
) -> None:
    registry = capped
    flood = [connect(registry) for _ in range(30)]
    try:
        wait_until(
            lambda: metric(registry, "talos_registry_connections_refused_total") == 10,
            10,
            what="10 connections refused",
        )
        assert metric(registry, "talos_registry_connections") == 20
        refused = 0
        for sock in flood:
            sock.settimeout(0.1)
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                continue  # one of the 20 served; the header timeout will close it
            except OSError:
                answer = b""
            assert answer == b"" or answer.startswith(b"HTTP/1.1 503 "), answer
            refused += 1
        assert refused == 10
        with pytest.raises(httpx.HTTPError):  # 503, or reset before it was read
            httpx.get(f"{registry.url}/v1/time", timeout=2).raise_for_status()
    finally:
        for sock in flood:
            sock.close()
    wait_until(registry.answers, 10, what="served again after the flood")
    logged = events(registry, "registry_connections_refused")
    assert 1 <= len(logged) <= LOG_BURST  # 11 refusals, a few lines
    assert all(line["limit"] == 20 for line in logged)


def test_garbage_requests_are_answered_400_and_logged_a_few_times(
    registry: RegistryProcess,
) -> None:
    for _ in range(50):
        with connect(registry) as sock:
            sock.sendall(b"\x00\x01 not http at all\r\n\r\n")
            assert read_all(sock).startswith(b"HTTP/1.1 400 ")
    text = registry.child.log_text()
    assert 1 <= text.count("Invalid HTTP request received.") <= LOG_BURST


def test_the_api_description_is_not_served_by_default(registry: RegistryProcess) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{registry.url}{path}").status_code == 404, path


def test_openapi_serves_the_api_description(tmp_path: Path) -> None:
    served = start_registry(tmp_path / "r.db", tmp_path / "stderr.log", extra=["--openapi"])
    try:
        for path in ("/docs", "/redoc"):
            assert httpx.get(f"{served.url}{path}").status_code == 200
        schema = httpx.get(f"{served.url}/openapi.json").json()
        assert "/v1/agents/{agent_id}/bundle" in schema["paths"]
    finally:
        served.stop()
