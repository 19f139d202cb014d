"""The ``harmont-exec`` command line: the only module that parses argv or prints.

Exit codes (SPEC §4): ``run`` exits 0 passed, 1 failed, 124 build timeout, 130 canceled; every
command exits 2 for an invalid build file or usage. Errors print on stderr without a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import anyio
import click
import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from executor import __version__
from executor.errors import BuildFileError, ExecutorError
from executor.load import load_plan
from executor.render import plan_to_data, plan_to_dot, plan_to_mermaid, plan_to_text
from executor.run.build import run_build
from executor.run.scheduler import BuildResult, Change, RunOptions
from executor.states import JobState
from executor.store import BuildRow, Store, open_store

EXIT_INVALID = 2


def _configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """structlog to stderr: a console renderer on a terminal, JSON lines otherwise."""
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harmont-exec")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="How log lines on stderr look: console on a terminal, JSON otherwise.",
)
@click.option("-v", "--verbose", is_flag=True, help="Also log every attempt and state change.")
@click.pass_context
def cli(ctx: click.Context, log_format: str, verbose: bool) -> None:
    """Plan and run CI builds as DAGs of shell jobs."""
    ctx.obj = {"log_format": log_format, "verbose": verbose}
    _configure_logging(log_format, logging.INFO if verbose else logging.WARNING)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=True, exists=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "dot", "mermaid"]),
    default="text",
    show_default=True,
    help="text: levels for people; json: the normalized plan; dot / mermaid: a drawing.",
)
def plan(file: Path, fmt: str) -> None:
    """Validate FILE and show its jobs in the order they would run."""
    try:
        result = load_plan(file)
    except ExecutorError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_INVALID)
    if fmt == "json":
        click.echo(json.dumps(plan_to_data(result), indent=2, ensure_ascii=False))
    elif fmt == "dot":
        click.echo(plan_to_dot(result), nl=False)
    elif fmt == "mermaid":
        click.echo(plan_to_mermaid(result), nl=False)
    else:
        click.echo(plan_to_text(result, name=str(file)), nl=False)


# --- run -------------------------------------------------------------------------------------


def _console() -> Console:
    """Rich output on stdout; piped, lines are not wrapped at 80 columns (scripts grep them)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 240)


_STYLE = {
    "passed": "green",
    "failed": "red",
    "timed_out": "red",
    "skipped": "yellow",
    "canceled": "magenta",
    "canceling": "magenta",
    "timing_out": "red",
    "running": "cyan",
}


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return ""
    seconds = ((end or datetime.now(UTC)) - start).total_seconds()
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


class _LiveView:
    """Terminal view while a build runs: progress, state counts and the jobs running now."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.states: dict[str, Change] = {}
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

    def __call__(self, change: Change) -> None:
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
            f"[{_STYLE.get(state, 'white')}]{state} {n}[/]" for state, n in sorted(counts.items())
        )
        active = Table.grid(padding=(0, 2))
        shown = 0
        for key, change in self.states.items():
            if change.state in ("running", "timing_out", "canceling") and shown < 10:
                shown += 1
                active.add_row(
                    f"[{_STYLE.get(change.state, 'white')}]{change.state}[/]",
                    key,
                    f"attempt {change.attempt}",
                    _duration(self.started.get(key), None),
                )
        return Group(self.progress, summary, active)


_ENDING = frozenset(s.value for s in JobState if s.is_terminal)
_STOPPING = frozenset({JobState.TIMING_OUT.value, JobState.CANCELING.value})


def _plain_line(change: Change) -> str:
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

    def __call__(self, change: Change) -> None:
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
            f"[{_STYLE.get(job.state.value, 'white')}]{state}[/]",
            str(job.attempts),
            "" if job.exit_code is None else str(job.exit_code),
            _duration(job.started_at, job.finished_at),
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
    else:
        console.print(f"{table.title}; {table.caption}")
    for job in jobs:
        if job.state in (JobState.FAILED, JobState.TIMED_OUT) and tail_lines:
            lines = _tail(store, job.job_id, tail_lines)
            if not lines:
                continue
            console.rule(f"{job.key}: last {len(lines)} log lines (harmont-exec logs {job.job_id})")
            for line in lines:
                console.out(line, highlight=False)
    build = store.get_build_by_id(result.build_id)
    if build is not None and build.error_message:  # e.g. the build's timeout
        console.print(f"[red]{build.error_message}[/]")


def _tail(store: Store, job_id: str, count: int) -> list[str]:
    data = b"".join(chunk.content for chunk in store.read_log(job_id))
    return data.decode("utf-8", "replace").splitlines()[-count:]


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--db",
    envvar="HARMONT_DB",
    help="Store: a SQLite path or sqlite:/// URL [default: .harmont/harmont.db; env HARMONT_DB].",
)
@click.option("--org", default="local", show_default=True, help="Organization to record into.")
@click.option("--pipeline", help="Pipeline to record into [default: the file's name].")
@click.option(
    "-j",
    "--jobs",
    "concurrency",
    type=click.IntRange(1, 1024),
    help="Jobs running at once [default: the file's concurrency, else CPUs].",
)
@click.option("--fail-fast", is_flag=True, help="Cancel everything after the first hard failure.")
@click.option(
    "--grace-seconds",
    type=click.FloatRange(0, 3600),
    default=10.0,
    show_default=True,
    help="Between SIGTERM and SIGKILL when a job is stopped.",
)
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    help="Override the log format for this command.",
)
@click.option(
    "--tail",
    "tail_lines",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="Log lines shown for each failed job at the end.",
)
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
) -> None:
    """Run the build in FILE, record it, and exit with its outcome."""
    if log_format is not None:
        _configure_logging(log_format, logging.INFO if ctx.obj["verbose"] else logging.WARNING)
    try:
        plan = load_plan(file)
    except BuildFileError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_INVALID)
    # What exists now (modules, the plan) lives until exit: keep the cyclic garbage collector
    # from walking it again and again while jobs run (~10% of the CPU of 10k short jobs).
    gc.freeze()
    console = _console()
    options = RunOptions(concurrency=concurrency, fail_fast=fail_fast, grace_period_s=grace_seconds)
    live = console.is_terminal

    async def go(store: Store) -> BuildResult:
        def start(on_change: Callable[[Change], None]) -> Awaitable[BuildResult]:
            return run_build(
                plan,
                store=store,
                org=org,
                pipeline=pipeline,
                options=options,
                on_change=on_change,
                handle_signals=True,
            )

        if not live:
            lines = _PlainLines(sys.stdout)
            try:
                return await start(lines)
            finally:
                lines.close()
        view = _LiveView(console, len(plan))
        with Live(view, console=console, refresh_per_second=8, transient=True):
            return await start(view)

    started = time.monotonic()
    try:
        with open_store(db) as store:
            result = anyio.run(go, store)
            _summary(console, store, result, tail_lines)
    except ExecutorError as exc:
        click.echo(f"harmont-exec: {exc}", err=True)
        sys.exit(1)
    console.print(
        f"build #{result.number} {result.state.value} in "
        f"{time.monotonic() - started:.1f}s (exit {result.exit_status})"
    )
    sys.exit(result.exit_status)


# --- reading the record ----------------------------------------------------------------------

_db_option = click.option(
    "--db", envvar="HARMONT_DB", help="Store [default: .harmont/harmont.db; env HARMONT_DB]."
)


def _build_or_exit(store: Store, number: int, org: str | None, pipeline: str | None) -> BuildRow:
    build = store.get_build(number, org=org, pipeline=pipeline)
    if build is None:
        where = f" in pipeline {pipeline!r}" if pipeline else ""
        click.echo(
            f"harmont-exec: no build #{number}{where}; `harmont-exec builds` lists them", err=True
        )
        sys.exit(EXIT_INVALID)
    return build


@cli.command()
@_db_option
@click.option("--org", help="Only this organization.")
@click.option("--pipeline", help="Only this pipeline.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
def builds(db: str | None, org: str | None, pipeline: str | None, limit: int) -> None:
    """List recorded builds, newest first."""
    try:
        with open_store(db) as store:
            rows = store.list_builds(org=org, pipeline=pipeline, limit=limit)
    except ExecutorError as exc:
        click.echo(f"harmont-exec: {exc}", err=True)
        sys.exit(1)
    table = Table()
    for column in ("pipeline", "#", "state", "created", "duration", "branch", "error"):
        table.add_column(column)
    for b in rows:
        table.add_row(
            f"{b.org}/{b.pipeline}",
            str(b.number),
            b.state.value,
            b.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _duration(b.started_at, b.finished_at),
            b.branch or "",
            b.error_code or "",
        )
    _console().print(table)


@cli.command()
@click.argument("number", type=int)
@_db_option
@click.option("--org", help="Organization of the build.")
@click.option("--pipeline", help="Pipeline of the build (needed when the number is ambiguous).")
def jobs(number: int, db: str | None, org: str | None, pipeline: str | None) -> None:
    """Show the jobs of build NUMBER in plan order."""
    try:
        with open_store(db) as store:
            build = _build_or_exit(store, number, org, pipeline)
            rows = store.list_jobs(build.id)
    except ExecutorError as exc:
        click.echo(f"harmont-exec: {exc}", err=True)
        sys.exit(1)
    table = Table(title=f"{build.org}/{build.pipeline} build #{build.number}: {build.state.value}")
    for column in ("job", "id", "state", "exit", "retries", "duration", "note"):
        table.add_column(column)
    for j in rows:
        table.add_row(
            j.step_key,
            j.id,
            j.state.value + (" (soft)" if j.soft_failed else ""),
            "" if j.exit_code is None else str(j.exit_code),
            str(j.retries_count),
            _duration(j.started_at, j.finished_at),
            j.error_message or "",
        )
    _console().print(table)


@cli.command()
@click.argument("job_id")
@_db_option
def logs(job_id: str, db: str | None) -> None:
    """Print a job's log (every attempt, stdout and stderr as recorded, bytes unchanged)."""
    try:
        with open_store(db) as store:
            job = store.get_job(job_id)
            if job is None:
                click.echo(
                    f"harmont-exec: no job {job_id!r}; `harmont-exec jobs NUMBER` lists job ids",
                    err=True,
                )
                sys.exit(EXIT_INVALID)
            out = sys.stdout.buffer
            for chunk in store.read_log(job.id):
                out.write(chunk.content)
            out.flush()
    except ExecutorError as exc:
        click.echo(f"harmont-exec: {exc}", err=True)
        sys.exit(1)


# --- serving the record ----------------------------------------------------------------------


@cli.command()
@_db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
def serve(db: str | None, host: str, port: int) -> None:
    """Serve the record over HTTP in Harmont's wire format (GET /api/v0/...; needs a token)."""
    import uvicorn  # here: only serve needs the web stack

    from executor.api import API_PREFIX, create_app

    try:
        store = open_store(db)
    except ExecutorError as exc:
        click.echo(f"harmont-exec: {exc}", err=True)
        sys.exit(1)
    click.echo(
        f"serving {store.path} on http://{host}:{port}{API_PREFIX}/ "
        "(Authorization: Bearer <token from `harmont-exec token create`>)",
        err=True,
    )
    try:
        uvicorn.run(create_app(store=store), host=host, port=port, log_level="warning")
    finally:
        store.close()


@cli.group()
def token() -> None:
    """Create, list and revoke the API tokens `serve` accepts."""


@token.command("create")
@_db_option
@click.option("--description", help="What the token is for (shown by `token list`).")
@click.option(
    "--org",
    "orgs",
    multiple=True,
    help="Limit the token to this organization (repeat for several) [default: all].",
)
@click.option(
    "--expires-in",
    "expires_in",
    type=click.FloatRange(min=0, min_open=True),
    help="Days until the token stops working [default: never].",
)
def token_create(
    db: str | None, description: str | None, orgs: tuple[str, ...], expires_in: float | None
) -> None:
    """Create a token and print it (only this once: the store keeps its SHA-256)."""
    now = datetime.now(UTC)
    expires = None if expires_in is None else now + timedelta(days=expires_in)
    try:
        with open_store(db) as store:
            row, secret = store.create_token(
                description=description,
                organizations=list(orgs) or None,
                expires_at=expires,
                now=now,
            )
    except ExecutorError as exc:
        click.echo(f"harmont-exec: {exc}", err=True)
        sys.exit(1)
    click.echo(secret)
    scope = ", ".join(row.organizations) if row.organizations else "every organization"
    until = f"until {row.expires_at:%Y-%m-%d %H:%M} UTC" if row.expires_at else "with no expiry"
    click.echo(
        f"token {row.id}: sees {scope}, {until}; it is shown only now, store it safely",
        err=True,
    )


@token.command("list")
@_db_option
def token_list(db: str | None) -> None:
    """List tokens (never their secrets)."""
    try:
        with open_store(db) as store:
            rows = store.list_tokens()
    except ExecutorError as exc:
        click.echo(f"harmont-exec: {exc}", err=True)
        sys.exit(1)
    now = datetime.now(UTC)
    table = Table()
    for column in ("id", "description", "organizations", "created", "expires", "status"):
        table.add_column(column)
    for t in rows:
        status = "revoked" if t.revoked_at else ("expired" if not t.usable_at(now) else "active")
        table.add_row(
            t.id,
            t.description or "",
            ", ".join(t.organizations) if t.organizations else "all",
            f"{t.created_at:%Y-%m-%d %H:%M}",
            f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "never",
            status,
        )
    _console().print(table)


@token.command("revoke")
@click.argument("token_id")
@_db_option
def token_revoke(token_id: str, db: str | None) -> None:
    """Revoke the token with id TOKEN_ID (from `token list`); it stops working at once."""
    try:
        with open_store(db) as store:
            row = store.revoke_token(token_id, now=datetime.now(UTC))
    except ExecutorError as exc:
        click.echo(f"harmont-exec: {exc}", err=True)
        sys.exit(1)
    if row is None:
        click.echo(
            f"harmont-exec: no token {token_id!r}; `harmont-exec token list` shows the ids",
            err=True,
        )
        sys.exit(EXIT_INVALID)
    click.echo(f"token {row.id} revoked")


def main() -> None:
    cli(prog_name="harmont-exec")
