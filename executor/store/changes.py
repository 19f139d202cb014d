"""The changes the runner records, and how the writer thread writes a batch of them.

Each queued call of ``Store`` becomes one change value (a NamedTuple: cheap to build on the
event loop). The writer applies a batch of them in one transaction, in one of two ways:

- ``apply_batch``, the fast path, coalesces. A job changed several times in the batch gets ONE
  update (its final columns, guarded by the state it had before the batch's first change); an
  attempt that started and ended in the batch gets one row; and the rows of each table go to
  the database as ONE JSON array in one statement. One statement per table rather than one per row
  is what keeps recording from slowing the runner: Python's sqlite3 releases and retakes the GIL
  around every row it steps, and tens of thousands of rows a second of that ping-pong stall the
  event-loop thread (measured: about a third of the throughput of 10k trivial jobs). The result
  equals applying the changes one by one: coalescing keeps each job's last values, and the
  history rows keep their order.
- ``apply_one``, the exact path, applies a single change. The writer replays a batch with it
  only when the fast path finds a job or build that is not in the state the change expects (a
  bug), so that exactly the changes before the bad one are kept.

Build changes and artifacts are few: the fast path applies them with
``apply_one``, in queue order, before the job, attempt and log rows of their batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from executor.errors import InternalError
from executor.store import sql
from executor.store.backend import DbCursor

__all__ = [
    "ArtifactRecorded",
    "AttemptFinished",
    "AttemptStarted",
    "BuildChanged",
    "Change",
    "JobChanged",
    "LogAppended",
    "apply_batch",
    "apply_one",
]


class JobChanged(NamedTuple):
    """A state change: the job's row becomes ``columns`` (``sql.JOB_COLUMNS``, database values)
    if it is in ``from_state``, and its history gains row ``seq``."""

    job_id: str
    seq: int
    from_state: str
    event: str
    to_state: str
    at: str
    columns: tuple[Any, ...]


class AttemptStarted(NamedTuple):
    job_id: str
    number: int
    at: str


class AttemptFinished(NamedTuple):
    job_id: str
    number: int
    outcome: str
    exit_code: int | None
    signal: int | None
    at: str


class LogAppended(NamedTuple):
    job_id: str
    seq: int
    attempt: int
    stream: str
    content: bytes
    at: str


class ArtifactRecorded(NamedTuple):
    """A new artifact row (the columns of ``sql.INSERT_ARTIFACT``)."""

    id: str
    job_id: str
    path: str
    filename: str
    mime_type: str
    file_size: int
    sha1_sum: str
    sha256: str
    state: str
    created_at: str


class BuildChanged(NamedTuple):
    """Set ``names`` to ``values`` in the build's row; the build must exist."""

    build_id: str
    names: tuple[str, ...]
    values: tuple[Any, ...]


Change = (
    JobChanged | AttemptStarted | AttemptFinished | LogAppended | ArtifactRecorded | BuildChanged
)


def apply_batch(cursor: DbCursor, changes: Sequence[Change], dialect: sql.Dialect) -> bool:
    """The fast path. False when some change's guard does not hold: the caller rolls back and
    replays the batch with ``apply_one``."""
    statements = sql.batch_statements(dialect)
    jobs: dict[str, list[Any]] = {}  # job id -> [id, state before the batch, *JOB_COLUMNS]
    history: list[tuple[Any, ...]] = []
    attempts: dict[tuple[str, int], list[Any]] = {}  # upsert_attempts rows
    logs: list[LogAppended] = []
    for change in changes:
        if isinstance(change, JobChanged):
            row = jobs.get(change.job_id)
            if row is None:
                jobs[change.job_id] = [change.job_id, change.from_state, *change.columns]
            elif row[2] != change.from_state:  # the previous change left it in another state
                return False
            else:
                row[2:] = change.columns
            history.append(change[:6])
        elif isinstance(change, AttemptStarted):
            job_id, number, at = change
            attempts[job_id, number] = [job_id, number, at, None, None, None, None]
        elif isinstance(change, AttemptFinished):
            job_id, number, outcome, code, signal, at = change
            started = attempts.get((job_id, number))
            # Not started in this batch: an upsert that keeps an earlier start, or the row of
            # an attempt that never started, which began and ended at once.
            started_at = at if started is None else started[2]
            attempts[job_id, number] = [job_id, number, started_at, outcome, code, signal, at]
        elif isinstance(change, LogAppended):
            logs.append(change)
        elif apply_one(cursor, change) is not None:
            return False
    if jobs:
        cursor.execute(statements.update_jobs, (json.dumps(list(jobs.values())),))
        if cursor.rowcount != len(jobs):
            return False
        cursor.execute(statements.insert_transitions, (json.dumps(history),))
    if attempts:
        cursor.execute(statements.upsert_attempts, (json.dumps(list(attempts.values())),))
    if logs:  # bytes: not JSON; few rows compared with the rest, each carrying up to 64 KiB
        cursor.executemany(sql.INSERT_LOG_CHUNK, logs)
    return True


def apply_one(cursor: DbCursor, change: Change) -> str | None:
    """The exact path: apply one change; if its guard does not hold, apply nothing and return
    what was being recorded and what the database holds instead."""
    if isinstance(change, JobChanged):
        job_id, seq, old, event, new, at, columns = change
        cursor.execute(sql.UPDATE_JOB, (*columns, job_id, old))
        if cursor.rowcount != 1:
            row = cursor.execute(sql.JOB_STATE, (job_id,)).fetchone()
            found = "it does not exist" if row is None else f"the store has {row[0]!r}"
            return f"job {job_id} {old} -({event})-> {new}: {found}"
        cursor.execute(sql.INSERT_TRANSITION, (job_id, seq, old, event, new, at))
    elif isinstance(change, AttemptStarted):
        cursor.execute(sql.START_ATTEMPT, change)
    elif isinstance(change, AttemptFinished):
        job_id, number, outcome, code, signal, at = change
        cursor.execute(sql.FINISH_ATTEMPT, (job_id, number, outcome, code, signal, at, at))
    elif isinstance(change, LogAppended):
        cursor.execute(sql.INSERT_LOG_CHUNK, change)
    elif isinstance(change, ArtifactRecorded):
        cursor.execute(sql.INSERT_ARTIFACT, change)
    elif isinstance(change, BuildChanged):
        cursor.execute(sql.update_build(change.names), (*change.values, change.build_id))
        if cursor.rowcount != 1:
            values = dict(zip(change.names, change.values, strict=True))
            return f"build {change.build_id} {values}: it does not exist"
    else:  # a Change type this function was not taught
        raise InternalError(
            f"the store's writer cannot apply {type(change).__name__} changes; this is a bug in "
            "harmont-exec, please report it"
        )
    return None
