"""The build loop: drives a Plan's jobs through THE transition table to terminal states.

Owns concurrency, plan-order start, retries with backoff, soft-fail, cascade (through the plan's
Frontier), per-job and whole-build timeouts, --fail-fast, cancellation, and the build roll-up.
Every state change goes through ``_transition``: ``states.transition`` decides the next state
and one store call records it with its history row. Processes are the runner's business
(``ProcessRunner``), which is a parameter, so tests can drive this loop with a fake.

All of this runs on one event-loop thread; the store only queues writes (group commit), so
recording never blocks a job from starting.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import anyio
import structlog

from executor.errors import ErrorCode, RecordFailedError, StoreError
from executor.model import StepSpec
from executor.plan import Plan, Settled
from executor.run.artifacts import (
    DEFAULT_MAX_BYTES,
    Collected,
    collect_artifacts,
    match_artifacts,
)
from executor.run.process import (
    AttemptResult,
    AttemptSpec,
    LocalProcessRunner,
    ProcessRunner,
    Reason,
    StopRequest,
    Stream,
)
from executor.states import BuildState, Event, JobState, JobStatus, roll_up, transition
from executor.store import CreatedBuild, Store
from executor.store.liveness import HEARTBEAT_S

__all__ = [
    "BuildResult",
    "JobResult",
    "JobUpdate",
    "PriorJob",
    "RunOptions",
    "Scheduler",
    "exit_status",
]

log = structlog.get_logger("executor.run")

_MAX_NOTES = 50  # artifact notes per job in its log (a glob over a big tree could make many)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a plan. ``None`` fields take the build file's value, then the default."""

    concurrency: int | None = None
    fail_fast: bool = False
    grace_period_s: float = 10.0
    working_dir: Path | None = None
    base_env: Mapping[str, str] | None = None  # default: this process's environment
    max_artifact_bytes: int = DEFAULT_MAX_BYTES  # per file (--max-artifact-mb)


class JobUpdate(NamedTuple):
    """A state change, for live views: a job's (``key`` set) or the build's (``key`` None).
    (A NamedTuple: four are made per job, and it costs a quarter of a frozen dataclass.)"""

    key: str | None
    state: str
    at: datetime
    attempt: int = 0
    exit_code: int | None = None
    soft_failed: bool = False
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class JobResult:
    key: str
    job_id: str
    state: JobState
    exit_code: int | None
    soft_failed: bool
    attempts: int
    error_code: str | None
    error_message: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class BuildResult:
    build_id: str
    number: int
    org: str
    pipeline: str
    state: BuildState
    error_code: str | None
    jobs: Mapping[str, JobResult]

    @property
    def exit_status(self) -> int:
        return exit_status(self.state, self.error_code)


def exit_status(state: BuildState, error_code: str | None) -> int:
    """``harmont-exec run``'s exit status (SPEC §4): 0 passed, 1 failed, 124 build timeout,
    130 canceled."""
    if state is BuildState.PASSED:
        return 0
    if state is BuildState.CANCELED:
        return 130
    if error_code == ErrorCode.PIPELINE_TIMEOUT:
        return 124
    return 1


@dataclass(frozen=True, slots=True)
class PriorJob:
    """Where a job of a resumed build stands when it starts again (read from the store)."""

    state: JobState
    exit_code: int | None = None
    soft_failed: bool = False
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    retries_count: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(slots=True)
class _Job:
    key: str
    id: str
    step: StepSpec
    state: JobState = JobState.PENDING
    attempts: int = 0
    retries_count: int = 0
    exit_code: int | None = None
    soft_failed: bool = False
    error_code: str | None = None
    error_message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    stop: StopRequest | None = None
    cause: str | None = None


@dataclass(slots=True)
class _Counters:
    terminal: int = 0
    running: int = 0  # jobs holding a concurrency slot (assigned, running, stopping)
    tasks: int = 0  # attempts assigned or running (a stopped job's process may still be exiting)
    hard_failures: int = 0
    started: bool = False


class Scheduler:
    """Runs one recorded build of ``plan``. Use ``run()`` once."""

    def __init__(
        self,
        plan: Plan,
        store: Store,
        build: CreatedBuild,
        *,
        options: RunOptions | None = None,
        runner: ProcessRunner | None = None,
        on_change: Callable[[JobUpdate], None] | None = None,
        prior: Mapping[str, PriorJob] | None = None,
        state: BuildState = BuildState.SCHEDULED,
    ) -> None:
        """``prior``: jobs that do not start from scratch (a resumed build's, or those whose
        result ``retry --failed`` took from an earlier build); the terminal ones keep their
        results. ``state``: the build's recorded state now (``running`` for a resumed one)."""
        self.plan = plan
        self.store = store
        self.build = build
        self.options = options or RunOptions()
        # A runner made here is closed at the end (its watchdog kills any job process left);
        # one passed in belongs to the caller.
        self._own_runner = LocalProcessRunner() if runner is None else None
        self.runner: ProcessRunner = runner or self._own_runner  # type: ignore[assignment]
        self._on_change = on_change
        # Durable before shown (SPEC §5): each change waits here, with the count of store
        # writes it follows, until the writer has committed that many.
        self._unshown: deque[tuple[int, JobUpdate]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trouble_seen = False
        # Bound once: the module's lazy logger re-reads the configuration at every call.
        self._log = log.bind(build=build.number)
        self._jobs = {s.key: _Job(s.key, build.job_ids[s.key], s) for s in plan}
        self._cursor = plan.frontier()
        self._prior = prior or {}
        for key, before in self._prior.items():
            job = self._jobs[key]
            job.state, job.exit_code, job.soft_failed = (
                before.state,
                before.exit_code,
                before.soft_failed,
            )
            job.error_code, job.error_message = before.error_code, before.error_message
            job.attempts, job.retries_count = before.attempts, before.retries_count
            job.started_at, job.finished_at = before.started_at, before.finished_at
        self._queue: list[tuple[int, str]] = []  # scheduled jobs waiting for a slot
        self._assigned: deque[_Job] = deque()  # jobs given a slot, for the next free worker
        self._idle: list[anyio.Event] = []  # workers waiting for an assigned job
        self._count = _Counters()
        self._limit = self.options.concurrency or plan.spec.concurrency or os.cpu_count() or 1
        self._state = state
        self._cancel_requested = False  # a user's cancel (signal), not fail-fast
        self._stopping = False  # no new attempts, no retries
        self._error: tuple[str, str] | None = None
        self._store_error: StoreError | None = None
        self._done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        cwd = self.options.working_dir
        if cwd is None:
            cwd = plan.source.parent if plan.source is not None else Path.cwd()
        self.working_dir = cwd.resolve()
        base = os.environ if self.options.base_env is None else self.options.base_env
        self._base_env = {**base, **plan.spec.env}

    # --- public -----------------------------------------------------------------------------

    async def run(self) -> BuildResult:
        """Run every job to a terminal state; return the build's outcome. Never raises for a
        job's failure; store errors surface from the final flush. ``on_change`` sees each
        change once it is committed to the store, never before (SPEC §5)."""
        self._loop = asyncio.get_running_loop()
        stop_listening = self.store.add_commit_listener(self._on_commit)
        try:
            try:
                await self._run_to_the_end()
            finally:
                if self._own_runner is not None:
                    with anyio.CancelScope(shield=True):  # even when cancelled: nothing is left
                        await anyio.to_thread.run_sync(self._own_runner.close)
            return await self._flushed_result()
        finally:
            stop_listening()
            self._release()  # what the last commits carried (after a failure: only those)

    async def _run_to_the_end(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.plan.spec.timeout_seconds is not None:
                tg.start_soon(self._build_timer, self.plan.spec.timeout_seconds)
            tg.start_soon(self._heartbeat)
            for _ in range(min(self._limit, len(self._jobs))):
                tg.start_soon(self._worker)
            if self._prior:
                self._seed()
            if not self._jobs:  # a build with no jobs passes at once
                self._roll_up(_now())
            self._advance()
            await self._done.wait()
            tg.cancel_scope.cancel()  # only timers and idle workers are left

    async def _flushed_result(self) -> BuildResult:
        """The result, once everything queued is committed; RecordFailedError if the record
        could not be written (the message says what happened and how to resume)."""
        try:
            await anyio.to_thread.run_sync(self.store.flush)
        except StoreError as exc:
            if exc is not self.store.trouble or not self._trouble_seen:
                raise self._record_failed(
                    f"{exc}. Build #{self.build.number} was stopped there: its running jobs "
                    "were stopped and the others canceled; the record keeps everything "
                    "written before the failure. Once that is fixed, any harmont-exec command "
                    f"marks the build abandoned, and {self._resume_hint()} runs its unfinished "
                    "jobs again"
                ) from None
        if self._trouble_seen:
            keys = {j.id: j.key for j in self._jobs.values()}
            dropped = {keys[j]: n for j, n in self.store.dropped_output.items() if j in keys}
            await anyio.to_thread.run_sync(self._mark_cut_logs, dropped)
            lost = (
                " (not recorded, the output written after the disk filled: "
                + ", ".join(f"{n} bytes of {key!r}" for key, n in dropped.items())
                + ")"
                if dropped
                else ""
            )
            raise self._record_failed(
                f"{self.store.trouble}. Build #{self.build.number} was stopped and recorded as "
                "stopped: its running jobs were stopped, the others canceled (record_failed), "
                f"and everything shown is in the record{lost}. Free space there, then "
                f"{self._resume_hint()} runs its unfinished jobs again"
            )
        return self._result()

    def _mark_cut_logs(self, dropped: Mapping[str, int]) -> None:
        """Say in each cut log itself that its job's output after that point is missing."""
        at = _now()
        for key, size in dropped.items():
            job = self._jobs[key]
            line = (
                f"[harmont-exec] the record's disk was full: {size} bytes of this job's output "
                "after this point were not recorded\n"
            ).encode()
            self.store.append_log(job.id, max(job.attempts, 1), "meta", line, at=at)
        try:
            self.store.flush()
        except StoreError:
            pass  # the message at the end says it; these lines are a courtesy

    def _resume_hint(self) -> str:
        build = self.build
        org = "" if build.org == "local" else f" --org {build.org}"
        return f"`harmont-exec resume {build.number} --pipeline {build.pipeline}{org}`"

    def _record_failed(self, message: str) -> RecordFailedError:
        build = self.build
        return RecordFailedError(
            message,
            build_id=build.id,
            number=build.number,
            org=build.org,
            pipeline=build.pipeline,
        )

    @property
    def statuses(self) -> Mapping[str, JobStatus]:
        """Every job's status as this scheduler knows it now: ahead of ``on_change``, which
        waits for the store to commit each change."""
        return {k: JobStatus(j.state, j.soft_failed) for k, j in self._jobs.items()}

    def cancel(self, reason: str = "the build was canceled") -> None:
        """Cancel gracefully (first SIGINT/SIGTERM): stop what runs, cancel what waits."""
        if self._state.is_terminal or self._cancel_requested:
            return
        self._cancel_requested = True
        self._log.info("build_canceling", reason=reason)
        self._stop_everything(reason)

    def kill(self) -> None:
        """Second interrupt: SIGKILL every job's process group now."""
        self.cancel()
        for job in self._jobs.values():
            if job.stop is not None:
                job.stop.kill(job.stop.reason or Reason.CANCELED)

    def _seed(self) -> None:
        """A resumed build: count the jobs that already ended, tell the cursor in plan order
        (so their dependents become ready, or are skipped or canceled in cascade as they
        would have been), and roll the build up from there."""
        at = _now()
        for job in self._jobs.values():
            if job.state.is_terminal:
                self._count.terminal += 1
                if JobStatus(job.state, job.soft_failed).is_hard_failure:
                    self._count.hard_failures += 1
            if job.started_at is not None:
                self._count.started = True
        for key in self.plan.order:
            job = self._jobs[key]
            if job.state.is_terminal and key not in self._cursor.statuses:
                settled = self._cursor.done(key, job.state, soft_failed=job.soft_failed)
                self._settle(tuple(s for s in settled if not self._jobs[s.key].state.is_terminal))
        self._roll_up(at)

    def _write(self, write: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Every write to the store goes through here. The first one the store refuses (disk
        full, file read-only: the writer keeps nothing after a failed commit) stops the build,
        as a cancel would; later writes are dropped, and ``run`` raises the error at the end."""
        if self._store_error is not None:
            return
        try:
            write(*args, **kwargs)
        except StoreError as exc:
            self._store_error = exc
            self._log.error("record_failed", error=str(exc))
            if self._tg is not None:  # not from inside this transition: on the next tick
                self._tg.start_soon(self._stop_for_store_error, exc)

    async def _stop_for_store_error(self, exc: StoreError) -> None:
        # The error itself is logged once (record_failed) and raised by run(); the jobs'
        # reason stays short, as it is shown on every stopped job's line.
        self.cancel("the record cannot be written (the error is at the end)")

    # --- transitions --------------------------------------------------------------------------

    def _transition(
        self, job: _Job, event: Event, *, at: datetime | None = None, **fields: object
    ) -> None:
        """THE way a job changes state: the table, the record, the counters, the view."""
        at = at or _now()
        old = job.state
        new = transition(old, event)
        for name, value in fields.items():
            setattr(job, name, value)
        record: dict[str, object] = dict(fields)
        if new is JobState.RUNNING and job.started_at is None:
            job.started_at = record["started_at"] = at
        if new.is_terminal:
            job.finished_at = record["finished_at"] = at
        record.pop("cause", None)
        job.state = new
        self._write(
            self.store.record_job_transition,
            job.id,
            from_state=old,
            event=event,
            to_state=new,
            at=at,
            **record,
        )
        if self._on_change is not None:
            self._show(
                JobUpdate(
                    job.key,
                    new.value,
                    at,
                    0 if event is Event.READY else job.attempts,  # READY is never a retry
                    job.exit_code,
                    job.soft_failed,
                    job.error_message,
                )
            )
        if new is JobState.RUNNING and not self._count.started:
            self._count.started = True
            self._roll_up(at)
        if new.is_terminal:
            self._count.terminal += 1
            if JobStatus(new, job.soft_failed).is_hard_failure:
                self._count.hard_failures += 1
                if self._count.hard_failures == 1:
                    self._roll_up(at)
                    if self.options.fail_fast and not self._stopping:
                        self._stop_everything(f"--fail-fast: {job.key!r} {new.value}")
            if self._count.terminal == len(self._jobs):
                self._roll_up(at)

    # --- showing what is recorded -----------------------------------------------------------

    def _show(self, change: JobUpdate) -> None:
        """Hand ``change`` to ``on_change`` once the store has committed the write it comes
        with (at once if it has, and nothing shown before it waits)."""
        if self._on_change is None or self._store_error is not None:
            return  # after a failed write nothing more is shown: it may not be recorded
        ticket = self.store.queued
        if not self._unshown and ticket <= self.store.committed:
            self._on_change(change)
            return
        self._unshown.append((ticket, change))

    def _on_commit(self, committed: int) -> None:
        # The writer's thread: only hand the news to the event loop.
        loop = self._loop
        if loop is None:
            return
        try:
            if self._unshown:
                loop.call_soon_threadsafe(self._release, committed)
            if self.store.trouble is not None and not self._trouble_seen:
                self._trouble_seen = True
                loop.call_soon_threadsafe(self._stop_for_trouble)
        except RuntimeError:
            pass  # the loop is closed: the run is over, its end showed what was committed

    def _stop_for_trouble(self) -> None:
        """The disk filled: the reserve took the last writes. Stop now, recorded as stopped
        (``record_failed``), while the space lasts."""
        if self._state.is_terminal:
            return
        self._log.error("record_failed", error=str(self.store.trouble))
        self._error = (
            ErrorCode.RECORD_FAILED,
            f"stopped: the record could not be written ({self.store.trouble})",
        )
        self._stop_everything(
            "the record's disk is full (the error is at the end)",
            error_code=ErrorCode.RECORD_FAILED,
        )
        self._roll_up(_now())

    def _release(self, committed: int | None = None) -> None:
        """Show, in order, every waiting change whose write is committed."""
        committed = self.store.committed if committed is None else committed
        unshown = self._unshown
        on_change = self._on_change
        while unshown and unshown[0][0] <= committed:
            _, change = unshown.popleft()
            if on_change is not None:
                try:
                    on_change(change)
                except Exception:  # a view's bug must not stop the build or the other changes
                    self._log.exception("on_change_failed", change=change.state, job=change.key)

    def _settle(self, settled: tuple[Settled, ...]) -> None:
        for item in settled:
            job = self._jobs[item.key]
            cause = self._jobs[item.cause]
            if item.state is JobState.SKIPPED:
                message = f"skipped because {cause.key!r} {cause.state.value}"
                self._transition(
                    job,
                    Event.DEPENDENCY_FAILED,
                    error_code=ErrorCode.DEPENDENCY_FAILED,
                    error_message=message,
                    cause=cause.key,
                )
            else:
                # A job canceled because its record could not be written passes that on: its
                # dependents are as much unfinished work for `resume` as it is.
                code = (
                    ErrorCode.RECORD_FAILED
                    if cause.error_code == ErrorCode.RECORD_FAILED
                    else ErrorCode.BUILD_CANCELED
                )
                message = f"canceled because {cause.key!r} was canceled"
                self._transition(
                    job,
                    Event.CANCEL_REQUESTED,
                    error_code=code,
                    error_message=message,
                    cause=cause.key,
                )

    def _finish(self, job: _Job) -> None:
        """A job reached a terminal state by itself: cascade, then start what became ready."""
        settled = self._cursor.done(job.key, job.state, soft_failed=job.soft_failed)
        self._settle(settled)
        self._advance()

    def _advance(self) -> None:
        """Schedule newly ready jobs, then give free slots to scheduled jobs in plan order."""
        if not self._stopping:
            for key in self._cursor.ready():
                job = self._jobs[key]
                self._transition(job, Event.READY)
                heapq.heappush(self._queue, (self.plan.position(key), key))
        while self._queue and self._count.running < self._limit and not self._stopping:
            _, key = heapq.heappop(self._queue)
            job = self._jobs[key]
            if job.state is not JobState.SCHEDULED:
                continue
            self._transition(job, Event.SLOT_ACQUIRED)
            self._count.running += 1
            self._count.tasks += 1
            self._assigned.append(job)
            if self._idle:
                self._idle.pop().set()
        self._check_done()

    def _check_done(self) -> None:
        if self._count.terminal == len(self._jobs) and self._count.tasks == 0:
            self._done.set()

    def _roll_up(self, at: datetime) -> None:
        statuses = (JobStatus(j.state, j.soft_failed) for j in self._jobs.values())
        state = roll_up(statuses, cancel_requested=self._cancel_requested)
        if state is BuildState.SCHEDULED and self._state is not BuildState.SCHEDULED:
            state = BuildState.RUNNING  # a resumed build: it started long ago, whatever waits
        if (
            state is BuildState.CANCELED
            and self._error
            and self._error[0] == ErrorCode.RECORD_FAILED
        ):
            state = BuildState.FAILED  # nobody canceled it: its record could not be written
        if state is self._state:
            return
        fields: dict[str, object] = {}
        if self._state is BuildState.SCHEDULED and state is not BuildState.CANCELED:
            fields["started_at"] = at  # leaving "scheduled": the build has started
        if state.is_terminal:
            fields["finished_at"] = at
            if self._error is not None:
                fields["error_code"], fields["error_message"] = self._error
        if state is BuildState.CANCELING or state is BuildState.CANCELED:
            fields["cancel_requested"] = True
        self._state = state
        self._write(self.store.record_build, self.build.id, state=state, at=at, **fields)
        self._log.info("build_state", state=state.value)
        if self._on_change is not None:
            self._show(JobUpdate(None, state.value, at))

    # --- stopping -----------------------------------------------------------------------------

    def _stop_everything(self, reason: str, *, error_code: str = ErrorCode.BUILD_CANCELED) -> None:
        """Cancel waiting jobs, stop running ones; used by cancel and --fail-fast."""
        self._stopping = True
        at = _now()
        for key in self.plan.order:
            job = self._jobs[key]
            if job.state in (JobState.PENDING, JobState.SCHEDULED, JobState.ASSIGNED):
                self._transition(
                    job,
                    Event.CANCEL_REQUESTED,
                    at=at,
                    error_code=error_code,
                    error_message=reason,
                )
                if job.stop is not None:  # the runner may already be starting it
                    job.stop.stop(Reason.CANCELED)
                self._settle(self._cursor.done(key, JobState.CANCELED))
            elif job.state is JobState.RUNNING:
                self._transition(
                    job,
                    Event.CANCEL_REQUESTED,
                    at=at,
                    error_code=error_code,
                    error_message=reason,
                )
                if job.stop is not None:  # None: the process is gone, artifacts are collected
                    job.stop.stop(Reason.CANCELED)
        if self._cancel_requested:
            self._roll_up(at)
        self._check_done()

    async def _heartbeat(self) -> None:
        """Tell readers of the store this executor is alive (for a shared store, where other
        hosts judge it by this; on this host its process identity already says so)."""
        while True:
            await anyio.sleep(HEARTBEAT_S)
            self._write(self.store.record_heartbeat, self.build.id, at=_now())

    async def _build_timer(self, timeout_s: float) -> None:
        await anyio.sleep(timeout_s)
        self._stopping = True
        at = _now()
        message = f"the build exceeded its timeout_seconds={timeout_s:g}"
        self._error = (ErrorCode.PIPELINE_TIMEOUT, message)
        for key in self.plan.order:
            job = self._jobs[key]
            if job.state.is_terminal:
                continue
            self._transition(
                job,
                Event.BUILD_TIMEOUT,
                at=at,
                error_code=ErrorCode.PIPELINE_TIMEOUT,
                error_message=message,
            )
            if job.stop is not None:
                job.stop.stop(Reason.TIMED_OUT)
        self._check_done()

    async def _job_timer(self, job: _Job, attempt: int, timeout_s: float) -> None:
        await anyio.sleep(timeout_s)
        if job.state is JobState.RUNNING and job.attempts == attempt and job.stop is not None:
            self._transition(
                job,
                Event.TIMEOUT_EXPIRED,
                error_code=ErrorCode.JOB_TIMEOUT,
                error_message=f"attempt {attempt} exceeded timeout_seconds={timeout_s:g}",
            )
            job.stop.stop(Reason.TIMED_OUT)

    # --- one attempt --------------------------------------------------------------------------

    async def _worker(self) -> None:
        """Runs assigned jobs' attempts one after the other; there are as many workers as
        slots. (A task per attempt costs more than the scheduling itself, at thousands of
        short jobs a second.) Cancelled with the task group when the build is done."""
        while True:
            while self._assigned:
                await self._attempt(self._assigned.popleft())
            wake = anyio.Event()  # rare: a worker usually finds the job its own end assigned
            self._idle.append(wake)
            await wake.wait()

    async def _attempt(self, job: _Job) -> None:
        try:
            if job.state is not JobState.ASSIGNED:  # canceled before it could start
                return
            job.attempts += 1
            attempt = job.attempts
            stop = job.stop = StopRequest()
            env = {
                **self._base_env,
                **job.step.env,
                "HARMONT_BUILD_NUMBER": str(self.build.number),
                "HARMONT_JOB_ID": job.id,
                "HARMONT_STEP_KEY": job.key,
                "HARMONT_ATTEMPT": str(attempt),
            }
            spec = AttemptSpec(
                job.step.command,
                self.working_dir,
                env,
                self.options.grace_period_s,
                job.step.resources,
            )
            timeout_s = job.step.timeout_seconds
            timer = None if timeout_s is None else anyio.CancelScope()  # most jobs have none

            async def run_timer(scope: anyio.CancelScope, timeout_s: float) -> None:
                with scope:
                    await self._job_timer(job, attempt, timeout_s)

            started = False

            def on_start() -> None:
                nonlocal started
                started = True
                at = _now()
                self._write(self.store.record_attempt_started, job.id, attempt, at=at)
                if job.state is not JobState.ASSIGNED:
                    return  # canceled while spawning: the stop request already kills it
                self._transition(job, Event.STARTED, at=at)
                if timer is not None and timeout_s is not None and self._tg is not None:
                    self._tg.start_soon(run_timer, timer, timeout_s)

            def on_output(stream: Stream, data: bytes) -> None:
                self._write(self.store.append_log, job.id, attempt, stream.value, data, at=_now())

            result = await self.runner.run(spec, on_start=on_start, on_output=on_output, stop=stop)
            if timer is not None:
                timer.cancel()
            job.stop = None  # the process is gone: nothing left to time out or stop
            if not started and stop.reason is not None and job.state.is_terminal:
                # Stopped before it started (it waited in a remote executor's queue): no
                # process ever ran, so it is not an attempt, as a local job canceled while
                # waiting for its slot is not.
                job.attempts -= 1
                return
            failures: list[str] = []
            if job.step.artifact_paths and not self._retry_wanted(job, attempt, result):
                failures = await self._collect_artifacts(job, attempt)
            self._attempt_finished(job, attempt, result, failures)
        finally:
            self._count.running -= 1  # the slot is held until the attempt's task ends
            self._count.tasks -= 1
            self._advance()

    async def _collect_artifacts(self, job: _Job, attempt: int) -> list[str]:
        """After the final attempt, before the job's terminal state is recorded (so whatever
        runs next, e.g. a dependent job or a client polling the state, finds them): copy the
        step's artifacts into the store and record them; notes go to the job's log. Returns
        the files that matched but could not be kept (the job fails for them)."""

        def collect() -> tuple[list[str], list[Collected], list[str]]:
            paths, notes = match_artifacts(self.working_dir, job.step.artifact_paths)
            collection = collect_artifacts(
                self.working_dir,
                paths,
                self.store.blobs,
                max_bytes=self.options.max_artifact_bytes,
            )
            return (
                notes + collection.notes + collection.failures,
                collection.artifacts,
                (collection.failures),
            )

        notes, collected, failures = await anyio.to_thread.run_sync(collect)
        at = _now()
        for item in collected:
            self._write(
                self.store.record_artifact,
                job.id,
                path=item.path,
                mime_type=item.mime_type,
                blob=item.blob,
                at=at,
            )
        if len(notes) > _MAX_NOTES:
            notes = [*notes[:_MAX_NOTES], f"... and {len(notes) - _MAX_NOTES} more like these"]
        for note in notes:
            # surrogateescape: a file name that is not UTF-8 goes to the log as its bytes
            line = f"[harmont-exec] {note}\n".encode("utf-8", "surrogateescape")
            self._write(self.store.append_log, job.id, attempt, "meta", line, at=at)
        self._log.info("artifacts_collected", job=job.key, count=len(collected), notes=len(notes))
        return failures

    def _retry_wanted(self, job: _Job, attempt: int, result: AttemptResult) -> bool:
        """Whether this attempt's end sends the job back to ``scheduled`` (THE retry rule)."""
        retry = job.step.retry_policy
        if retry is None or attempt > retry.limit or self._stopping or job.state.is_terminal:
            return False
        if result.reason is Reason.SPAWN_FAILED:
            return False
        if result.reason is Reason.EXECUTOR_LOST:
            # A remote worker that went away (Buildkite's "agent lost"): an attempt that ran
            # is retried like any failure when the policy retries every exit ("*"): it has no
            # exit code to match a list against.
            return job.state is JobState.RUNNING and retry.exit_codes == "*"
        if job.state is JobState.CANCELING:
            return False
        if job.state is JobState.TIMING_OUT:
            return retry.on_timeout
        if result.exit_code == 0:
            return False
        return retry.retries_exit_code(result.exit_code if result.exit_code is not None else 255)

    def _attempt_finished(
        self, job: _Job, attempt: int, result: AttemptResult, failures: list[str]
    ) -> None:
        at = result.finished_at
        self._write(
            self.store.record_attempt_finished,
            job.id,
            attempt,
            outcome=result.reason.value,
            exit_code=result.exit_code,
            signal=result.signal,
            at=at,
        )
        self._log.info(
            "attempt_finished",
            job=job.key,
            attempt=attempt,
            reason=result.reason.value,
            exit_code=result.exit_code,
        )
        if job.state.is_terminal:  # canceled or timed out with the build; the process is gone
            return
        step = job.step
        retry_wanted = self._retry_wanted(job, attempt, result)
        if result.reason is Reason.EXECUTOR_LOST and retry_wanted:
            self._retry(job, attempt, at, result.exit_code)
            return
        if result.reason is Reason.SPAWN_FAILED or result.reason is Reason.EXECUTOR_LOST:
            lost = (
                ErrorCode.SPAWN_FAILED
                if result.reason is Reason.SPAWN_FAILED
                else ErrorCode.EXECUTOR_LOST
            )
            self._transition(
                job,
                Event.EXECUTOR_LOST,
                at=at,
                error_code=lost,
                error_message=result.error or lost,
                exit_code=result.exit_code,
            )
        elif job.state is JobState.CANCELING:
            self._transition(job, Event.PROCESS_GONE, at=at, exit_code=result.exit_code)
        elif job.state is JobState.TIMING_OUT:
            if retry_wanted:
                self._retry(job, attempt, at, result.exit_code)
                return
            self._transition(job, Event.PROCESS_GONE, at=at, exit_code=result.exit_code)
        elif failures:  # its files could not be kept: a hard failure, the exit code kept
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            self._transition(
                job,
                Event.ARTIFACT_UPLOAD_FAILED,
                at=at,
                exit_code=result.exit_code,
                soft_failed=False,
                error_code=ErrorCode.ARTIFACT_UPLOAD_FAILED,
                error_message=f"{failures[0]}{more}",
            )
        elif result.exit_code == 0:
            self._transition(
                job, Event.EXITED_ZERO, at=at, exit_code=0, error_code=None, error_message=None
            )
        else:
            code = result.exit_code if result.exit_code is not None else 255
            if retry_wanted:
                self._retry(job, attempt, at, code)
                return
            soft = step.soft_fail_policy is not None and step.soft_fail_policy.matches(code)
            self._transition(
                job,
                Event.EXITED_NONZERO,
                at=at,
                exit_code=code,
                soft_failed=soft,
                error_code=None,  # the exit code says it; error codes are for what it cannot
                error_message=None,
            )
        self._finish(job)

    def _retry(self, job: _Job, attempt: int, at: datetime, exit_code: int | None) -> None:
        retry = job.step.retry_policy
        assert retry is not None
        backoff = retry.backoff
        delay = min(backoff.max_seconds, backoff.initial_seconds * backoff.factor ** (attempt - 1))
        if backoff.jitter:
            delay = random.uniform(0, delay)
        self._transition(
            job, Event.RETRY_SCHEDULED, at=at, exit_code=exit_code, retries_count=attempt
        )
        self._log.info(
            "retry_scheduled",
            job=job.key,
            attempt=attempt + 1,
            delay_s=round(delay, 3),
        )
        assert self._tg is not None
        self._tg.start_soon(self._requeue_after, job, delay)

    async def _requeue_after(self, job: _Job, delay: float) -> None:
        # A timer, not a job task: a cancel settles the job and the end of the build cancels it.
        await anyio.sleep(delay)
        if job.state is JobState.SCHEDULED and not self._stopping:
            heapq.heappush(self._queue, (self.plan.position(job.key), job.key))
            self._advance()

    def _result(self) -> BuildResult:
        error_code = self._error[0] if self._error else None
        return BuildResult(
            self.build.id,
            self.build.number,
            self.build.org,
            self.build.pipeline,
            self._state,
            error_code,
            {
                k: JobResult(
                    k,
                    j.id,
                    j.state,
                    j.exit_code,
                    j.soft_failed,
                    j.attempts,
                    j.error_code,
                    j.error_message,
                    j.started_at,
                    j.finished_at,
                )
                for k, j in self._jobs.items()
            },
        )
