"""A commit that appends no entry (an agent-state change alone) leaves the log's head
rows unwritten: each row rewritten costs the durable commit a B-tree page."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from talos.audit import AuditLog
from talos.testing import FakeClock


class _Spy:
    """A transaction (or cursor) that notes the databases its writes go to."""

    def __init__(self, inner: Any, written: list[Any], db: Any = None) -> None:
        self._inner, self._written, self._db = inner, written, db

    def put(self, key: bytes, value: bytes, *, db: Any = None, **kwargs: Any) -> Any:
        self._written.append(db if db is not None else self._db)
        return (
            self._inner.put(key, value, db=db, **kwargs)
            if db is not None
            else (self._inner.put(key, value, **kwargs))
        )

    def putmulti(self, items: Any, **kwargs: Any) -> Any:
        items = list(items)
        if items:
            self._written.append(self._db)
        return self._inner.putmulti(items, **kwargs)

    def cursor(self, db: Any = None) -> _Spy:
        return _Spy(self._inner.cursor(db=db), self._written, db)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_commit_without_entries_writes_only_the_callers_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    with AuditLog.open(tmp_path / "log", clock=clock, extra_databases=("x",)) as log:
        log.append("MESSAGE_SENT", {"n": 1})
        environment = log._environment
        original = environment.write
        written: list[Any] = []

        @contextlib.contextmanager
        def spying() -> Iterator[Any]:
            with original() as txn:
                yield _Spy(txn, written)

        monkeypatch.setattr(environment, "write", spying)
        x = log.database("x")

        def put(txn: lmdb.Transaction[bytes]) -> None:
            txn.put(b"k", b"v", db=x)

        clock.advance(5)
        log.append_with([], put)
        assert written == [x]
        size, root = log.size, log.root()
        written.clear()
        log.append_with([("MESSAGE_SENT", {"n": 2}, None)], put)
        assert environment.audit.meta in written
        assert log.size == size + 1
        assert log.root() != root
    with AuditLog.open(tmp_path / "log", clock=clock, extra_databases=("x",)) as log:
        assert log.size == 2
        assert log.verify_chain().ok
        with log.snapshot() as txn:
            assert txn.get(b"k", db=log.database("x")) == b"v"
