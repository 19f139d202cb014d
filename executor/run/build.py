"""A recorded build from start to end: open the store, record the build, run it, handle signals.

``run_build`` is the library entry point (``executor.run_build``); ``run_build_sync`` wraps it
for code without an event loop. The CLI's ``run`` command is a thin layer over it. ``resume_build``
and ``retry_build`` run a recorded build again (in place, or as a new one: ``record_retry``
records it, run here or queued for ``serve``); ``run_queued_build`` runs a build of the
``serve`` queue that this process claimed, from its recorded plan and working directory.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import NamedTuple

import anyio
import structlog

from executor.errors import (
    BuildNotFoundError,
    BuildStateError,
    ErrorCode,
    ExecutorError,
    InternalError,
)
from executor.load import load_plan, plan_build_text
from executor.plan import Plan
from executor.run.process import ProcessRunner
from executor.run.results import BuildResult, JobResult, JobUpdate, RunOptions
from executor.run.scheduler import Scheduler
from executor.states import BuildState, JobState
from executor.store import BuildRow, CreatedBuild, Store, open_store

__all__ = [
    "RecordedRetry",
    "git_metadata",
    "record_retry",
    "resume_build",
    "retry_build",
    "run_build",
    "run_build_sync",
    "run_queued_build",
]

OnScheduler = Callable[[Scheduler], None]
"""Told the scheduler of a build about to run (``serve`` keeps it, to stop the build)."""

log = structlog.get_logger("executor.run")


def git_metadata(directory: Path) -> tuple[str | None, str | None, str | None]:
    """(branch, commit, message) of the git checkout at ``directory``, or Nones."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(directory), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() or None if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None, None
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    return (None if branch == "HEAD" else branch), commit, git("log", "-1", "--format=%s")


async def run_build(
    build: Plan | str | Path,
    *,
    store: Store | None = None,
    db: str | Path | None = None,
    org: str = "local",
    pipeline: str | None = None,
    options: RunOptions | None = None,
    runner: ProcessRunner | None = None,
    on_change: Callable[[JobUpdate], None] | None = None,
    handle_signals: bool = False,
) -> BuildResult:
    """Plan (if given a path), record and run a build; return its outcome.

    ``store`` (already open) or ``db`` (a path or URL, default ``HARMONT_DB`` or
    ``.harmont/harmont.db``) says where it is recorded, under organization ``org`` and pipeline
    ``pipeline`` (default: the build file's name without extension). With ``handle_signals``,
    the first SIGINT/SIGTERM cancels the build gracefully and a second one kills every job.
    """
    plan = build if isinstance(build, Plan) else load_plan(build)
    options = options or RunOptions()
    if pipeline is None:
        pipeline = plan.source.stem if plan.source is not None else "default"
    if store is None:
        with open_store(db) as own:
            return await _run(plan, own, org, pipeline, options, runner, on_change, handle_signals)
    return await _run(plan, store, org, pipeline, options, runner, on_change, handle_signals)


async def _run(
    plan: Plan,
    store: Store,
    org: str,
    pipeline: str,
    options: RunOptions,
    runner: ProcessRunner | None,
    on_change: Callable[[JobUpdate], None] | None,
    handle_signals: bool,
) -> BuildResult:
    working_dir = options.working_dir
    if working_dir is None:
        working_dir = plan.source.parent if plan.source is not None else Path.cwd()
    branch, commit, message = await anyio.to_thread.run_sync(git_metadata, working_dir)
    created = await anyio.to_thread.run_sync(
        partial(
            store.create_build,
            org=org,
            pipeline=pipeline,
            plan=plan,
            build_file=str(plan.source) if plan.source is not None else None,
            working_dir=str(working_dir.resolve()),
            branch=branch,
            commit=commit,
            message=message,
            now=datetime.now(UTC),
        )
    )
    log.info("build_created", org=org, pipeline=pipeline, build=created.number, jobs=len(plan))
    scheduler = Scheduler(plan, store, created, options=options, runner=runner, on_change=on_change)
    return await _drive(scheduler, handle_signals)


async def _drive(scheduler: Scheduler, handle_signals: bool) -> BuildResult:
    """Run the scheduler, with the signal handlers if asked; its errors (a StoreError when the
    record failed) are raised as they are, not wrapped in an exception group."""
    error: ExecutorError | None = None
    async with anyio.create_task_group() as tg:
        if handle_signals:
            tg.start_soon(_watch_signals, scheduler)
        try:
            result = await scheduler.run()
        except ExecutorError as exc:
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    log.info("build_finished", build=result.number, state=result.state.value)
    return result


async def resume_build(
    number: int,
    *,
    store: Store,
    org: str | None = None,
    pipeline: str | None = None,
    options: RunOptions | None = None,
    runner: ProcessRunner | None = None,
    on_change: Callable[[JobUpdate], None] | None = None,
    handle_signals: bool = False,
    on_scheduler: OnScheduler | None = None,
) -> BuildResult:
    """Continue build ``number``, abandoned by an executor that died (``build_abandoned``) or
    stopped because its record could not be written (``record_failed``: a full disk), in
    place (``harmont-exec resume``): its finished jobs keep their results; the jobs that were
    running when it died (``executor_lost``) or were stopped or never started (``canceled``
    with one of those codes) run again, with their earlier attempts kept. Raises
    ExecutorError, saying why, for a build that is still alive or that
    finished by itself."""
    build = _recorded_build(store, number, org, pipeline)
    name = f"build #{build.number} of {build.org}/{build.pipeline}"
    if not build.state.is_terminal:
        raise BuildStateError(
            f"{name} is {build.state.value}: its executor (pid {build.executor_pid} on "
            f"{build.executor_host}) is alive; resume continues only a build whose executor "
            "is gone (stop that one first, or wait for it)"
        )
    if build.error_code not in (ErrorCode.BUILD_ABANDONED, ErrorCode.RECORD_FAILED):
        raise BuildStateError(
            f"{name} finished by itself ({build.state.value}); resume continues only a build "
            f"abandoned by a dead executor: run it again with `harmont-exec retry "
            f"{build.number} --pipeline {build.pipeline}` (add --failed to run only what did "
            "not pass)"
        )
    again = [
        j
        for j in store.list_jobs(build.id)
        if (j.state, j.error_code)
        in (
            (JobState.FAILED, ErrorCode.EXECUTOR_LOST),
            (JobState.CANCELED, ErrorCode.BUILD_ABANDONED),
            (JobState.CANCELED, ErrorCode.RECORD_FAILED),
        )
    ]
    if not again:
        raise BuildStateError(
            f"{name} has no job to run again: when its executor died, its jobs had ended or "
            f"were being stopped; run it again with `harmont-exec retry {build.number} "
            f"--pipeline {build.pipeline}`"
        )
    plan, working_dir = _recorded_plan(store, build)
    reopened = await anyio.to_thread.run_sync(store.reopen_abandoned_build, build.id, _now())
    if reopened is None:
        raise ExecutorError(f"{name} was resumed by another process first; nothing to do")
    prior = every = _recorded_results(store, build.id)
    created = CreatedBuild(
        build.id, build.number, build.org, build.pipeline, {k: r.job_id for k, r in every.items()}
    )
    options = replace(options or RunOptions(), working_dir=Path(working_dir))
    log.info("build_resumed", build=build.number, jobs_again=len(reopened))
    scheduler = Scheduler(
        plan,
        store,
        created,
        options=options,
        runner=runner,
        on_change=on_change,
        prior=prior,
        state=BuildState.RUNNING,
    )
    if on_scheduler is not None:
        on_scheduler(scheduler)
    return await _drive(scheduler, handle_signals)


async def retry_build(
    number: int,
    *,
    store: Store,
    org: str | None = None,
    pipeline: str | None = None,
    failed_only: bool = False,
    options: RunOptions | None = None,
    runner: ProcessRunner | None = None,
    on_change: Callable[[JobUpdate], None] | None = None,
    handle_signals: bool = False,
) -> BuildResult:
    """A new build (the next number of the same pipeline) of the plan build ``number`` ran, in
    its working directory (``harmont-exec retry``). With ``failed_only``, the jobs that passed
    there are not run: they take that result (event ``reused``, with a reference to the job,
    and its artifacts); every other job runs. Refused for a build that is still running."""
    build = _recorded_build(store, number, org, pipeline)
    retry = await anyio.to_thread.run_sync(
        partial(record_retry, build, store=store, failed_only=failed_only)
    )
    created = retry.created
    log.info("build_created", build=created.number, retry_of=build.number, reused=len(retry.prior))
    options = replace(options or RunOptions(), working_dir=Path(retry.working_dir))
    scheduler = Scheduler(
        retry.plan,
        store,
        created,
        options=options,
        runner=runner,
        on_change=on_change,
        prior=retry.prior,
    )
    return await _drive(scheduler, handle_signals)


class RecordedRetry(NamedTuple):
    """A retry ``record_retry`` recorded: what to run, where, and the results it took."""

    plan: Plan
    created: CreatedBuild
    working_dir: str
    prior: dict[str, JobResult]


def record_retry(
    build: BuildRow, *, store: Store, failed_only: bool, queued: bool = False
) -> RecordedRetry:
    """Record a new build of the plan ``build`` recorded, in its working directory (``retry``:
    the next number of the same pipeline; with ``failed_only`` the jobs that passed in
    ``build`` take that result in the same transaction), to run here or, ``queued``, in this
    host's ``serve`` queue. Returns its plan, its ids and the results it took. BuildStateError
    for a build that has not finished, or that was refused when it was submitted."""
    name = f"build #{build.number} of {build.org}/{build.pipeline}"
    if not build.state.is_terminal:
        raise BuildStateError(
            f"{name} is {build.state.value}; retry a build once it has finished (or resume "
            "one whose executor died)"
        )
    if build.refused and not store.list_jobs(build.id):
        raise BuildStateError(
            f"{name} was refused when it was submitted ({build.error_code}: "
            f"{build.error_message}); nothing of it ran, so there is nothing to retry: submit "
            "it again"
        )
    plan, working_dir = _recorded_plan(store, build)
    _warn_if_changed(build.build_file, plan, build.number)
    passed = (
        [j for j in store.list_jobs(build.id) if j.state is JobState.PASSED] if failed_only else []
    )
    created = store.create_build(
        org=build.org,
        pipeline=build.pipeline,
        plan=plan,
        build_file=build.build_file,
        working_dir=working_dir,
        source=build.source,
        branch=build.branch,
        commit=build.commit,
        message=f"retry of build #{build.number}" + (" (failed jobs only)" if failed_only else ""),
        queued=queued,
        reuse={j.step_key: j.id for j in passed},
        now=_now(),
    )
    prior = {
        j.step_key: JobResult(
            j.step_key,
            created.job_ids[j.step_key],
            JobState.PASSED,
            exit_code=j.exit_code,
            started_at=j.started_at,
            finished_at=j.finished_at,
        )
        for j in passed
    }
    return RecordedRetry(plan, created, working_dir, prior)


async def run_queued_build(
    build: BuildRow,
    *,
    store: Store,
    options: RunOptions | None = None,
    runner: ProcessRunner | None = None,
    on_change: Callable[[JobUpdate], None] | None = None,
    handle_signals: bool = False,
    on_scheduler: OnScheduler | None = None,
) -> BuildResult:
    """Run ``build``, a build of the ``serve`` queue this process claimed
    (``Store.claim_queued_build``), from its recorded plan in its recorded working directory;
    the jobs that already have a result (``retry --failed``) keep it."""
    plan, working_dir = _recorded_plan(store, build)
    every = _recorded_results(store, build.id)
    prior = {k: r for k, r in every.items() if r.state.is_terminal}
    created = CreatedBuild(
        build.id, build.number, build.org, build.pipeline, {k: r.job_id for k, r in every.items()}
    )
    options = replace(options or RunOptions(), working_dir=Path(working_dir))
    log.info("build_claimed", build=build.number, org=build.org, pipeline=build.pipeline)
    scheduler = Scheduler(
        plan, store, created, options=options, runner=runner, on_change=on_change, prior=prior
    )
    if on_scheduler is not None:
        on_scheduler(scheduler)
    return await _drive(scheduler, handle_signals)


def _recorded_build(store: Store, number: int, org: str | None, pipeline: str | None) -> BuildRow:
    build = store.get_build(number, org=org, pipeline=pipeline)
    if build is None:
        where = f"{org or '*'}/{pipeline or '*'}"
        raise BuildNotFoundError(f"no build #{number} in {where}; `harmont-exec builds` lists them")
    return build


def _recorded_results(store: Store, build_id: str) -> dict[str, JobResult]:
    """Every job of the build as the record has it now, by step key (what a scheduler taking
    over a recorded build starts from)."""
    counts = store.attempt_counts(build_id)
    return {
        j.step_key: JobResult(
            j.step_key,
            j.id,
            j.state,
            exit_code=j.exit_code,
            soft_failed=j.soft_failed,
            attempts=counts.get(j.id, 0),
            error_code=j.error_code,
            error_message=j.error_message,
            started_at=j.started_at,
            finished_at=j.finished_at,
            retries_count=j.retries_count,
        )
        for j in store.list_jobs(build_id)
    }


def _recorded_plan(store: Store, build: BuildRow) -> tuple[Plan, str]:
    """The plan ``build`` ran, as it recorded it, and its working directory."""
    recorded = store.build_plan(build.id)
    if recorded is None:  # its row was just read: the plan is written with it
        raise InternalError(
            f"build #{build.number} of {build.org}/{build.pipeline} (id {build.id}) has no "
            "recorded plan"
        )
    plan_json, working_dir = recorded
    plan = plan_build_text(plan_json, name=build.build_file or "build.json", json_format=True)
    return plan, working_dir


def _warn_if_changed(build_file: str | None, plan: Plan, number: int) -> None:
    """``retry`` runs the plan the build recorded: say so when the file now says otherwise."""
    if build_file is None:
        return
    try:
        now = load_plan(build_file).spec.to_data()
    except (OSError, ExecutorError):
        now = None
    if now != plan.spec.to_data():
        log.warning(
            "build_file_changed",
            file=build_file,
            hint=f"retry runs the plan build #{number} recorded; to run the file as it is "
            f"now, use `harmont-exec run {build_file}`",
        )


def _now() -> datetime:
    return datetime.now(UTC)


async def _watch_signals(scheduler: Scheduler) -> None:
    """SIGINT/SIGTERM: the first cancels the build gracefully, a second kills every job. SIGHUP
    (the terminal went away) changes nothing: the build runs to its end and is recorded; what
    it would have printed goes nowhere (``cli/output.py``)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        count = 0
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("terminal_gone", signal=name, consequence="the build goes on")
                continue
            count += 1
            if count == 1:
                scheduler.cancel(f"canceled by {name}")
            else:
                log.warning("killing_jobs", signal=name)
                scheduler.kill()


def run_build_sync(build: Plan | str | Path, **kwargs: object) -> BuildResult:
    """``run_build`` for code without an event loop (takes the same keyword arguments)."""
    return anyio.run(partial(run_build, build, **kwargs))  # type: ignore[arg-type]
