"""A throwaway PostgreSQL cluster for tests: in a temporary directory, on a loopback port.

:class:`PostgresCluster` runs Debian's (or any) ``initdb`` and ``pg_ctl``
found on ``PATH`` or under ``/usr/lib/postgresql/*/bin``. PostgreSQL refuses
to run as root, so as root (tests here and in CI run as root) both run as the
``postgres`` user through ``runuser``, in a directory that user owns. The
cluster trusts local connections (no password), listens on 127.0.0.1 only,
and skips fsync: it is for tests. :meth:`PostgresCluster.create_database`
gives each test a fresh database and its ``postgresql://`` URL.

Usage::

    with PostgresCluster.started() as cluster:
        url = cluster.create_database()

Nothing here imports pytest; :func:`find_binaries` returning ``None`` is for
the caller to turn into a skip (or, in CI, a failure).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from talos.testing.processes import free_port

__all__ = ["SUPERUSER", "PostgresCluster", "find_binaries"]

#: The cluster's superuser (and, as root, the OS user that runs it).
SUPERUSER = "postgres"
_TIMEOUT = 60


def find_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or ``None`` when PostgreSQL is missing."""
    found = shutil.which("initdb")
    if found is not None:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class PostgresCluster:
    """A running test cluster: its directory, port and how to reach it."""

    bindir: Path
    directory: Path
    port: int
    #: fsync on (benchmarks comparing with SQLite's synchronous=FULL); off for tests.
    durable: bool = False
    _databases: int = field(default=0)

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @classmethod
    @contextmanager
    def started(
        cls, bindir: Path | None = None, *, durable: bool = False
    ) -> Iterator[PostgresCluster]:
        """A new cluster, stopped and deleted on exit; ``durable`` keeps fsync on.

        Raises:
            RuntimeError: PostgreSQL is missing, or ``initdb``/``pg_ctl`` failed.
        """
        found = bindir or find_binaries()
        if found is None:
            raise RuntimeError(
                "PostgreSQL is not installed (no initdb); run .ci/install-postgres.sh"
            )
        directory = Path(tempfile.mkdtemp(prefix="talos-pg-"))
        _own(directory)
        cluster = cls(found, directory, free_port(), durable)
        try:
            cluster._init()
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(directory, ignore_errors=True)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        self._databases += 1
        name = name or f"t{os.getpid()}_{self._databases}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit) and return its rows, if any."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(statement)  # tests build the SQL
            return cursor.fetchall() if cursor.description is not None else []

    def _init(self) -> None:
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.directory / "data"),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def start(self) -> None:
        """Start the server (again) on the same port, waiting until it accepts connections."""
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
        options += "-c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.directory / "data"),
                "-l",
                str(self.directory / "server.log"),
                "-o",
                options,
                "-w",
                "start",
            ]
        )

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``: like a crash); the data stays."""
        if (self.directory / "data" / "postmaster.pid").exists():
            self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.directory / "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                check=False,
            )

    def _run(self, argv: Sequence[str], *, check: bool = True) -> None:
        if os.geteuid() == 0:
            argv = ["runuser", "-u", SUPERUSER, "--", *argv]
        done = subprocess.run(  # noqa: S603 - our own argv
            argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False, cwd=self.directory
        )
        if check and done.returncode != 0:
            log = self.directory / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{argv[-1]} failed ({done.returncode}): {done.stderr}{tail}")


def _own(directory: Path) -> None:
    """As root, give ``directory`` to the ``postgres`` user (PostgreSQL will not run as root)."""
    if os.geteuid() == 0:
        shutil.chown(directory, SUPERUSER, SUPERUSER)
