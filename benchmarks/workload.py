"""Synthetic DAG workloads for the benchmarks, and their build-file serializations.

This module owns two separate things, kept apart so that every output format describes exactly
the same workload:

- the graph: ``make_graph`` returns a ``Graph`` (keys plus prerequisite indices, listed in a
  topological order), deterministic for a given shape, size, seed and width;
- its serializations: ``to_build`` (the harmont-exec build-file mapping), ``to_ninja`` (a
  build.ninja), ``to_makefile`` (a GNU Makefile), and the ``RENDERERS`` that turn a graph into
  file text. In every format a step runs its command and nothing else; ``{key}`` in the command
  is replaced by the step's key, so that each step can be told apart (``echo {key} >> log``).

It does not import ``executor``: a workload must be producible without the code it measures.

    python -m benchmarks.workload --shape layered --steps 10000 --format yaml -o layered.yaml
    python -m benchmarks.workload --shape wide --steps 10000 --format ninja -o build.ninja
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = [
    "RENDERERS",
    "SHAPES",
    "Graph",
    "generate",
    "listing_order",
    "main",
    "make_graph",
    "predecessors",
    "step_command",
    "to_build",
    "to_makefile",
    "to_ninja",
]

SHAPES = ("wide", "chain", "layered", "diamond")
MAX_FAN_IN = 3  # a `layered` step depends on 1..MAX_FAN_IN steps of the previous layer
KEY_PLACEHOLDER = "{key}"  # replaced by the step's key in a command, in every format


@dataclass(frozen=True, slots=True)
class Graph:
    """A DAG listed in a topological order: every index in ``deps[i]`` is smaller than ``i``."""

    keys: tuple[str, ...]
    deps: tuple[tuple[int, ...], ...]

    @property
    def edge_count(self) -> int:
        return sum(len(d) for d in self.deps)


# -- graph generation ------------------------------------------------------------------------


def _wide(n: int, width: int, rng: random.Random) -> list[tuple[int, ...]]:
    return [() for _ in range(n)]


def _chain(n: int, width: int, rng: random.Random) -> list[tuple[int, ...]]:
    return [()] + [(i - 1,) for i in range(1, n)]


def _layered(n: int, width: int, rng: random.Random) -> list[tuple[int, ...]]:
    deps: list[tuple[int, ...]] = [() for _ in range(min(n, width))]
    for i in range(width, n):
        start = (i // width - 1) * width  # first index of the previous (always full) layer
        picked = rng.sample(range(start, start + width), rng.randint(1, min(MAX_FAN_IN, width)))
        deps.append(tuple(sorted(picked)))
    return deps


def _diamond(n: int, width: int, rng: random.Random) -> list[tuple[int, ...]]:
    # root, then repeated [width parallel steps on the last join, one join on all of them];
    # the last block is narrowed so that the graph still ends on a join.
    deps: list[tuple[int, ...]] = [()]
    join = 0
    while len(deps) < n:
        fan = min(width, n - len(deps) - 1)
        if fan == 0:  # one step left: a lone join
            fan_ids: tuple[int, ...] = (join,)
        else:
            first = len(deps)
            deps.extend((join,) for _ in range(fan))
            fan_ids = tuple(range(first, first + fan))
        join = len(deps)
        deps.append(fan_ids)
    return deps


_SHAPE_BUILDERS: dict[str, Callable[[int, int, random.Random], list[tuple[int, ...]]]] = {
    "wide": _wide,
    "chain": _chain,
    "layered": _layered,
    "diamond": _diamond,
}


def make_graph(shape: str, steps: int, *, seed: int = 0, width: int | None = None) -> Graph:
    """Generate the ``shape`` DAG with ``steps`` nodes.

    ``width`` is the layer width of ``layered`` and the fan-out of ``diamond`` (default: the
    integer square root of ``steps``); the other shapes ignore it.
    """
    if shape not in _SHAPE_BUILDERS:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if width is not None and width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    deps = _SHAPE_BUILDERS[shape](steps, width or max(1, math.isqrt(steps)), random.Random(seed))
    pad = max(5, len(str(steps)))
    keys = tuple(f"s{i:0{pad}d}" for i in range(1, steps + 1))
    return Graph(keys=keys, deps=tuple(deps))


# -- serialization ---------------------------------------------------------------------------


def listing_order(step_count: int, *, shuffle: bool = False, seed: int = 0) -> list[int]:
    """The order steps are written in: topological, or a seeded shuffle of it."""
    order = list(range(step_count))
    if shuffle:
        # A generator of its own, so a shuffled workload has exactly the unshuffled graph.
        random.Random(f"shuffle:{seed}").shuffle(order)
    return order


def step_command(command: str, key: str) -> str:
    """The command of step ``key``: ``command`` with each ``{key}`` replaced by the key.

    A plain replacement, not ``str.format``: other braces (``${VAR}``, awk programs) are left
    alone.
    """
    return command.replace(KEY_PLACEHOLDER, key)


def to_build(graph: Graph, command: str, order: Sequence[int]) -> dict[str, object]:
    """The harmont-exec build-file mapping; steps without prerequisites omit ``depends_on``."""
    keys = graph.keys
    steps: list[dict[str, object]] = []
    for i in order:
        step: dict[str, object] = {"key": keys[i], "command": step_command(command, keys[i])}
        if graph.deps[i]:
            step["depends_on"] = [keys[d] for d in graph.deps[i]]
        steps.append(step)
    return {"version": "0", "steps": steps}


def render_json(graph: Graph, command: str, order: Sequence[int]) -> str:
    return json.dumps(to_build(graph, command, order)) + "\n"


def render_yaml(graph: Graph, command: str, order: Sequence[int]) -> str:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text: str = yaml.dump(to_build(graph, command, order), Dumper=dumper, sort_keys=False)
    return text


# Ninja and make take keys as file names / targets; rather than escape every character that
# either tool treats specially, only keys like the generated ones (s00001) are accepted.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.+-]+")


def _check_for_tools(graph: Graph, command: str, tool: str) -> None:
    for key in graph.keys:
        if not _PLAIN_KEY.fullmatch(key):
            raise ValueError(f"step key {key!r} cannot be a {tool} target; use [A-Za-z0-9_.+-]")
    if "\n" in command or "\r" in command:
        # Neither tool has a faithful multi-line command; a recipe line per line would differ.
        raise ValueError(f"{tool} commands must be one line, got {command!r}")


def _topological(graph: Graph, order: Sequence[int] | None) -> Sequence[int]:
    return range(len(graph.keys)) if order is None else order


def to_ninja(graph: Graph, command: str, order: Sequence[int] | None = None) -> str:
    """A build.ninja in which building ``all`` runs every step's command exactly once.

    Each step is one edge ``build KEY: run || PREREQUISITES``: the output ``KEY`` is never
    created, so ninja considers every edge dirty and runs all of them on every invocation, with
    nothing added to the command (no ``touch`` of a stamp file). Prerequisites are order-only
    inputs (``||``): ninja only needs them built first, and a missing order-only input produced
    by an edge is not an error. ``all`` is a phony edge (it runs no command) on every step, and
    the default target. ``order`` is the order the edges are written in (default: topological).
    """
    _check_for_tools(graph, command, "ninja")
    keys = graph.keys
    per_step = KEY_PLACEHOLDER in command
    lines = [
        "# Generated by benchmarks.workload: every output is missing, so every edge always runs.",
        "ninja_required_version = 1.3",
        "",
        "rule run",
        f"  command = {'$cmd' if per_step else _ninja_escape(command)}",
        "",
    ]
    for i in _topological(graph, order):
        deps = " ".join(keys[d] for d in graph.deps[i])
        lines.append(f"build {keys[i]}: run || {deps}" if deps else f"build {keys[i]}: run")
        if per_step:
            lines.append(f"  cmd = {_ninja_escape(step_command(command, keys[i]))}")
    lines += ["", f"build all: phony {' '.join(keys)}", "default all", ""]
    return "\n".join(lines)


def _ninja_escape(value: str) -> str:
    # In a ninja variable value only `$` is special (a leading space would be stripped).
    escaped = value.replace("$", "$$")
    return "$ " + escaped[1:] if escaped.startswith(" ") else escaped


def to_makefile(graph: Graph, command: str, order: Sequence[int] | None = None) -> str:
    """A GNU Makefile in which ``make all`` runs every step's command exactly once.

    Every step is a ``.PHONY`` target whose prerequisites are its dependencies and whose recipe
    is its command (``$`` doubled, so make passes it through unchanged); ``all`` depends on
    every step, listed in ``order`` (default: topological). ``.SUFFIXES:`` with no suffixes
    turns off the old-fashioned suffix rules, as ``make -r`` does.
    """
    _check_for_tools(graph, command, "make")
    keys = graph.keys
    listed = _topological(graph, order)
    lines = [
        "# Generated by benchmarks.workload: every step is a phony target, so every step runs.",
        ".SUFFIXES:",
        f".PHONY: all {' '.join(keys[i] for i in listed)}",
        f"all: {' '.join(keys[i] for i in listed)}",
        "",
    ]
    for i in listed:
        deps = " ".join(keys[d] for d in graph.deps[i])
        lines.append(f"{keys[i]}: {deps}" if deps else f"{keys[i]}:")
        lines.append("\t" + step_command(command, keys[i]).replace("$", "$$"))
    lines.append("")
    return "\n".join(lines)


Renderer = Callable[[Graph, str, Sequence[int]], str]
RENDERERS: dict[str, Renderer] = {
    "json": render_json,
    "yaml": render_yaml,
    "ninja": to_ninja,
    "make": to_makefile,
}


def generate(
    shape: str,
    steps: int,
    *,
    command: str = "true",
    seed: int = 0,
    shuffle: bool = False,
    width: int | None = None,
) -> dict[str, object]:
    """A build-file mapping for the ``shape`` workload (see ``make_graph`` and ``to_build``)."""
    graph = make_graph(shape, steps, seed=seed, width=width)
    return to_build(graph, command, listing_order(steps, shuffle=shuffle, seed=seed))


def predecessors(build: Mapping[str, object]) -> dict[str, list[str]]:
    """Map each step key of a build mapping to its prerequisite keys (graphlib's input)."""
    steps = build.get("steps")
    if not isinstance(steps, list):
        raise ValueError("the build mapping has no 'steps' list")
    preds: dict[str, list[str]] = {}
    for step in steps:
        if not isinstance(step, dict):
            raise ValueError(f"only command steps (mappings) are supported, got {step!r}")
        deps = step.get("depends_on", [])
        preds[step["key"]] = [deps] if isinstance(deps, str) else list(deps)
    return preds


# -- command line ----------------------------------------------------------------------------


def _format_from_name(path: Path) -> str:
    if path.suffix in {".yaml", ".yml"}:
        return "yaml"
    if path.suffix == ".ninja":
        return "ninja"
    if path.suffix == ".mk" or path.name in {"Makefile", "makefile", "GNUmakefile"}:
        return "make"
    return "json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.workload", description="Write a synthetic build file."
    )
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--width", type=int, help="layer width / fan-out (default: sqrt(steps))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--command",
        default="true",
        help="every step's command, {key} replaced by the step's key (default: true)",
    )
    parser.add_argument("--shuffle", action="store_true", help="list steps in a seeded order")
    parser.add_argument(
        "--format", choices=sorted(RENDERERS), help="default: from -o's file name, else json"
    )
    parser.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)

    fmt: str = args.format or _format_from_name(Path(args.output))
    try:
        graph = make_graph(args.shape, args.steps, seed=args.seed, width=args.width)
    except ValueError as exc:
        parser.error(str(exc))
    order = listing_order(args.steps, shuffle=args.shuffle, seed=args.seed)
    try:
        text = RENDERERS[fmt](graph, args.command, order)
    except ValueError as exc:
        parser.error(str(exc))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
