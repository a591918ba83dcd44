"""Which databases each durable commit of an environment writes: a spy around
``Environment.write`` that notes the ``db`` of every put, ``putmulti`` and delete."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from talos.storage.environment import Environment


class _Spy:
    """A transaction (or a cursor of one) that notes the databases its writes go to."""

    def __init__(self, inner: Any, written: set[Any], db: Any = None) -> None:
        self._inner, self._written, self._db = inner, written, db

    def put(self, key: bytes, value: bytes, *, db: Any = None, **kwargs: Any) -> Any:
        self._written.add(db if db is not None else self._db)
        if db is None:
            return self._inner.put(key, value, **kwargs)
        return self._inner.put(key, value, db=db, **kwargs)

    def delete(self, key: bytes, value: bytes = b"", *, db: Any = None) -> Any:
        self._written.add(db if db is not None else self._db)
        if db is None:
            return self._inner.delete(key, value)
        return self._inner.delete(key, value, db=db)

    def putmulti(self, items: Any, **kwargs: Any) -> Any:
        items = list(items)
        if items:
            self._written.add(self._db)
        return self._inner.putmulti(items, **kwargs)

    def cursor(self, db: Any = None) -> _Spy:
        return _Spy(self._inner.cursor(db=db), self._written, db)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def record_written(environment: Environment, monkeypatch: pytest.MonkeyPatch) -> set[Any]:
    """From now on, add to the returned set the database of every write of ``environment``."""
    original = environment.write
    written: set[Any] = set()

    @contextlib.contextmanager
    def spying() -> Iterator[Any]:
        with original() as txn:
            yield _Spy(txn, written)

    monkeypatch.setattr(environment, "write", spying)
    return written
