"""Running the ``talos`` command line the way a user does, for tests.

:class:`TalosCli` runs ``python -m talos`` (this interpreter) with no
terminal and an environment without inherited ``TALOS_*`` variables, and
returns a :class:`CliResult`. The same runner serves every home: the home is
an argument of each call, passed as ``--home`` (``None``: no ``--home``, for
commands that need none or a home named by ``TALOS_HOME`` in the environment).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CliResult", "TalosCli", "clean_env", "talos_argv"]


def clean_env(
    extra: Mapping[str, str] | None = None, *, drop: Sequence[str] = ("TALOS_",)
) -> dict[str, str]:
    """This process's environment without variables starting with ``drop``, plus ``extra``.

    Without ``TALOS_*`` no home, registry or passphrase leaks from the
    developer's shell into the process under test.
    """
    prefixes = tuple(drop)
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra or {})
    return env


def talos_argv(*args: str) -> list[str]:
    """The command line that runs ``talos ARGS`` with this interpreter."""
    return [sys.executable, "-m", "talos", *args]


@dataclass(frozen=True)
class CliResult:
    """What one ``talos`` command did."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def expect(self, code: int = 0) -> CliResult:
        """This result, if it exited ``code`` without a Python traceback.

        Raises:
            AssertionError: another exit status, or a traceback on stderr;
                the message holds the command's output.
        """
        if self.returncode != code:
            raise AssertionError(
                f"`talos {' '.join(self.argv[3:])}` exited {self.returncode}, "
                f"not {code}\nstdout: {self.stdout}\nstderr: {self.stderr}"
            )
        if "Traceback" in self.stderr:
            raise AssertionError(f"a traceback on stderr:\n{self.stderr}")
        return self


@dataclass(frozen=True)
class TalosCli:
    """How to run ``talos``: the environment, a wrapper command, a timeout.

    ``env`` is the whole environment of the command (default: :func:`clean_env`
    at the time of each call). ``prefix`` goes before the interpreter, e.g.
    ``env LD_PRELOAD=… FAKETIME=…`` for a shifted clock; ``new_session`` then
    makes a wrapping command and the command under it one process group.
    """

    env: Mapping[str, str] | None = None
    prefix: tuple[str, ...] = ()
    timeout: float = 60.0
    new_session: bool = False

    def argv(self, home: Path | None, *args: str) -> list[str]:
        """The full command line for ``talos [--home HOME] ARGS``."""
        home_args = [] if home is None else ["--home", str(home)]
        return [*self.prefix, *talos_argv(*home_args, *args)]

    def run(
        self, home: Path | None, *args: str, extra_env: Mapping[str, str] | None = None
    ) -> CliResult:
        """Run ``talos [--home HOME] ARGS`` to its end.

        Raises:
            subprocess.TimeoutExpired: it ran longer than the runner's timeout.
        """
        argv = self.argv(home, *args)
        done = subprocess.run(  # noqa: S603 -- our own interpreter and module
            argv,
            env={**(clean_env() if self.env is None else self.env), **(extra_env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
            start_new_session=self.new_session,
        )
        return CliResult(tuple(argv[len(self.prefix) :]), done.returncode, done.stdout, done.stderr)

    def ok(self, home: Path | None, *args: str, extra_env: Mapping[str, str] | None = None) -> str:
        """Run a command that must succeed (exit 0, no traceback); its stdout.

        Raises:
            AssertionError: it failed; the message holds its output.
        """
        return self.run(home, *args, extra_env=extra_env).expect(0).stdout

    def fails(
        self,
        home: Path | None,
        code: int,
        *args: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> CliResult:
        """Run a command that must exit ``code`` (without a traceback).

        Raises:
            AssertionError: it exited otherwise.
        """
        return self.run(home, *args, extra_env=extra_env).expect(code)
