"""The command group, its shared options and helpers."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import NoReturn

import click
import structlog
from rich.console import Console

from executor import __version__
from executor.errors import ExecutorError, StoreNotFoundError

EXIT_INVALID = 2


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
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
    configure_logging(log_format, logging.INFO if verbose else logging.WARNING)


def fail(exc: ExecutorError) -> NoReturn:
    """Print ``exc`` for the user and exit: 2 for a store that is not there (a bad --db), as
    for other bad arguments; 1 otherwise."""
    click.echo(f"harmont-exec: {exc}", err=True)
    sys.exit(EXIT_INVALID if isinstance(exc, StoreNotFoundError) else 1)


def make_console() -> Console:
    """Rich output on stdout; piped, lines are not wrapped at 80 columns (scripts grep them)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 240)


STATE_STYLE = {
    "passed": "green",
    "failed": "red",
    "timed_out": "red",
    "skipped": "yellow",
    "canceled": "magenta",
    "canceling": "magenta",
    "timing_out": "red",
    "running": "cyan",
}


def duration_text(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return ""
    seconds = ((end or datetime.now(UTC)) - start).total_seconds()
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


db_option = click.option(
    "--db", envvar="HARMONT_DB", help="Store [default: .harmont/harmont.db; env HARMONT_DB]."
)
