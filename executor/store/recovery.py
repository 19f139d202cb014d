"""A build's record after the fact, each in one transaction: finishing a build whose executor
is gone (SPEC §5; ``Store.recover_lost_builds`` decides, with ``liveness``, which builds are
lost), reopening it for ``resume``, and taking passed results from an earlier build for
``retry --failed``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from executor.errors import ErrorCode
from executor.states import Event, JobState, transition
from executor.store import sql
from executor.store.backend import Connection
from executor.store.rows import format_time

__all__ = ["LostBuild", "abandon_build", "reopen_build", "reuse_in_transaction", "reuse_results"]


@dataclass(frozen=True, slots=True)
class LostBuild:
    """A build whose executor was gone, finished by ``recover_lost_builds``."""

    id: str
    number: int
    org: str
    pipeline: str
    executor: str  # "pid 123 on host-a"
    lost_jobs: int  # were running: now failed (executor_lost); resume runs them again
    canceled_jobs: int  # had not started (or waited to retry): now canceled; resume runs them
    stopped_jobs: int  # were being stopped (cancel, timeout): ended as that stop would have
    killed_processes: int  # job processes left behind, SIGKILLed
    resumable_jobs: int = 0  # the jobs `harmont-exec resume` would run again

    @property
    def resumable(self) -> bool:
        return self.resumable_jobs > 0


def abandon_build(
    db: Connection, dialect: sql.Dialect, build_id: str, state: str, executor: str, now: datetime
) -> tuple[list[str], int, int, int, int] | None:
    """Finish build ``build_id``, found in ``state`` with its executor gone, in ONE
    ``BEGIN IMMEDIATE`` transaction that first re-reads the state (holding the build's row on
    PostgreSQL, so a second process waits and then sees it finished): None (nothing done) when
    another process got there first. Returns (the unfinished jobs' ids; how many were running
    and are now failed; how many had not started, or waited to retry, and are now canceled;
    how many were being stopped and ended as that stop would have; how many `resume` would run
    again). Every job change goes
    through the transition table and gains its history row. Driver errors propagate (the
    caller names the store)."""
    at = format_time(now)
    message = f"the executor ({executor}) stopped before the build ended"
    db.execute("BEGIN IMMEDIATE")
    try:
        current = db.execute(sql.lock_build_state(dialect), (build_id,)).fetchone()
        if current is None or current[0] != state:
            db.execute("ROLLBACK")
            return None
        job_ids: list[str] = []
        live = not_started = stopping = 0
        for job_id, job_state, retries in db.execute(
            sql.UNFINISHED_JOBS_OF_BUILD, (build_id,)
        ).fetchall():
            old = JobState(job_state)
            code: str | None
            if old in (JobState.ASSIGNED, JobState.RUNNING):
                event, code, why = Event.EXECUTOR_LOST, ErrorCode.EXECUTOR_LOST, message
                live += 1
            elif old in (JobState.CANCELING, JobState.TIMING_OUT):
                # Being stopped when the executor died: its processes are gone now (killed
                # below if any are left), which is how a stop ends. Its error stays.
                event, code, why = Event.PROCESS_GONE, None, None
                stopping += 1
            else:
                event, code = Event.CANCEL_REQUESTED, ErrorCode.BUILD_ABANDONED
                waiting = (
                    f"waiting to retry (after attempt {retries})" if retries else "not started"
                )
                why = f"{waiting}: {message}"
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
        resumable = len(db.execute(sql.RESUMABLE_JOBS_OF_BUILD, (build_id,)).fetchall())
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return job_ids, live, not_started, stopping, resumable


def reopen_build(
    db: Connection, build_id: str, executor: tuple[str, int, str, str | None], now: datetime
) -> list[str] | None:
    """Make an abandoned build (``failed``, ``build_abandoned``, or ``record_failed``: stopped
    because its record could not be written) ``running`` again under the
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


def reuse_results(db: Connection, pairs: list[tuple[str, str]], now: datetime) -> None:
    """For each (new job id, earlier passed job id): the new job (``pending``) becomes
    ``passed`` by event ``reused``, with the earlier job's exit code and times, a reference to
    it, and copies of its artifact records (the files are shared). One transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        reuse_in_transaction(db, pairs, format_time(now))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def reuse_in_transaction(db: Connection, pairs: list[tuple[str, str]], at: str) -> None:
    """``reuse_results`` inside a transaction the caller holds (``create_build`` of a queued
    retry: its jobs take their results before any executor can claim it). ValueError when a
    job cannot take or give a result (a bug)."""
    for new_id, old_id in pairs:
        old = db.execute(sql.JOB_BY_ID, (old_id,)).fetchone()
        if old is None or old["state"] != JobState.PASSED.value:
            raise ValueError(f"job {old_id} did not pass: its result cannot be reused")
        changed = db.execute(
            sql.REUSE_JOB,
            (old["exit_code"], old["started_at"], old["finished_at"], old_id, new_id),
        ).rowcount
        if changed != 1:
            raise ValueError(f"job {new_id} is not pending: it cannot take a result")
        new = transition(JobState.PENDING, Event.REUSED)
        last = db.execute(sql.LAST_TRANSITION_SEQ, (new_id,)).fetchone()[0]
        db.execute(
            sql.INSERT_TRANSITION,
            (new_id, (last or 0) + 1, "pending", Event.REUSED.value, new.value, at),
        )
        for row in db.execute(sql.ARTIFACTS_OF_JOB_ALL, (old_id,)).fetchall():
            db.execute(sql.INSERT_ARTIFACT, (str(uuid.uuid4()), new_id, *tuple(row)))


def resume_hint(build: LostBuild) -> str:
    """What to do about a build finished because its executor died."""
    if not build.resumable:
        return "nothing to resume: its jobs had ended or were being stopped"
    org = "" if build.org == "local" else f" --org {build.org}"
    return (
        f"`harmont-exec resume {build.number} --pipeline {build.pipeline}{org}` runs its "
        "unfinished jobs again"
    )
