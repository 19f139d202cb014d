"""Reading the record from the terminal: `builds`, `jobs`, `logs`."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from executor.cli.common import EXIT_INVALID, cli, db_option, duration_text, make_console
from executor.errors import ExecutorError
from executor.store import BuildRow, Store, open_store


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
@db_option
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
            duration_text(b.started_at, b.finished_at),
            b.branch or "",
            b.error_code or "",
        )
    make_console().print(table)


@cli.command()
@click.argument("number", type=int)
@db_option
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
            duration_text(j.started_at, j.finished_at),
            j.error_message or "",
        )
    make_console().print(table)


@cli.command()
@click.argument("job_id")
@db_option
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
