"""Recording builds and the build queue of `serve`, each operation ONE transaction.

- ``plan_rows``: a new build's jobs, dependencies and first history rows, from its plan.
- ``insert_build``: a new build with its jobs, their dependencies and first history rows; its
  number taken from its pipeline in the same transaction. Run at once by the process that
  records it (its executor columns say so), queued for a `serve` (no executor yet: nobody
  treats it as lost), or refused at submission (``failed``, no jobs, its error set).
- ``claim_build``: the oldest build queued on this host becomes this process's. SQLite's
  ``BEGIN IMMEDIATE`` serializes claims; on PostgreSQL the candidate row is locked with ``FOR
  UPDATE SKIP LOCKED``, so two processes never claim the same build and neither waits for the
  other.
- ``cancel_build``: a queued build is canceled there and then (its jobs ``canceled`` through the
  transition table, with their history rows); a running one is marked ``cancel_requested``, for
  its executor to see (``Scheduler`` reads it about every second); a finished one is left as it
  is.

``Store`` calls these with its lock held and names the store in errors; driver errors
propagate. Nothing here decides a state: the table in ``executor.states`` does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from executor.errors import ErrorCode
from executor.plan import Plan
from executor.states import BuildState, Event, JobState, transition
from executor.store import sql
from executor.store.backend import Connection
from executor.store.recovery import reuse_in_transaction

__all__ = [
    "QUEUED",
    "Executor",
    "NewBuild",
    "cancel_build",
    "claim_build",
    "insert_build",
    "plan_rows",
]

Executor = tuple[str | None, int | None, str | None, str | None]
"""Who runs a build: (host, pid, process start time, identity); all None while it is queued."""

QUEUED: Executor = (None, None, None, None)


@dataclass(frozen=True, slots=True)
class NewBuild:
    """A build row to insert (``sql.INSERT_BUILD``); its number is taken when it is."""

    id: str
    org: str
    pipeline: str
    state: BuildState
    source: str
    branch: str | None
    commit: str | None
    message: str | None
    at: str
    build_file: str | None
    # The jobs' working directory, or a function of the build's number that puts it in place
    # and returns it (called inside the transaction: if it raises, nothing is recorded).
    working_dir: str | Callable[[int], str]
    plan_json: str
    executor: Executor
    queue_host: str | None = None
    error: tuple[str, str] | None = None  # (error_code, error_message): refused at submission


Rows = list[tuple[Any, ...]]


def plan_rows(
    plan: Plan, build_id: str, job_ids: Mapping[str, str], at: str
) -> tuple[Rows, Rows, Rows]:
    """A new build's rows of ``sql.INSERT_JOB`` (one ``pending`` job per step, in plan order),
    ``sql.INSERT_DEPENDENCY`` and ``sql.INSERT_TRANSITION`` (each job's creation, seq 0)."""
    jobs = [
        (
            job_ids[step.key],
            build_id,
            position,
            step.key,
            step.label,
            step.command,
            JobState.PENDING.value,
            None
            if step.retry_policy is None
            else json.dumps(step.retry_policy.model_dump(mode="json")),
            None
            if step.soft_fail_policy is None
            else json.dumps(step.soft_fail_policy.model_dump(mode="json")),
            at,
        )
        for position, step in enumerate(plan)
    ]
    edges = [
        (job_ids[e.target], job_ids[e.source], ",".join(k.value for k in e.kinds))
        for e in plan.edges
    ]
    created = [
        (job_id, 0, None, "created", JobState.PENDING.value, at) for job_id in job_ids.values()
    ]
    return jobs, edges, created


def insert_build(
    db: Connection,
    build: NewBuild,
    *,
    jobs: Sequence[tuple[Any, ...]] = (),
    edges: Sequence[tuple[Any, ...]] = (),
    created: Sequence[tuple[Any, ...]] = (),
    reuse: list[tuple[str, str]] | None = None,
) -> tuple[int, str]:
    """Record ``build`` (creating its organization and pipeline on first use) with its rows
    of ``sql.INSERT_JOB``, ``sql.INSERT_DEPENDENCY`` and ``sql.INSERT_TRANSITION``, then the
    results ``reuse`` takes from earlier jobs (retry --failed), in ONE transaction. Returns
    the build's number and its working directory. ValueError for a result that cannot be
    reused (a bug)."""
    at = build.at
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(sql.ENSURE_ORGANIZATION, (str(uuid.uuid4()), build.org, at))
        org_id = db.execute(sql.ORGANIZATION_ID, (build.org,)).fetchone()[0]
        db.execute(sql.ENSURE_PIPELINE, (str(uuid.uuid4()), org_id, build.pipeline, at))
        pipeline_id = db.execute(sql.PIPELINE_ID, (org_id, build.pipeline)).fetchone()[0]
        number = int(db.execute(sql.TAKE_BUILD_NUMBER, (pipeline_id,)).fetchone()[0])
        working_dir = (
            build.working_dir if isinstance(build.working_dir, str) else build.working_dir(number)
        )
        host, pid, started_at, identity = build.executor
        error_code, error_message = build.error or (None, None)
        db.execute(
            sql.INSERT_BUILD,
            (
                build.id,
                pipeline_id,
                number,
                build.state.value,
                build.source,
                build.branch,
                build.commit,
                build.message,
                at,
                at,
                build.build_file,
                working_dir,
                build.plan_json,
                host,
                pid,
                started_at,
                None if host is None else at,  # heartbeat: only a build that runs has one
                identity,
                build.queue_host,
                error_code,
                error_message,
                at if build.state.is_terminal else None,
            ),
        )
        db.executemany(sql.INSERT_JOB, jobs)
        db.executemany(sql.INSERT_DEPENDENCY, edges)
        db.executemany(sql.INSERT_TRANSITION, created)
        if reuse:
            reuse_in_transaction(db, reuse, at)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return number, working_dir


def claim_build(db: Connection, dialect: sql.Dialect, executor: Executor, at: str) -> str | None:
    """Make the oldest build queued on ``executor``'s host this executor's (and give it a
    heartbeat); its id, or None if none is queued there. ONE transaction."""
    host = executor[0]
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute(sql.oldest_queued_build(dialect), (host,)).fetchone()
        if row is None:
            db.execute("ROLLBACK")
            return None
        build_id = str(row[0])
        claimed = db.execute(sql.CLAIM_BUILD, (*executor, at, build_id)).rowcount
        if claimed != 1:  # held by the lock above: not expected, but never claim twice
            db.execute("ROLLBACK")
            return None
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return build_id


def cancel_build(
    db: Connection, dialect: sql.Dialect, build_id: str, at: str, reason: str
) -> list[str] | None:
    """Cancel build ``build_id`` in ONE transaction that first reads (and, on PostgreSQL,
    holds) its row: a queued build becomes ``canceled`` with its unfinished jobs (error code
    ``build_canceled``, ``reason`` as their message); a running one gets ``cancel_requested``;
    a finished one is unchanged. Returns the ids of the jobs it canceled (empty unless the
    build was queued), or None if there is no such build."""
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute(sql.lock_build_for_cancel(dialect), (build_id,)).fetchone()
        if row is None:
            db.execute("ROLLBACK")
            return None
        state, executor_host = BuildState(row[0]), row[1]
        if state.is_terminal:
            db.execute("ROLLBACK")
            return []
        canceled: list[str] = []
        if state is BuildState.SCHEDULED and executor_host is None:  # queued: nobody runs it
            for job_id, job_state in db.execute(sql.JOBS_OF_BUILD_STATES, (build_id,)).fetchall():
                old = JobState(job_state)
                if old.is_terminal:  # a result a retry --failed took from an earlier build
                    continue
                new = transition(old, Event.CANCEL_REQUESTED)
                db.execute(
                    sql.CANCEL_QUEUED_JOB,
                    (new.value, ErrorCode.BUILD_CANCELED.value, reason, at, job_id, old.value),
                )
                last = db.execute(sql.LAST_TRANSITION_SEQ, (job_id,)).fetchone()[0]
                db.execute(
                    sql.INSERT_TRANSITION,
                    (
                        job_id,
                        (last or 0) + 1,
                        old.value,
                        Event.CANCEL_REQUESTED.value,
                        new.value,
                        at,
                    ),
                )
                canceled.append(job_id)
            db.execute(sql.CANCEL_QUEUED_BUILD, (at, build_id))
        else:
            db.execute(sql.REQUEST_CANCEL, (build_id,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return canceled
