"""Real processes for integration tests: a registry server on a free loopback port.

Tests in Talos (and in applications built on it) talk to a real registry,
never a fake one; this module starts ``talos registry serve`` as a child
process and stops it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["RegistryProcess", "free_port", "registry_process"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass
class RegistryProcess:
    """A running ``talos registry serve``."""

    process: subprocess.Popen[bytes]
    url: str
    db: Path
    port: int

    def stop(self) -> None:
        """Terminate (then kill) the server and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_registry(
    db: Path, log: Path, *, port: int | None = None, ready: float = 20.0
) -> RegistryProcess:
    """Start the server and wait until ``/v1/time`` answers.

    Raises:
        RuntimeError: it exited or did not answer within ``ready`` seconds.
    """
    port = free_port() if port is None else port
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALOS_")}
    command = [sys.executable, "-m", "talos", "registry", "serve"]
    with log.open("ab") as stderr:
        process = subprocess.Popen(  # noqa: S603 -- our own interpreter and module
            [*command, "--host", "127.0.0.1", "--port", str(port), "--db", str(db)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    server = RegistryProcess(process, f"http://127.0.0.1:{port}", db, port)
    deadline = time.monotonic() + ready
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"registry exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/v1/time", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"registry not ready after {ready} s:\n{log.read_text()}")


@contextmanager
def registry_process(directory: Path) -> Iterator[RegistryProcess]:
    """A registry with its database and log in ``directory``, stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    server = start_registry(directory / "registry.db", directory / "registry.log")
    try:
        yield server
    finally:
        server.stop()
