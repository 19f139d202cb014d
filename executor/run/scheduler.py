"""The build loop: drives a Plan's jobs through THE transition table to terminal states.

Owns concurrency, plan-order start, retries with backoff, soft-fail, cascade (through the plan's
Frontier), per-job and whole-build timeouts, --fail-fast, cancellation, and the build roll-up.
Every state change goes through ``_transition``: ``states.transition`` decides the next state
and one store call records it with its history row. Processes are the runner's business
(``ProcessRunner``), which is a parameter, so tests can drive this loop with a fake.

Around it, in their own modules: what a run takes and gives back (``results``: RunOptions,
JobUpdate, JobResult, BuildResult; re-exported here), one job's working state with THE retry
rule and how an attempt's end moves it (``job``), showing changes only once committed
(``feed``), and the errors a run ends with when its record fails (``record_failure``).

All of this runs on one event-loop thread; the store only queues writes (group commit), so
recording never blocks a job from starting.
"""

from __future__ import annotations

import asyncio
import heapq
import os
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import anyio
import structlog

from executor.errors import ErrorCode, InternalError, StoreError
from executor.plan import Plan, Settled
from executor.run.artifacts import gather_artifacts
from executor.run.feed import Feed
from executor.run.job import Job, retry_delay
from executor.run.process import (
    AttemptResult,
    AttemptSpec,
    LocalProcessRunner,
    ProcessRunner,
    Reason,
    StopRequest,
    Stream,
)
from executor.run.record_failure import disk_full_error, mark_cut_logs, write_failed_error
from executor.run.results import BuildResult, JobResult, JobUpdate, RunOptions, exit_status
from executor.states import BuildState, Event, JobState, JobStatus, roll_up, transition
from executor.store import CreatedBuild, Store
from executor.store.liveness import HEARTBEAT_S

__all__ = [  # the result types are re-exported: callers take them from here with the loop
    "BuildResult",
    "JobResult",
    "JobUpdate",
    "RunOptions",
    "Scheduler",
    "exit_status",
]

log = structlog.get_logger("executor.run")

CANCEL_POLL_S = 0.5
"""How often a running build reads whether a cancel was requested through the store (the
API's ``cancelBuild``, whoever runs the build): it reacts within about this long."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Counters:
    terminal: int = 0
    running: int = 0  # jobs holding a concurrency slot (assigned, running, stopping)
    tasks: int = 0  # attempts assigned or running (a stopped job's process may still be exiting)
    hard_failures: int = 0
    started: bool = False


# What a cancel stops: a waiting job is canceled at once, a running one once its process is gone.
_STOPPABLE = frozenset({JobState.PENDING, JobState.SCHEDULED, JobState.ASSIGNED, JobState.RUNNING})
# Jobs canceled with these codes are unfinished work that `resume` runs again; a job canceled
# in cascade from one carries its code.
_RESUMABLE_CODES = frozenset({ErrorCode.BUILD_ABANDONED, ErrorCode.RECORD_FAILED})


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
        prior: Mapping[str, JobResult] | None = None,
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trouble_seen = False
        # Bound once: the module's lazy logger re-reads the configuration at every call.
        self._log = log.bind(build=build.number)
        # Durable before shown (SPEC §5): the view sees each change once it is committed.
        self._feed = None if on_change is None else Feed(store, on_change, self._log)
        self._jobs = {s.key: Job(s.key, build.job_ids[s.key], s) for s in plan}
        self._cursor = plan.frontier()
        self._prior = prior or {}
        for key, before in self._prior.items():
            self._jobs[key].take(before)
        self._queue: list[tuple[int, str]] = []  # scheduled jobs waiting for a slot
        self._assigned: deque[Job] = deque()  # jobs given a slot, for the next free worker
        self._idle: list[anyio.Event] = []  # workers waiting for an assigned job
        self._count = _Counters()
        self._limit = self.options.concurrency or plan.spec.concurrency or os.cpu_count() or 1
        self._state = state
        self._cancel_requested = False  # a user's cancel (signal), not fail-fast
        self._stopping = False  # no new attempts, no retries
        self._error: tuple[ErrorCode, str] | None = None  # the build's, once it ends
        self._store_error: StoreError | None = None
        self._done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        cwd = self.options.working_dir
        if cwd is None:
            cwd = plan.source.parent if plan.source is not None else Path.cwd()
        self.working_dir = cwd.resolve()
        base = os.environ if self.options.base_env is None else self.options.base_env
        self._base_env = {**base, **plan.spec.env}

    # --- public -----------------------------------------------------------------------------------

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
            if self._feed is not None:
                self._feed.release()  # what the last commits carried (after a failure: only those)

    async def _run_to_the_end(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.plan.spec.timeout_seconds is not None:
                tg.start_soon(self._build_timer, self.plan.spec.timeout_seconds)
            tg.start_soon(self._heartbeat)
            tg.start_soon(self._watch_cancel)
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
                raise write_failed_error(self.build, exc) from None
        if self._trouble_seen:
            keys = {j.id: j.key for j in self._jobs.values()}
            dropped = {keys[j]: n for j, n in self.store.dropped_output.items() if j in keys}
            cuts = [(self._jobs[k].id, self._jobs[k].attempts, n) for k, n in dropped.items()]
            await anyio.to_thread.run_sync(mark_cut_logs, self.store, cuts)
            raise disk_full_error(self.build, self.store.trouble, dropped)
        return self._result()

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

    def interrupt(self, reason: str) -> None:
        """Stop the build to be resumed later (``serve`` stopping): what runs is stopped (its
        process group: SIGTERM, the grace period, SIGKILL), what waits is canceled, both with
        ``build_abandoned``, and the build ends ``failed`` with it, as when its executor dies:
        ``resume`` (or the next ``serve``) runs those jobs again."""
        if self._state.is_terminal or self._stopping:
            return
        self._log.info("build_interrupted", reason=reason)
        self._error = (ErrorCode.BUILD_ABANDONED, reason)
        self._stop_everything(reason, error_code=ErrorCode.BUILD_ABANDONED)
        self._roll_up(_now())

    def kill(self) -> None:
        """Second interrupt: SIGKILL every job's process group now (after a cancel, which
        this makes first unless the build is already stopping)."""
        if not self._stopping:
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
        if self.options.fail_fast and self._count.hard_failures:
            # --fail-fast cancels everything after the first hard failure, even one recorded
            # before this resume: the resumed build ends as the first run would have.
            first = next(
                j
                for k in self.plan.order
                if (j := self._jobs[k]).state.is_terminal
                and JobStatus(j.state, j.soft_failed).is_hard_failure
            )
            self._stop_everything(f"--fail-fast: {first.key!r} {first.state.value}")

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
            if self._feed is not None:  # nothing more is shown: it may not be recorded
                self._feed.close()
            self._log.error(ErrorCode.RECORD_FAILED.value, error=str(exc))
            if self._tg is not None:  # not from inside this transition: on the next tick
                self._tg.start_soon(self._stop_for_store_error, exc)

    async def _stop_for_store_error(self, exc: StoreError) -> None:
        # The error itself is logged once (record_failed) and raised by run(); the jobs'
        # reason stays short, as it is shown on every stopped job's line.
        self.cancel("the record cannot be written (the error is at the end)")

    # --- transitions ------------------------------------------------------------------------------

    def _transition(
        self, job: Job, event: Event, *, at: datetime | None = None, **fields: object
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
        if self._feed is not None:
            self._feed.show(
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

    # --- the record's commits ---------------------------------------------------------------------

    def _on_commit(self, committed: int) -> None:
        # The writer's thread: only hand the news to the event loop.
        loop, feed = self._loop, self._feed
        if loop is None:
            return
        try:
            if feed is not None and feed.waiting:
                loop.call_soon_threadsafe(feed.release, committed)
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
        self._log.error(ErrorCode.RECORD_FAILED.value, error=str(self.store.trouble))
        self._error = (
            ErrorCode.RECORD_FAILED,
            f"stopped: the record could not be written ({self.store.trouble})",
        )
        self._stop_everything(
            "the record's disk is full (the error is at the end)",
            error_code=ErrorCode.RECORD_FAILED,
        )
        self._roll_up(_now())

    # --- cascade, slots, roll-up ------------------------------------------------------------------

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
                # A job canceled because its record could not be written, or because its
                # executor stopped (interrupt), passes that on: its dependents are as much
                # unfinished work for `resume` as it is.
                code = (
                    ErrorCode(cause.error_code)
                    if cause.error_code in _RESUMABLE_CODES
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

    def _finish(self, job: Job) -> None:
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
        if state is BuildState.CANCELED and self._error and self._error[0] in _RESUMABLE_CODES:
            # Nobody canceled it: its record could not be written, or its executor stopped.
            state = BuildState.FAILED
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
        if self._feed is not None:
            self._feed.show(JobUpdate(None, state.value, at))

    # --- stopping ---------------------------------------------------------------------------------

    def _stop_everything(
        self, reason: str, *, error_code: ErrorCode = ErrorCode.BUILD_CANCELED
    ) -> None:
        """Cancel waiting jobs, stop running ones; used by cancel and --fail-fast."""
        self._stopping = True
        at = _now()
        for key in self.plan.order:
            job = self._jobs[key]
            if job.state not in _STOPPABLE:
                continue
            self._transition(
                job, Event.CANCEL_REQUESTED, at=at, error_code=error_code, error_message=reason
            )
            # A waiting job's runner may already be starting it; a running job has none once
            # its process is gone (its artifacts are being collected).
            if job.stop is not None:
                job.stop.stop(Reason.CANCELED)
            if job.state is JobState.CANCELED:
                self._settle(self._cursor.done(key, JobState.CANCELED))
        if self._cancel_requested:
            self._roll_up(at)
        self._check_done()

    async def _heartbeat(self) -> None:
        """Tell readers of the store this executor is alive (for a shared store, where other
        hosts judge it by this; on this host its process identity already says so)."""
        while True:
            await anyio.sleep(HEARTBEAT_S)
            self._write(self.store.record_heartbeat, self.build.id, at=_now())

    async def _watch_cancel(self) -> None:
        """Cancel as a first SIGINT would once the store says a cancel was requested
        (``Store.request_cancel``: the API, for a build run by whoever runs it)."""
        failing = False
        while not self._state.is_terminal:
            try:
                requested = await anyio.to_thread.run_sync(
                    self.store.cancel_requested, self.build.id
                )
            except StoreError as exc:
                if not failing:  # once: the next read that works says it is over
                    self._log.warning("cancel_check_failed", error=str(exc))
                failing = True
            else:
                failing = False
                if requested:
                    self.cancel("the build was canceled on request")
                    return
            await anyio.sleep(CANCEL_POLL_S)

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

    async def _job_timer(self, job: Job, attempt: int, timeout_s: float) -> None:
        await anyio.sleep(timeout_s)
        if job.state is JobState.RUNNING and job.attempts == attempt and job.stop is not None:
            self._transition(
                job,
                Event.TIMEOUT_EXPIRED,
                error_code=ErrorCode.JOB_TIMEOUT,
                error_message=f"attempt {attempt} exceeded timeout_seconds={timeout_s:g}",
            )
            job.stop.stop(Reason.TIMED_OUT)

    # --- one attempt ------------------------------------------------------------------------------

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

    async def _attempt(self, job: Job) -> None:
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
            if job.step.artifact_paths and not job.retry_wanted(
                attempt, result, stopping=self._stopping
            ):
                failures = await self._collect_artifacts(job, attempt)
            self._attempt_finished(job, attempt, result, failures)
        finally:
            self._count.running -= 1  # the slot is held until the attempt's task ends
            self._count.tasks -= 1
            self._advance()

    async def _collect_artifacts(self, job: Job, attempt: int) -> list[str]:
        """After the final attempt, before the job's terminal state is recorded (so whatever
        runs next, e.g. a dependent job or a client polling the state, finds them): copy the
        step's artifacts into the store and record them; notes go to the job's log. Returns
        the files that matched but could not be kept (the job fails for them)."""
        collection = await anyio.to_thread.run_sync(
            partial(
                gather_artifacts,
                self.working_dir,
                job.step.artifact_paths,
                self.store.blobs,
                max_bytes=self.options.max_artifact_bytes,
            )
        )
        at = _now()
        for item in collection.artifacts:
            self._write(
                self.store.record_artifact,
                job.id,
                path=item.path,
                mime_type=item.mime_type,
                blob=item.blob,
                at=at,
            )
        for note in collection.notes:
            # surrogateescape: a file name that is not UTF-8 goes to the log as its bytes
            line = f"[harmont-exec] {note}\n".encode("utf-8", "surrogateescape")
            self._write(self.store.append_log, job.id, attempt, "meta", line, at=at)
        self._log.info(
            "artifacts_collected",
            job=job.key,
            count=len(collection.artifacts),
            notes=len(collection.notes),
        )
        return collection.failures

    def _attempt_finished(
        self, job: Job, attempt: int, result: AttemptResult, failures: list[str]
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
        retry = job.retry_wanted(attempt, result, stopping=self._stopping)
        outcome = job.outcome(result, failures, retry=retry)
        if outcome.event is Event.RETRY_SCHEDULED:
            self._retry(job, attempt, at, outcome.exit_code)
            return
        self._transition(
            job,
            outcome.event,
            at=at,
            exit_code=outcome.exit_code,
            soft_failed=outcome.soft_failed,
            error_code=outcome.error_code,
            error_message=outcome.error_message,
        )
        self._finish(job)

    def _retry(self, job: Job, attempt: int, at: datetime, exit_code: int | None) -> None:
        retry = job.step.retry_policy
        if retry is None:
            raise InternalError(f"job {job.key!r} is retried, but its step has no retry_policy")
        if self._tg is None:
            raise InternalError(f"job {job.key!r}: a retry was scheduled outside run()")
        delay = retry_delay(retry, attempt)
        self._transition(
            job, Event.RETRY_SCHEDULED, at=at, exit_code=exit_code, retries_count=attempt
        )
        self._log.info(
            "retry_scheduled",
            job=job.key,
            attempt=attempt + 1,
            delay_s=round(delay, 3),
        )
        self._tg.start_soon(self._requeue_after, job, delay)

    async def _requeue_after(self, job: Job, delay: float) -> None:
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
            {k: j.result() for k, j in self._jobs.items()},
        )
