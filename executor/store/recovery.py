"""Finishing a build whose executor is gone (SPEC §5), in one transaction: the SQL side of
``Store.recover_lost_builds`` (which decides, with ``liveness``, which builds are lost)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime

from executor.states import Event, JobState, transition
from executor.store import sql
from executor.store.rows import format_time

__all__ = ["LostBuild", "abandon_build", "reopen_build"]


@dataclass(frozen=True, slots=True)
class LostBuild:
    """A build whose executor was gone, finished by ``recover_lost_builds``."""

    id: str
    number: int
    executor: str  # "pid 123 on host-a"
    lost_jobs: int  # were live: now failed (executor_lost), or canceled / timed_out if stopping
    canceled_jobs: int  # had not started: now canceled
    killed_processes: int  # job processes left behind, SIGKILLed


def abandon_build(
    db: sqlite3.Connection, build_id: str, state: str, executor: str, now: datetime
) -> tuple[list[str], int, int] | None:
    """Finish build ``build_id``, found in ``state`` with its executor gone, in ONE
    ``BEGIN IMMEDIATE`` transaction that first re-reads the state: None (nothing done) when
    another process got there first. Returns (the unfinished jobs' ids, how many were live and
    are now failed, how many are now canceled). Every job change goes through the transition
    table and gains its history row. sqlite3 errors propagate (the caller names the file)."""
    at = format_time(now)
    message = f"the executor ({executor}) stopped before the build ended"
    db.execute("BEGIN IMMEDIATE")
    try:
        current = db.execute(sql.BUILD_STATE, (build_id,)).fetchone()
        if current is None or current[0] != state:
            db.execute("ROLLBACK")
            return None
        job_ids: list[str] = []
        live = not_started = 0
        for job_id, job_state in db.execute(sql.UNFINISHED_JOBS_OF_BUILD, (build_id,)).fetchall():
            old = JobState(job_state)
            code: str | None
            if old in (JobState.ASSIGNED, JobState.RUNNING):
                event, code, why = Event.EXECUTOR_LOST, "executor_lost", message
                live += 1
            elif old in (JobState.CANCELING, JobState.TIMING_OUT):
                # Being stopped when the executor died: its processes are gone now (killed
                # below if any are left), which is how a stop ends. Its error stays.
                event, code, why = Event.PROCESS_GONE, None, None
                live += 1
            else:
                event, code = Event.CANCEL_REQUESTED, "build_abandoned"
                why = f"not started: {message}"
                not_started += 1
            new = transition(old, event)
            db.execute(sql.END_JOB, (new.value, code, why, at, job_id, old.value))
            last = db.execute(sql.LAST_TRANSITION_SEQ, (job_id,)).fetchone()[0]
            db.execute(
                sql.INSERT_TRANSITION,
                (job_id, (last or 0) + 1, old.value, event.value, new.value, at),
            )
            job_ids.append(job_id)
        db.execute(sql.END_OPEN_ATTEMPTS, (at, build_id))
        db.execute(sql.ABANDON_BUILD, (message, at, build_id, state))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return job_ids, live, not_started


def reopen_build(
    db: sqlite3.Connection, build_id: str, executor: tuple[str, int, str, str | None], now: datetime
) -> list[str] | None:
    """Make an abandoned build (``failed``, ``build_abandoned``) ``running`` again under the
    executor ``(host, pid, started_at, identity)``, and its lost or never-started jobs
    ``pending`` (event ``resumed``; their attempts and history stay), in ONE transaction.
    Returns those jobs' ids, or None if the build is not (or no longer) abandoned."""
    at = format_time(now)
    host, pid, started_at, identity = executor
    db.execute("BEGIN IMMEDIATE")
    try:
        claimed = db.execute(
            sql.REOPEN_BUILD, (host, pid, started_at, identity, at, build_id)
        ).rowcount
        if claimed != 1:
            db.execute("ROLLBACK")
            return None
        reopened: list[str] = []
        for job_id, job_state in db.execute(sql.RESUMABLE_JOBS_OF_BUILD, (build_id,)).fetchall():
            old = JobState(job_state)
            new = transition(old, Event.RESUMED)
            db.execute(sql.REOPEN_JOB, (job_id, old.value))
            last = db.execute(sql.LAST_TRANSITION_SEQ, (job_id,)).fetchone()[0]
            db.execute(
                sql.INSERT_TRANSITION,
                (job_id, (last or 0) + 1, old.value, Event.RESUMED.value, new.value, at),
            )
            reopened.append(job_id)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return reopened
