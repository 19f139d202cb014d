"""`harmont-exec run`: the live view, the piped lines, the summary and the exit code."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TextIO

import anyio
import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from executor.cli.common import (
    STATE_STYLE,
    cli,
    configure_logging,
    db_option,
    duration_text,
    make_console,
)
from executor.errors import ExecutorError, RecordFailedError
from executor.load import load_plan
from executor.run.artifacts import DEFAULT_MAX_BYTES
from executor.run.build import resume_build, retry_build, run_build
from executor.run.dask import check_address, open_dask_runner
from executor.run.process import ProcessRunner
from executor.run.scheduler import BuildResult, JobUpdate, RunOptions
from executor.states import JobState
from executor.store import Store, open_store


class _LiveView:
    """Terminal view while a build runs: progress, state counts and the jobs running now."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.states: dict[str, JobUpdate] = {}
        self.started: dict[str, datetime] = {}
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("build", total=total)
        self.build_state = "scheduled"

    def __call__(self, change: JobUpdate) -> None:
        if change.key is None:
            self.build_state = change.state
            self.progress.update(self.task, description=f"build {change.state}")
            return
        previous = self.states.get(change.key)
        self.states[change.key] = change
        if change.state == "running" and change.key not in self.started:
            self.started[change.key] = change.at
        if JobState(change.state).is_terminal and not (
            previous is not None and JobState(previous.state).is_terminal
        ):
            self.progress.advance(self.task)
            if change.state != "passed":
                self.console.print(_plain_line(change), highlight=False)

    def __rich__(self) -> Group:
        counts = Counter(c.state for c in self.states.values())
        summary = "  ".join(
            f"[{STATE_STYLE.get(state, 'white')}]{state} {n}[/]"
            for state, n in sorted(counts.items())
        )
        active = Table.grid(padding=(0, 2))
        shown = 0
        for key, change in self.states.items():
            if change.state in ("running", "timing_out", "canceling") and shown < 10:
                shown += 1
                active.add_row(
                    f"[{STATE_STYLE.get(change.state, 'white')}]{change.state}[/]",
                    key,
                    f"attempt {change.attempt}",
                    duration_text(self.started.get(key), None),
                )
        return Group(self.progress, summary, active)


_ENDING = frozenset(s.value for s in JobState if s.is_terminal)
_STOPPING = frozenset({JobState.TIMING_OUT.value, JobState.CANCELING.value})


def _plain_line(change: JobUpdate) -> str:
    # Plain string tests and %-formatting: this runs four times per job.
    at = change.at if change.at.tzinfo is UTC else change.at.astimezone(UTC)
    when = "%02d:%02d:%02d" % (at.hour, at.minute, at.second)  # noqa: UP031
    state = change.state
    if change.key is None:
        return f"{when} build {state}"
    details = []
    if state == "running":
        details.append(f"attempt {change.attempt}")
    elif state == "scheduled":
        if change.attempt:
            details.append(f"retry after attempt {change.attempt}")
            if change.exit_code is not None:
                details.append(f"exit {change.exit_code}")
    elif state in _ENDING or state in _STOPPING:
        if change.attempt > 1:
            details.append(f"{change.attempt} attempts")
        if change.exit_code is not None and state in _ENDING:
            details.append(f"exit {change.exit_code}")
        if change.soft_failed:
            details.append("soft-failed")
        if change.error_message and state != "passed":
            details.append(change.error_message)
    if details:
        return f"{when} {change.key} {state} ({', '.join(details)})"
    return f"{when} {change.key} {state}"


class _PlainLines:
    """The piped view: one line per change, flushed within ``FLUSH_S`` of being written, so
    whoever reads the pipe (tee, a CI log) sees each change at once, without one write system
    call per change (a 10k-job build makes 40k changes). Call ``close`` at the end."""

    FLUSH_S = 0.1

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, change: JobUpdate) -> None:
        self._out.write(_plain_line(change) + "\n")
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._timer = None
        self._out.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._flush()


_SUMMARY_ROWS = 40


def _summary(console: Console, store: Store, result: BuildResult, tail_lines: int) -> None:
    """The table of jobs (from the result in memory: a big build is not read back) and the
    last log lines of each failed job (from the store)."""
    jobs = list(result.jobs.values())  # plan order
    table = Table(
        title=f"{result.org}/{result.pipeline} build #{result.number}: {result.state.value}"
    )
    for column in ("job", "state", "attempts", "exit", "duration", "note"):
        table.add_column(column)
    # A big build lists only what did not pass; the counts say the rest.
    shown = (
        jobs
        if len(jobs) <= _SUMMARY_ROWS
        else [j for j in jobs if j.state is not JobState.PASSED or j.soft_failed][:_SUMMARY_ROWS]
    )
    for job in shown:
        state = job.state.value + (" (soft)" if job.soft_failed else "")
        table.add_row(
            job.key,
            f"[{STATE_STYLE.get(job.state.value, 'white')}]{state}[/]",
            str(job.attempts),
            "" if job.exit_code is None else str(job.exit_code),
            duration_text(job.started_at, job.finished_at),
            "" if job.state is JobState.PASSED else (job.error_message or ""),
        )
    if len(shown) < len(jobs):
        counts = Counter(j.state.value for j in jobs)
        table.caption = (
            ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            + f"; showing {len(shown)} of {len(jobs)} jobs (harmont-exec jobs {result.number})"
        )
    if shown:
        console.print(table)
    elif jobs:
        console.print(f"{table.title}; {table.caption}")
    else:
        console.print(f"{table.title} (no jobs)")
    for job in jobs:
        if job.state in (JobState.FAILED, JobState.TIMED_OUT) and tail_lines:
            lines = _tail(store, job.job_id, tail_lines)
            if not lines:
                continue
            console.rule(f"{job.key}: last {len(lines)} log lines (harmont-exec logs {job.job_id})")
            for line in lines:
                console.out(line, highlight=False)
    kept = len(store.list_artifacts(build_id=result.build_id, limit=1000))
    if kept:
        console.print(
            f"{kept}{'+' if kept == 1000 else ''} artifact{'s' if kept > 1 else ''} kept "
            f"(harmont-exec artifacts {result.number} --pipeline {result.pipeline})",
            highlight=False,
        )
    build = store.get_build_by_id(result.build_id)
    if build is not None and build.error_message:  # e.g. the build's timeout
        console.print(f"[red]{build.error_message}[/]")


def _recorded_summary(console: Console, store: Store, failed: RecordFailedError) -> None:
    """The jobs as the record has them, after a build stopped because the record could not be
    written (reads still work on a full or read-only disk)."""
    try:
        build = store.get_build_by_id(failed.build_id)
        jobs = store.list_jobs(failed.build_id)
    except ExecutorError:
        return  # the database cannot even be read: the error says why
    if build is None:
        return
    table = Table(
        title=f"{failed.org}/{failed.pipeline} build #{failed.number}, as recorded: "
        f"{build.state.value}"
    )
    for column in ("job", "state", "exit", "note"):
        table.add_column(column)
    for job in jobs:
        table.add_row(
            job.step_key,
            f"[{STATE_STYLE.get(job.state.value, 'white')}]{job.state.value}[/]",
            "" if job.exit_code is None else str(job.exit_code),
            (f"{job.error_code}: " if job.error_code else "") + (job.error_message or ""),
        )
    console.print(table)


def _tail(store: Store, job_id: str, count: int) -> list[str]:
    data = b"".join(chunk.content for chunk in store.read_log(job_id))
    return data.decode("utf-8", "replace").splitlines()[-count:]


# Options that `run`, `resume` and `retry` share.
_jobs_option = click.option(
    "-j",
    "--jobs",
    "concurrency",
    type=click.IntRange(1, 1024),
    help="Jobs running at once [default: the file's concurrency, else CPUs].",
)
_fail_fast_option = click.option(
    "--fail-fast", is_flag=True, help="Cancel everything after the first hard failure."
)
_grace_option = click.option(
    "--grace-seconds",
    type=click.FloatRange(0, 3600),
    default=10.0,
    show_default=True,
    help="Between SIGTERM and SIGKILL when a job is stopped.",
)
_tail_option = click.option(
    "--tail",
    "tail_lines",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="Log lines shown for each failed job at the end.",
)


_artifact_limit_option = click.option(
    "--max-artifact-mb",
    "max_artifact_mb",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_MAX_BYTES / (1 << 20),
    show_default=True,
    help="Largest file kept as one artifact, in MB; a bigger one fails its job "
    "(artifact_upload_failed).",
)

_executor_option = click.option(
    "--executor",
    type=click.Choice(["local", "dask"]),
    default="local",
    show_default=True,
    help="Where attempts run: here, or on the workers of a Dask cluster (needs --scheduler).",
)
_scheduler_option = click.option(
    "--scheduler",
    envvar="HARMONT_DASK_SCHEDULER",
    help="The Dask scheduler for --executor dask, e.g. tcp://127.0.0.1:8786 "
    "[env HARMONT_DASK_SCHEDULER].",
)


def _executor_choice(ctx: click.Context, executor: str, scheduler: str | None) -> str | None:
    """The Dask scheduler's address for ``--executor dask``, None for local; usage errors for
    the combinations that make no sense."""
    if executor == "local":
        given = ctx.get_parameter_source("scheduler") is click.core.ParameterSource.COMMANDLINE
        if given:
            raise click.UsageError(
                f"--scheduler {scheduler} is only used by --executor dask; add "
                "`--executor dask` to run the jobs on that Dask cluster, or drop --scheduler"
            )
        return None
    if not scheduler:
        raise click.UsageError(
            "--executor dask needs the Dask scheduler's address: pass --scheduler "
            "tcp://HOST:8786 or set HARMONT_DASK_SCHEDULER (start one with `dask scheduler`)"
        )
    try:
        return check_address(scheduler)
    except ExecutorError as exc:
        raise click.UsageError(f"--scheduler: {exc}") from None


@asynccontextmanager
async def _open_runner(scheduler: str | None) -> AsyncIterator[ProcessRunner | None]:
    """None (the scheduler's local default) or a Dask runner connected to ``scheduler``."""
    if scheduler is None:
        yield None
        return
    # open_dask_runner imports distributed: only here, never for the local executor.
    async with open_dask_runner(scheduler) as runner:
        yield runner


def _job_count(number: int, org: str | None, pipeline: str | None, store: Store) -> int:
    """How many jobs recorded build ``number`` has (for the live view's progress)."""
    build = store.get_build(number, org=org, pipeline=pipeline)
    return len(store.list_jobs(build.id)) if build is not None else 0


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@db_option
@click.option("--org", default="local", show_default=True, help="Organization to record into.")
@click.option("--pipeline", help="Pipeline to record into [default: the file's name].")
@_jobs_option
@_fail_fast_option
@_grace_option
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    help="Override the log format for this command.",
)
@_tail_option
@_artifact_limit_option
@_executor_option
@_scheduler_option
@click.pass_context
def run(
    ctx: click.Context,
    file: Path,
    db: str | None,
    org: str,
    pipeline: str | None,
    concurrency: int | None,
    fail_fast: bool,
    grace_seconds: float,
    log_format: str | None,
    tail_lines: int,
    max_artifact_mb: float,
    executor: str,
    scheduler: str | None,
) -> None:
    """Run the build in FILE, record it, and exit with its outcome."""
    address = _executor_choice(ctx, executor, scheduler)
    if log_format is not None:
        configure_logging(log_format, logging.INFO if ctx.obj["verbose"] else logging.WARNING)
    plan = load_plan(file)  # an invalid file: the group prints its diagnostics, exit 2
    # What exists now (modules, the plan) lives until exit: keep the cyclic garbage collector
    # from walking it again and again while jobs run (~10% of the CPU of 10k short jobs).
    gc.freeze()
    options = RunOptions(
        concurrency=concurrency,
        fail_fast=fail_fast,
        grace_period_s=grace_seconds,
        max_artifact_bytes=int(max_artifact_mb * (1 << 20)),
    )

    def start(
        store: Store, on_change: Callable[[JobUpdate], None], runner: ProcessRunner | None
    ) -> Awaitable[BuildResult]:
        return run_build(
            plan,
            store=store,
            org=org,
            pipeline=pipeline,
            options=options,
            runner=runner,
            on_change=on_change,
            handle_signals=True,
        )

    _drive(db, tail_lines, start, lambda _: len(plan), address)


_Start = Callable[
    [Store, Callable[[JobUpdate], None], ProcessRunner | None], Awaitable[BuildResult]
]


def _drive(
    db: str | None,
    tail_lines: int,
    start: _Start,
    total: Callable[[Store], int],
    scheduler: str | None,
) -> None:
    """Run ``start`` (a build) with the live view on a terminal or one line per change
    otherwise, then the summary; exit with the build's status. With ``scheduler``, the jobs
    run on that Dask cluster (connected before the build is recorded)."""
    console = make_console()
    live = console.is_terminal

    async def go(store: Store) -> BuildResult:
        async with _open_runner(scheduler) as runner:
            if not live:
                lines = _PlainLines(sys.stdout)
                try:
                    return await start(store, lines, runner)
                finally:
                    lines.close()
            view = _LiveView(console, total(store))
            with Live(view, console=console, refresh_per_second=8, transient=True):
                return await start(store, view, runner)

    started = time.monotonic()
    with open_store(db) as store:
        try:
            result = anyio.run(go, store)
        except RecordFailedError as failed:
            # What the record says, not what this process thought: they must agree.
            _recorded_summary(console, store, failed)
            raise
        _summary(console, store, result, tail_lines)
    console.print(
        f"build #{result.number} {result.state.value} in "
        f"{time.monotonic() - started:.1f}s (exit {result.exit_status})"
    )
    sys.exit(result.exit_status)


@cli.command()
@click.argument("number", type=int)
@db_option
@click.option("--org", help="Organization of the build.")
@click.option("--pipeline", help="Pipeline of the build (needed when the number is ambiguous).")
@_jobs_option
@_grace_option
@_tail_option
@_artifact_limit_option
@_executor_option
@_scheduler_option
@click.pass_context
def resume(
    ctx: click.Context,
    number: int,
    db: str | None,
    org: str | None,
    pipeline: str | None,
    concurrency: int | None,
    grace_seconds: float,
    tail_lines: int,
    max_artifact_mb: float,
    executor: str,
    scheduler: str | None,
) -> None:
    """Continue build NUMBER, abandoned when its executor died, in place.

    Its finished jobs keep their results; the jobs that were running (failed, executor_lost)
    or had not started or were stopped (canceled, build_abandoned or record_failed) run again,
    their earlier attempts kept in
    the history. Refused for a build that is still running or that finished by itself. Exits
    like `run`."""
    address = _executor_choice(ctx, executor, scheduler)
    gc.freeze()
    options = RunOptions(
        concurrency=concurrency,
        grace_period_s=grace_seconds,
        max_artifact_bytes=int(max_artifact_mb * (1 << 20)),
    )

    def start(
        store: Store, on_change: Callable[[JobUpdate], None], runner: ProcessRunner | None
    ) -> Awaitable[BuildResult]:
        return resume_build(
            number,
            store=store,
            org=org,
            pipeline=pipeline,
            options=options,
            runner=runner,
            on_change=on_change,
            handle_signals=True,
        )

    _drive(db, tail_lines, start, partial(_job_count, number, org, pipeline), address)


@cli.command()
@click.argument("number", type=int)
@db_option
@click.option("--org", help="Organization of the build.")
@click.option("--pipeline", help="Pipeline of the build (needed when the number is ambiguous).")
@click.option(
    "--failed",
    "failed_only",
    is_flag=True,
    help="Run only the jobs that did not pass; the others take their result from NUMBER.",
)
@_jobs_option
@_fail_fast_option
@_grace_option
@_tail_option
@_artifact_limit_option
@_executor_option
@_scheduler_option
@click.pass_context
def retry(
    ctx: click.Context,
    number: int,
    db: str | None,
    org: str | None,
    pipeline: str | None,
    failed_only: bool,
    concurrency: int | None,
    fail_fast: bool,
    grace_seconds: float,
    tail_lines: int,
    max_artifact_mb: float,
    executor: str,
    scheduler: str | None,
) -> None:
    """Run build NUMBER's plan again, as a new build of the same pipeline.

    The plan is the one NUMBER recorded (the build file may have changed since), run in the
    same working directory. With --failed, the jobs that passed in NUMBER are not run: each
    takes its result, artifacts included, recorded as reused from that job. Exits like `run`."""
    address = _executor_choice(ctx, executor, scheduler)
    gc.freeze()
    options = RunOptions(
        concurrency=concurrency,
        fail_fast=fail_fast,
        grace_period_s=grace_seconds,
        max_artifact_bytes=int(max_artifact_mb * (1 << 20)),
    )

    def start(
        store: Store, on_change: Callable[[JobUpdate], None], runner: ProcessRunner | None
    ) -> Awaitable[BuildResult]:
        return retry_build(
            number,
            store=store,
            org=org,
            pipeline=pipeline,
            failed_only=failed_only,
            options=options,
            runner=runner,
            on_change=on_change,
            handle_signals=True,
        )

    _drive(db, tail_lines, start, partial(_job_count, number, org, pipeline), address)
