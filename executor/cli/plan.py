"""`harmont-exec plan`: validate a build file and show its jobs in order, or draw them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from executor.cli.common import cli
from executor.load import load_plan
from executor.render import plan_to_data, plan_to_dot, plan_to_mermaid, plan_to_text


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
    result = load_plan(file)  # an invalid file: the group prints its diagnostics, exit 2
    if fmt == "json":
        click.echo(json.dumps(plan_to_data(result), indent=2, ensure_ascii=False))
    elif fmt == "dot":
        click.echo(plan_to_dot(result), nl=False)
    elif fmt == "mermaid":
        click.echo(plan_to_mermaid(result), nl=False)
    else:
        click.echo(plan_to_text(result, name=str(file)), nl=False)
