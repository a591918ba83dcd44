"""``python -m talos.demo``: run the story in a temporary directory and clean up on any exit.

Owns the demo's life cycle: the directory, the signal handling (SIGTERM
becomes an interruption like Ctrl-C), the cleanup after a failure or an
interruption, the exit status and the closing ``demo pids: ...`` and
``demo finished in S s`` lines.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Final

from rich.markup import escape

from talos.demo import DemoFailure
from talos.demo.narration import console
from talos.demo.steps import Demo
from talos.testing.child import ChildProcess, still_running

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def abort(demo: Demo, error: BaseException) -> None:
    """Stop everything after a failure or an interruption; a second Ctrl-C cannot cut it short."""
    saved = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _STOP_SIGNALS}
    try:
        demo.shutdown(narrate=False)
        if isinstance(error, DemoFailure):
            for child in demo.children:
                demo.out.log(child.name, child.log_tail())
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def main() -> int:
    """Run the demo; 0 on success, 1 on a failed step, 130 when interrupted."""
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _interrupted)
    # Ctrl-C stops the demo even when it was started where SIGINT is ignored (a
    # shell's background job inherits SIG_IGN, and Python then keeps it ignored).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    children: list[ChildProcess] = []
    code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="talos-demo-") as tmp:
            demo = Demo(Path(tmp))
            children = demo.children
            try:
                demo.run()
            except BaseException as error:
                abort(demo, error)
                raise
        if Path(tmp).exists():
            raise DemoFailure(f"step {demo.last_step}: {tmp} was not removed")
        console.print(f"  [green]ok[/] [{demo.last_step}.clean] the demo directory is removed")
    except DemoFailure as exc:
        console.print(f"[bold red]demo failed:[/] {escape(str(exc))}")
        code = 1
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted: everything it started was stopped[/]")
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:  # None: not installed from Python
            signal.signal(signal.SIGINT, previous_int)
    left = [child.pid for child in children if still_running(child.pid)]
    console.print(f"demo pids: {' '.join(str(child.pid) for child in children)}")
    if left:
        console.print(f"[bold red]still running:[/] {' '.join(map(str, left))}")
        code = code or 1
    console.print(f"demo finished in {time.monotonic() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
