"""Group commit: one thread owns the write connection and commits queued changes in batches.

Callers ``put`` changes and return at once. The writer thread waits for the first one, then,
unless a ``flush`` is waiting, lets changes gather until ``COMMIT_INTERVAL_S`` has passed since
its previous commit, takes everything queued (up to ``BATCH_LIMIT``) and applies it, whole and
in queue order, in ONE transaction. So the database is consistent at every commit and each
job's history keeps its order, the runner never waits for SQLite, and a steady stream of
changes costs a few commits a second instead of one per change: each commit, and each wake-up
of this thread, takes the GIL from the event loop for a moment. What a batch does to the tables
is ``changes.apply_batch``; this module only runs the thread, the transactions and the errors.

Failures are never dropped. A batch that the database refuses (disk full, read-only file, ...) is
rolled back. On a full disk the backend's reserve (a file kept beside a SQLite database) is
freed and the batch saved again, in order: from then on the writer is in ``trouble`` (the store
tells the running build to stop) and keeps every state change but job output only while it fits
in a quarter of the reserve, so the writes that stop the build land and nothing shown is lost
(SPEC §5).

A change whose guard does not hold (a bug: the store and the runner disagree about
a job's state) makes the writer roll the batch back and replay it one change at a time, keeping
the changes before the bad one. Either way the writer remembers the first error and applies
nothing after it; ``Writer.error`` exposes it for the store to raise.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from executor.errors import StoreError
from executor.store.backend import Backend, DbCursor
from executor.store.changes import Change, LogAppended, apply_batch, apply_one
from executor.store.failures import Failure

__all__ = ["BATCH_LIMIT", "COMMIT_INTERVAL_S", "THREAD_NAME", "WRITER_NICE", "Writer"]

BATCH_LIMIT = 5000
"""At most this many changes per transaction (bounds the writer's lock hold time)."""

COMMIT_INTERVAL_S = 0.05
"""The least time between two commits while changes keep coming: how stale a reader's view of
a running build can be."""


WRITER_NICE = 10
"""The writer thread's nice value (Linux): recording must not take CPU from the event loop or
the jobs. Starved while a build keeps every core busy, it commits bigger batches, which costs
less per change; it catches up as soon as a core is free (at the latest, at the final flush)."""

THREAD_NAME = "harmont-store-writer"
"""The writer thread's name (in a traceback, a profile; tests find its connection by it)."""


def _yield_cpu() -> None:
    """Lower this thread's scheduling priority to ``WRITER_NICE`` (Linux only: elsewhere the
    call would renice a whole process)."""
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except OSError:
        pass  # a sandbox that forbids it: the writer runs at normal priority


class _Flush(NamedTuple):
    done: threading.Event


class _Stop(NamedTuple):
    pass


class Writer:
    """The writer thread and its connection. ``put`` may be called from one thread at a time;
    ``flush`` from any thread."""

    def __init__(self, backend: Backend, on_commit: Callable[[int], None] | None = None) -> None:
        """``on_commit(n)`` is called (in the writer thread) after each commit, with the
        number of changes committed so far: the first ``n`` changes ``put`` are on disk."""
        self._backend = backend
        self._db = backend.connect()  # opened here so that a bad store fails in the caller
        self._queue: queue.SimpleQueue[Change | _Flush | _Stop] = queue.SimpleQueue()
        self._urgent = threading.Event()  # a flush or close is waiting: commit now
        self._error: StoreError | None = None
        self._on_commit = on_commit
        self.queued = 0  # changes put so far (by the one thread that puts)
        self.committed = 0  # of those, committed (written by the writer thread)
        # The disk filled and the reserve took the last writes: the build must stop. From then
        # on the job's output is dropped (counted here), its state changes still recorded.
        self.trouble: StoreError | None = None
        self.dropped_output: dict[str, int] = {}  # job id -> bytes of output not recorded
        self._output_budget = 0  # bytes of output the reserve may still take
        self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def error(self) -> StoreError | None:
        """The first failed write, if any (nothing queued after it was applied)."""
        return self._error

    def put(self, change: Change) -> None:
        self.queued += 1
        self._queue.put(change)

    def flush(self) -> None:
        """Block until everything queued before this call is committed or refused."""
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(_Flush(done))
        self._urgent.set()
        while not done.wait(1.0):
            if not self._thread.is_alive():  # not expected: the loop catches every error
                break

    def close(self) -> None:
        """Apply what is queued, stop the thread and close the connection."""
        if self._thread.is_alive():
            self._queue.put(_Stop())
            self._urgent.set()
            self._thread.join()

    def _loop(self) -> None:
        _yield_cpu()
        last_commit = -COMMIT_INTERVAL_S
        try:
            while True:
                first = self._queue.get()
                wait = last_commit + COMMIT_INTERVAL_S - time.monotonic()
                if wait > 0:
                    self._urgent.wait(wait)
                self._urgent.clear()  # before draining: a later flush sets it again
                batch = [first]
                while len(batch) < BATCH_LIMIT:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                changes: list[Change] = []
                stop = False
                flushes: list[_Flush] = []
                for item in batch:
                    if isinstance(item, _Flush):
                        flushes.append(item)
                    elif isinstance(item, _Stop):
                        stop = True
                    else:
                        changes.append(item)
                if changes and self._error is None:
                    self._apply(changes)
                    last_commit = time.monotonic()
                    if self._error is None:
                        self.committed += len(changes)
                        if self._on_commit is not None:
                            self._on_commit(self.committed)
                for flush in flushes:
                    flush.done.set()
                if stop:
                    return
        finally:
            self._db.close()

    def _apply(self, changes: list[Change]) -> None:
        """Commit ``changes`` in one transaction; on a full disk, free the reserve and go on
        in ``trouble`` (``_save_what_fits``); any other failure is the error."""
        if self.trouble is not None:
            failed = self._save_what_fits(changes)
        else:
            failed = self._commit(changes)
            if failed is not None and self._backend.failure(failed) is Failure.FULL:
                freed = self._backend.release_reserve()
                if freed:
                    self.trouble = self._backend.error(
                        "save queued writes: the disk is full (the space kept in reserve was "
                        "freed for the writes that stop the build)",
                        failed,
                    )
                    self._output_budget = freed // 4
                    failed = self._save_what_fits(changes)
        if failed is not None:
            self._error = self._backend.error(
                f"save {len(changes)} queued writes (none of them, nor any later one, is recorded)",
                failed,
            )

    def _save_what_fits(self, changes: list[Change]) -> Exception | None:
        """The disk is full and the reserve freed: keep the changes' order, every state change
        (what stops the build) and harmont-exec's own lines, and job output only while it fits
        in a quarter of the reserve; a job's output after a chunk that did not fit is dropped
        (none of it comes after a gap), counted in ``dropped_output``. None, or the error that
        even the state changes met."""
        group: list[Change] = []
        for change in changes:
            if not isinstance(change, LogAppended):
                group.append(change)
                continue
            if group:
                failed = self._commit(group)
                group = []
                if failed is not None:
                    return failed
            size = len(change.content)
            if change.stream == "meta":  # harmont-exec's own line (a few bytes): always tried
                if self._commit([change]) is not None:
                    self._drop(change)
            elif change.job_id in self.dropped_output or size > self._output_budget:
                self._drop(change)
            elif self._commit([change]) is None:
                self._output_budget -= size
            else:
                self._drop(change)
        return self._commit(group) if group else None

    def _drop(self, change: LogAppended) -> None:
        dropped = self.dropped_output
        dropped[change.job_id] = dropped.get(change.job_id, 0) + len(change.content)

    def _commit(self, changes: list[Change]) -> Exception | None:
        """One transaction of ``changes``: None once committed, else the driver's error (the
        transaction rolled back). A change whose guard fails is ``_error`` (a bug)."""
        cursor = self._db.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            if not apply_batch(cursor, changes, self._backend.dialect):
                cursor.execute("ROLLBACK")
                cursor.execute("BEGIN IMMEDIATE")
                self._apply_one_by_one(cursor, changes)
            cursor.execute("COMMIT")
        except self._backend.errors as exc:
            self._rollback()
            return exc
        except Exception as exc:  # a bug (a bad parameter type, ...): still never silent
            self._rollback()
            self._error = StoreError(
                f"could not record queued writes in {self._backend.location}: {exc!r}; this is "
                "a bug in harmont-exec, please report it"
            )
        finally:
            cursor.close()
        return None

    def _apply_one_by_one(self, cursor: DbCursor, changes: list[Change]) -> None:
        """Keep the changes before the first whose guard fails; record that one as the error."""
        for change in changes:
            refused = apply_one(cursor, change)
            if refused is not None:
                self._error = StoreError(
                    f"could not record {refused}; this is a bug in harmont-exec (the runner and "
                    "the store disagree), please report it"
                )
                return

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except self._backend.errors:
            pass  # the original error is the one to report; the database rolls back on close
