"""The ``harmont-exec`` command line: the only module that parses argv or prints.

Exit codes (SPEC §4): 0 ok, 2 invalid build file or usage. Errors print the diagnostics on
stderr without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import structlog

from executor import __version__
from executor.errors import ExecutorError
from executor.load import load_plan
from executor.render import plan_to_data, plan_to_dot, plan_to_mermaid, plan_to_text

EXIT_INVALID = 2


def _configure_logging(log_format: str) -> None:
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
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
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
def cli(log_format: str) -> None:
    """Plan and run CI builds as DAGs of shell jobs."""
    _configure_logging(log_format)


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


def main() -> None:
    cli(prog_name="harmont-exec")
