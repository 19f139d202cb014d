"""The command group, its shared options and helpers, and the one mapping from an error to an
exit code (SPEC §4): 2 for what the user typed (an invalid build file, a store that is not
there, no such build / job / token / artifact, usage), 1 for anything else that went wrong. A
command raises; the group prints the message on stderr, without a traceback, and exits."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import click
import structlog
from rich.console import Console

from executor import __version__
from executor.errors import (
    BuildFileError,
    BuildNotFoundError,
    BuildStateError,
    ExecutorError,
    InvalidNameError,
    StoreLocationError,
    StoreNotFoundError,
)

_INVALID = (
    BuildFileError,
    BuildNotFoundError,
    BuildStateError,
    InvalidNameError,  # `run --org login`: a name that cannot be (reserved, no slug)
    StoreLocationError,
    StoreNotFoundError,
)

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def exit_code_for(exc: ExecutorError) -> int:
    """The exit code of a command that failed with ``exc``."""
    return EXIT_INVALID if isinstance(exc, _INVALID) else EXIT_FAILED


class Failed(click.ClickException):
    """A command that could not do its work, as the command line reports it: the message (a
    build file's diagnostics as they are, one per line; anything else after
    ``harmont-exec:``); exit 1."""

    exit_code = EXIT_FAILED

    def __init__(self, problem: ExecutorError | str) -> None:
        super().__init__(str(problem))
        self.prefix = "" if isinstance(problem, BuildFileError) else "harmont-exec: "

    def show(self, file: Any = None) -> None:
        click.echo(f"{self.prefix}{self.message}", err=True)


class Refused(Failed):
    """What the user asked for is not there or not allowed (no such build, a file that would
    be replaced, an invalid build file, ...): the message says what to do; exit 2, as for other
    bad arguments."""

    exit_code = EXIT_INVALID


def failure(exc: ExecutorError) -> Failed:
    """``exc`` as the command line reports it, with the exit code ``exit_code_for`` it."""
    return Refused(exc) if exit_code_for(exc) == EXIT_INVALID else Failed(exc)


class _Group(click.Group):
    """Reports an ``ExecutorError`` from any command (``failure``): no command handles its
    own."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ExecutorError as exc:
            raise failure(exc) from None


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
    "--db",
    envvar="HARMONT_DB",
    help="The store: a file path, sqlite:///PATH or postgresql://... "
    "[default: .harmont/harmont.db; env HARMONT_DB].",
)
