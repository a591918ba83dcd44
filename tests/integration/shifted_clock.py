"""A process whose wall clock is shifted: libfaketime preloaded, no wrapper.

Debian's ``faketime`` command is a wrapper that forks the program and names a
POSIX semaphore after its own pid (``/dev/shm/sem.faketime_sem_PID``). A
wrapper stopped by a signal leaves that semaphore behind, and when the pid is
reused later the next wrapper refuses to start ("sem_open: File exists"). On a
machine that runs the suite again and again, that is a matter of time.

So the processes here preload the library themselves: ``env LD_PRELOAD=...
FAKETIME=SHIFT`` execs the program in place (no second process), and the
library treats an existing semaphore as harmless. It still leaves one
semaphore and one shared-memory file per process; :func:`sweep` removes those
of processes that are gone.

Only the wall clock is shifted (``FAKETIME_DONT_FAKE_MONOTONIC``), so asyncio's
timers keep true time.
"""

from __future__ import annotations

import os
import re
import shutil
import sysconfig
from pathlib import Path

from talos.testing.child import still_running

#: Where Debian's ``libfaketime`` package puts the library (the multiarch
#: directory first); ``TALOS_TEST_LIBFAKETIME`` names another one.
_PLACES = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
           "/usr/local/lib/faketime/libfaketime.so.1")  # fmt: skip
_SHM = Path("/dev/shm")
_LEFT_BEHIND = re.compile(r"^(?:sem\.faketime_sem_|faketime_shm_)(\d+)$")


def _library() -> str | None:
    named = os.environ.get("TALOS_TEST_LIBFAKETIME")
    if named:
        return named if Path(named).is_file() else None
    own = Path(
        "/usr/lib", sysconfig.get_config_var("MULTIARCH") or "-", "faketime/libfaketime.so.1"
    )
    if own.is_file():  # this interpreter's architecture, not another one installed beside it
        return str(own)
    for place in _PLACES:
        found = sorted(Path("/").glob(place.lstrip("/")))
        if found:
            return str(found[0])
    return None


#: The preload library, or None when libfaketime is not installed.
LIBRARY = _library()
#: Why the tests that need it cannot run, when it is missing.
MISSING = (
    "libfaketime is not installed: install the Debian package 'faketime' "
    "(.ci/run and .ci/install-faketime.sh do), or name the library in TALOS_TEST_LIBFAKETIME"
)


def prefix(shift: str) -> tuple[str, ...]:
    """The command prefix that runs a program with its wall clock moved by ``shift``.

    ``shift`` is in libfaketime's syntax: ``+10m``, ``-10s``.
    """
    if LIBRARY is None:
        raise RuntimeError(MISSING)
    env = shutil.which("env") or "/usr/bin/env"
    return (env, f"LD_PRELOAD={LIBRARY}", f"FAKETIME={shift}", "FAKETIME_DONT_FAKE_MONOTONIC=1")


def sweep(shm: Path = _SHM) -> list[str]:
    """Remove the semaphores and shared memory libfaketime left for dead processes.

    Returns the names removed. Those of running processes are kept.
    """
    removed = []
    try:
        names = [entry.name for entry in shm.iterdir()]
    except OSError:
        return removed
    for name in names:
        match = _LEFT_BEHIND.match(name)
        if match is None or still_running(int(match.group(1))):
            continue
        try:
            (shm / name).unlink()
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed
