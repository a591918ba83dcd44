"""Group commit: the appends of one event-loop tick share one durable transaction.

Rules this module keeps:

* The first append of a tick starts a committer task; it runs after every
  callback of that tick, so all of the tick's records go into one
  transaction. Appends that arrive while it commits form the next batch.
* The commit runs in a worker thread (``asyncio.to_thread``) so the loop keeps
  serving during ``fsync``, unless the log was opened with
  ``commit_thread=False``.
* Each caller resumes only after *its* transaction is durable. A failed
  transaction fails every caller in it; a cancelled caller does not withdraw
  its record (it may still be committed).

Imported by :mod:`talos.audit.log`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from talos.audit.records import PreparedRecord
from talos.errors import StorageError

__all__ = ["GroupCommit"]


class GroupCommit:
    """Queues prepared records and commits them in batches through ``commit``."""

    def __init__(
        self, commit: Callable[[Sequence[PreparedRecord]], list[int]], *, in_thread: bool
    ) -> None:
        self._commit = commit
        self._in_thread = in_thread
        self._pending: list[tuple[PreparedRecord, asyncio.Future[int]]] = []
        self._committer: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        """Whether records are queued and not yet handed to a transaction."""
        return bool(self._pending)

    async def append(self, record: PreparedRecord) -> int:
        """Queue ``record``; return its sequence number once its transaction is durable.

        Raises:
            Whatever the batch's commit raised.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append((record, future))
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._run())
        return await future

    async def wait(self) -> None:
        """Wait until no committer task is in flight."""
        while self._committer is not None and not self._committer.done():
            await asyncio.wait([self._committer])

    def drain(self) -> None:
        """Commit what is still queued now, in the calling thread (the log is closing).

        Raises:
            Whatever the commit raised; the queued callers get the same error.
        """
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            seqs = self._commit([r for r, _ in batch])
        except Exception as exc:
            for _, future in batch:
                future.get_loop().call_soon_threadsafe(_settle, future, None, exc)
            raise
        for (_, future), seq in zip(batch, seqs, strict=True):
            future.get_loop().call_soon_threadsafe(_settle, future, seq, None)

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                records = [r for r, _ in batch]
                if self._in_thread:
                    seqs = await asyncio.to_thread(self._commit, records)
                else:
                    seqs = self._commit(records)
            except BaseException as exc:
                error = (
                    exc if isinstance(exc, Exception) else StorageError("group commit cancelled")
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), seq in zip(batch, seqs, strict=True):
                if not future.done():
                    future.set_result(seq)


def _settle(future: asyncio.Future[int], seq: int | None, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    elif seq is not None:
        future.set_result(seq)
