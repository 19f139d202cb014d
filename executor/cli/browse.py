"""Reading the record from the terminal: `builds`, `jobs`, `logs` (and `logs --follow`)."""

from __future__ import annotations

import sys
import time

import click
from rich.table import Table

from executor.cli.common import (
    EXIT_INTERRUPTED,
    Refused,
    cli,
    db_option,
    duration_text,
    make_console,
)
from executor.store import BuildRow, Store, open_store
from executor.store.reads import JOB_ID_PREFIX_MIN


def build_or_exit(store: Store, number: int, org: str | None, pipeline: str | None) -> BuildRow:
    build = store.get_build(number, org=org, pipeline=pipeline)
    if build is None:
        where = f" in pipeline {pipeline!r}" if pipeline else ""
        raise Refused(f"no build #{number}{where}; `harmont-exec builds` lists them")
    return build


@cli.command()
@db_option
@click.option("--org", help="Only this organization.")
@click.option("--pipeline", help="Only this pipeline.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
def builds(db: str | None, org: str | None, pipeline: str | None, limit: int) -> None:
    """List recorded builds, newest first."""
    with open_store(db, must_exist=True) as store:
        rows = store.list_builds(org=org, pipeline=pipeline, limit=limit)
    table = Table()
    for column in ("pipeline", "#", "state", "created", "duration", "branch", "error"):
        table.add_column(column)
    for b in rows:
        table.add_row(
            f"{b.org}/{b.pipeline}",
            str(b.number),
            b.state.value,
            b.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            duration_text(b.started_at, b.finished_at),
            b.branch or "",
            b.error_code or "",
        )
    make_console().print(table)


def _reused_from(store: Store, job_id: str | None) -> str:
    """The note of a job whose result `retry --failed` took from another build's job."""
    if job_id is None:
        return ""
    original = store.get_job(job_id)
    build = None if original is None else store.get_build_by_id(original.build_id)
    return f"reused from build #{build.number}" if build is not None else "reused"


@cli.command()
@click.argument("number", type=int)
@db_option
@click.option("--org", help="Organization of the build.")
@click.option("--pipeline", help="Pipeline of the build (needed when the number is ambiguous).")
def jobs(number: int, db: str | None, org: str | None, pipeline: str | None) -> None:
    """Show the jobs of build NUMBER in plan order."""
    with open_store(db, must_exist=True) as store:
        build = build_or_exit(store, number, org, pipeline)
        rows = store.list_jobs(build.id)
        notes = {j.id: _reused_from(store, j.reused_from_job_id) for j in rows}
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
            duration_text(j.started_at, j.finished_at),
            (f"{j.error_code}: " if j.error_code else "") + (j.error_message or notes[j.id]),
        )
    make_console().print(table)


FOLLOW_POLL_S = 0.1
"""How often ``logs --follow`` reads the store (the writer commits at most every 50 ms)."""


@cli.command()
@click.argument("job_id")
@db_option
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep printing the job's output as it is recorded, until the job ends.",
)
def logs(job_id: str, db: str | None, follow: bool) -> None:
    """Print a job's log (every attempt, stdout and stderr as recorded, bytes unchanged).

    JOB_ID is a job's id, or a prefix of at least 8 characters (`harmont-exec jobs NUMBER`
    lists them). With --follow, waits for new output until the job is finished (Ctrl-C stops
    following; the job goes on)."""
    out = sys.stdout.buffer
    try:
        with open_store(db, must_exist=True) as store:
            job = store.get_job(job_id)
            if job is None:
                short = (
                    f" (a prefix needs at least {JOB_ID_PREFIX_MIN} characters)"
                    if len(job_id) < JOB_ID_PREFIX_MIN
                    else ""
                )
                raise Refused(
                    f"no job {job_id!r}{short}; `harmont-exec jobs NUMBER` lists job ids",
                )
            if job.reused_from_job_id is not None:
                click.echo(
                    f"harmont-exec: job {job.id} did not run: it reused the result of job "
                    f"{job.reused_from_job_id}; `harmont-exec logs {job.reused_from_job_id}` "
                    "shows that log",
                    err=True,
                )
            after = 0
            while True:
                # The state first, then the output: a job seen finished has all its output in.
                now = store.get_job(job.id) if follow else None
                for chunk in store.read_log(job.id, after_seq=after):
                    out.write(chunk.content)
                    after = chunk.seq
                out.flush()
                if now is None or now.state.is_terminal:
                    break
                time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `logs ... | head`: the reader is gone, so are we
        sys.stderr.close()
        sys.exit(0)
