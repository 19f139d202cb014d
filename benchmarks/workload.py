"""Synthetic DAG workloads for the benchmarks, and their build-file serializations.

This module owns two separate things, kept apart so that more output formats (Ninja, Makefile)
can be added for the same workloads without touching graph generation:

- the graph: ``make_graph`` returns a ``Graph`` (keys plus prerequisite indices, listed in a
  topological order), deterministic for a given shape, size, seed and width;
- its serializations: ``to_build`` (the harmont-exec build-file mapping) and the ``RENDERERS``
  that turn a graph into file text.

It does not import ``executor``: a workload must be producible without the code it measures.

    python -m benchmarks.workload --shape layered --steps 10000 --format yaml -o layered.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import random
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
    "to_build",
]

SHAPES = ("wide", "chain", "layered", "diamond")
MAX_FAN_IN = 3  # a `layered` step depends on 1..MAX_FAN_IN steps of the previous layer


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


def to_build(graph: Graph, command: str, order: Sequence[int]) -> dict[str, object]:
    """The harmont-exec build-file mapping; steps without prerequisites omit ``depends_on``."""
    keys = graph.keys
    steps: list[dict[str, object]] = []
    for i in order:
        step: dict[str, object] = {"key": keys[i], "command": command}
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


Renderer = Callable[[Graph, str, Sequence[int]], str]
RENDERERS: dict[str, Renderer] = {"json": render_json, "yaml": render_yaml}


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.workload", description="Write a synthetic build file."
    )
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--width", type=int, help="layer width / fan-out (default: sqrt(steps))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--command", default="true", help="every step's command (default: true)")
    parser.add_argument("--shuffle", action="store_true", help="list steps in a seeded order")
    parser.add_argument(
        "--format", choices=sorted(RENDERERS), help="default: from -o's suffix, else json"
    )
    parser.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)

    fmt: str = args.format or ("yaml" if Path(args.output).suffix in {".yaml", ".yml"} else "json")
    try:
        graph = make_graph(args.shape, args.steps, seed=args.seed, width=args.width)
    except ValueError as exc:
        parser.error(str(exc))
    order = listing_order(args.steps, shuffle=args.shuffle, seed=args.seed)
    text = RENDERERS[fmt](graph, args.command, order)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
