"""`harmont-exec run`, `resume` and `retry`: a build run here, shown as it runs (``view``), then
its summary and its exit code."""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from executor.cli.common import (
    STATE_STYLE,
    cli,
    configure_logging,
    db_option,
    make_console,
)
from executor.cli.view import (
    LiveView,
    PlainLines,
    Summary,
    print_summary,
    tail_option,
    verdict,
    wants_tail,
)
from executor.errors import ExecutorError, RecordFailedError
from executor.load import load_plan
from executor.run.artifacts import DEFAULT_MAX_BYTES
from executor.run.build import resume_build, retry_build, run_build
from executor.run.dask import check_address, open_dask_runner
from executor.run.process import ProcessRunner
from executor.run.scheduler import BuildResult, JobUpdate, RunOptions
from executor.store import Store, open_store


def _summary(console: Console, store: Store, result: BuildResult, tail_lines: int) -> None:
    """The table of jobs (from the result in memory: a big build is not read back) and the
    last log lines of each failed job (from the store)."""
    jobs = list(result.jobs.values())  # plan order
    kept = len(store.list_artifacts(build_id=result.build_id, limit=1000))
    build = store.get_build_by_id(result.build_id)
    print_summary(
        console,
        Summary(
            org=result.org,
            pipeline=result.pipeline,
            number=result.number,
            state=result.state.value,
            jobs=jobs,
            tails={
                job.job_id: _tail(store, job.job_id, tail_lines)
                for job in jobs
                if wants_tail(job) and tail_lines
            },
            artifacts_kept=kept,
            artifacts_capped=kept == 1000,
            error_message=None if build is None else build.error_message,
            jobs_hint=f"harmont-exec jobs {result.number}",
            log_hint=lambda job_id: f"harmont-exec logs {job_id}",
            artifacts_hint=f"harmont-exec artifacts {result.number} --pipeline {result.pipeline}",
        ),
    )


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
@tail_option
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
                lines = PlainLines(sys.stdout)
                try:
                    return await start(store, lines, runner)
                finally:
                    lines.close()
            view = LiveView(console, total(store))
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
        verdict(result.number, result.state.value, time.monotonic() - started, result.exit_status)
    )
    sys.exit(result.exit_status)


@cli.command()
@click.argument("number", type=int)
@db_option
@click.option("--org", help="Organization of the build.")
@click.option("--pipeline", help="Pipeline of the build (needed when the number is ambiguous).")
@_jobs_option
@_grace_option
@tail_option
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
@tail_option
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
