"""Group commit: one thread that owns the write connection and applies queued writes in batches.

Callers enqueue ``Write`` operations and return at once. The writer thread takes the first
queued item (blocking), drains whatever else is queued (up to ``BATCH_LIMIT``), applies every
operation of the batch, whole and in queue order, in ONE transaction, and commits. So the
database is consistent at every commit and each job's history keeps its order, while a runner
recording ~6 transitions per job never waits for a disk sync. Consecutive operations of the same
shape (same statements) go to SQLite with one ``executemany`` per statement: each statement's
rows keep their queue order, and a run's statements touch different tables, so the result is
the same as applying the operations one by one.

Failures are never dropped. A batch that SQLite refuses (disk full, read-only file, ...) is
rolled back. An operation whose guard matched no row (a bug: the store and the runner disagree
about a job's state) ends its batch: the batch is replayed one operation at a time and the
operations before the bad one are committed. Either way the writer remembers the first error
and applies nothing after it; ``Writer.error`` exposes it for the store to raise. This module
knows nothing about jobs or builds beyond the guard's words.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from executor.errors import StoreError
from executor.store.connection import store_error

__all__ = ["BATCH_LIMIT", "Guard", "Write", "Writer"]

BATCH_LIMIT = 5000
"""At most this many operations per transaction (bounds the writer's lock hold time)."""


class Guard(NamedTuple):
    """The first statement of a ``Write`` must change exactly one row. If it changes none, the
    error says ``what`` was being recorded and what ``probe`` (a query returning one value, or
    no row) finds instead."""

    what: str  # a %-format, filled with ``args`` only when the guard fails
    args: tuple[Any, ...]
    probe: str
    probe_params: tuple[Any, ...]


class Write(NamedTuple):
    """One operation: statements applied together, in one transaction, or not at all.
    (NamedTuples: the caller builds one per recorded change, so they must be cheap.)"""

    statements: tuple[str, ...]
    params: tuple[tuple[Any, ...], ...]  # one tuple per statement
    guard: Guard | None = None


class _Flush(NamedTuple):
    done: threading.Event


class _Stop(NamedTuple):
    pass


Item = Write | _Flush | _Stop


class Writer:
    """The writer thread and its connection. ``put`` may be called from one thread at a time;
    ``flush`` from any thread."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], path: Path) -> None:
        self._path = path
        self._db = connect()  # opened here so that a bad path fails in the caller
        self._queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._error: StoreError | None = None
        self._thread = threading.Thread(target=self._loop, name="harmont-store-writer", daemon=True)
        self._thread.start()

    @property
    def error(self) -> StoreError | None:
        """The first failed write, if any (nothing queued after it was applied)."""
        return self._error

    def put(self, op: Write) -> None:
        self._queue.put(op)

    def flush(self) -> None:
        """Block until everything queued before this call is committed or refused."""
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(_Flush(done))
        while not done.wait(1.0):
            if not self._thread.is_alive():  # not expected: the loop catches every error
                break

    def close(self) -> None:
        """Apply what is queued, stop the thread and close the connection."""
        if self._thread.is_alive():
            self._queue.put(_Stop())
            self._thread.join()

    def _loop(self) -> None:
        try:
            while True:
                batch: list[Item] = [self._queue.get()]
                while len(batch) < BATCH_LIMIT:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                ops = [item for item in batch if isinstance(item, Write)]
                if ops and self._error is None:
                    self._apply(ops)
                for item in batch:
                    if isinstance(item, _Flush):
                        item.done.set()
                if any(isinstance(item, _Stop) for item in batch):
                    return
        finally:
            self._db.close()

    def _apply(self, ops: list[Write]) -> None:
        cursor = self._db.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            if not self._apply_grouped(cursor, ops):
                cursor.execute("ROLLBACK")
                cursor.execute("BEGIN IMMEDIATE")
                self._apply_one_by_one(cursor, ops)
            cursor.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._error = store_error(
                f"save {len(ops)} queued writes (none of them, nor any later one, is recorded)",
                exc,
                self._path,
            )
        except Exception as exc:  # a bug (a bad parameter type, ...): still never silent
            self._rollback()
            self._error = StoreError(
                f"could not record queued writes in {self._path}: {exc!r}; this is a bug in "
                "harmont-exec, please report it"
            )
        finally:
            cursor.close()

    @staticmethod
    def _apply_grouped(cursor: sqlite3.Cursor, ops: list[Write]) -> bool:
        """The fast path; False (nothing committed) when some guard matched no row."""
        start, count = 0, len(ops)
        while start < count:
            first = ops[start]
            end = start + 1
            guarded = first.guard is not None
            while (
                end < count
                and ops[end].statements == first.statements
                and (ops[end].guard is not None) == guarded
            ):
                end += 1
            for index, statement in enumerate(first.statements):
                if end - start == 1:
                    cursor.execute(statement, first.params[index])
                else:
                    cursor.executemany(statement, [op.params[index] for op in ops[start:end]])
                # Guarded statements change at most one row each (they match a primary key).
                if index == 0 and guarded and cursor.rowcount != end - start:
                    return False
            start = end
        return True

    def _apply_one_by_one(self, cursor: sqlite3.Cursor, ops: list[Write]) -> None:
        """The exact path: stop at the first guard that matches no row, keep what precedes."""
        for op in ops:
            cursor.execute(op.statements[0], op.params[0])
            if op.guard is not None and cursor.rowcount != 1:
                row = cursor.execute(op.guard.probe, op.guard.probe_params).fetchone()
                actual = "it does not exist" if row is None else f"the store has {row[0]!r}"
                self._error = StoreError(
                    f"could not record {op.guard.what % op.guard.args}: {actual}; this is a bug in "
                    "harmont-exec (the runner and the store disagree), please report it"
                )
                return
            for statement, params in zip(op.statements[1:], op.params[1:], strict=True):
                cursor.execute(statement, params)

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one to report; SQLite rolls back on close anyway
