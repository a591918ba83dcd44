"""The demo's man in the middle: a WebSocket relay that copies frames, and a frame injector.

What it sees is exactly what an attacker on the network path sees: signed,
encrypted envelopes. Step 3 replays one of them; step 4 sends a forgery.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Final

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, WebSocketException

from talos.core import wire
from talos.demo import STOP_WAIT, WAIT, DemoFailure

_WS_OPTIONS: Final[dict[str, Any]] = {"compression": None, "max_size": wire.MAX_FRAME_SIZE}


class Wiretap:
    """A WebSocket relay on ``port`` to ``upstream`` that keeps a copy of every frame sent.

    It runs its own event loop in a thread. What it sees is exactly what an
    attacker on the network path sees: signed, encrypted envelopes.
    """

    def __init__(self, port: int, upstream: str) -> None:
        self.port = port
        self.upstream = upstream
        #: Frames from the connecting side (alice) to the upstream side (bob), in order.
        self.frames: list[bytes] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="talos-demo-wiretap", daemon=True)

    def start(self) -> None:
        """Listen; returns once the port is bound.

        Raises:
            DemoFailure: it cannot listen.
        """
        self._thread.start()
        if not self._ready.wait(WAIT) or self._failure is not None:
            raise DemoFailure(f"the wiretap cannot listen on port {self.port}: {self._failure}")

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(); the thread just ends
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._relay, "127.0.0.1", self.port, **_WS_OPTIONS):
            self._ready.set()
            await self._stop.wait()

    async def _relay(self, downstream: ServerConnection) -> None:
        try:
            async with connect(self.upstream, proxy=None, open_timeout=5, **_WS_OPTIONS) as up:
                pumps = {
                    asyncio.create_task(self._pump(downstream, up, record=True)),
                    asyncio.create_task(self._pump(up, downstream, record=False)),
                }
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        except (OSError, TimeoutError, WebSocketException):
            pass  # bob is not there: alice sees the connection drop and retries

    async def _pump(self, source: Any, sink: Any, *, record: bool) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in source:
                if record and isinstance(frame, bytes):
                    self.frames.append(frame)
                await sink.send(frame)
        with contextlib.suppress(ConnectionClosed):
            await sink.close()


async def _inject(url: str, frame: bytes, answer_within: float) -> bytes | None:
    """Open a WebSocket to ``url``, send ``frame``, return the first answer (if any)."""
    async with connect(url, proxy=None, open_timeout=5, **_WS_OPTIONS) as socket:
        await socket.send(frame)
        with contextlib.suppress(TimeoutError):
            answer = await asyncio.wait_for(socket.recv(), answer_within)
            return answer if isinstance(answer, bytes) else answer.encode()
    return None


def inject(url: str, frame: bytes, *, answer_within: float) -> bytes | None:
    """Send one frame to an agent's listener as a stranger would.

    Raises:
        DemoFailure: the listener cannot be reached.
    """
    try:
        return asyncio.run(_inject(url, frame, answer_within))
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise DemoFailure(f"cannot send a frame to {url}: {exc}") from exc
