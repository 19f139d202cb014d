"""Planning benchmark: harmont-exec's planner against ``graphlib`` on the same synthetic DAGs.

For each workload (shape x size) it times, in one process and on one graph:

- ``graphlib``: ``list(TopologicalSorter(preds).static_order())``, sorter built inside the timing;
- ``plan``: ``executor.build_plan(spec)`` on an already-validated ``BuildSpec`` (in memory),
  with its ``order``, ``levels`` and ``critical_path`` computed (they are lazy properties);
- ``validate``: ``executor.BuildSpec.model_validate(build)`` alone;
- ``load+plan``: ``executor.load_plan(path)`` on the workload written as JSON, and as YAML for
  sizes up to ``YAML_MAX_STEPS`` (YAML parsing dominates beyond that).

Each figure is the median (and min) of ``--repeat`` runs; the runs of the measures are interleaved
so that machine noise hits them alike, and every plan's order is checked once before timing.
This module owns the measuring and the report; workloads come from ``benchmarks.workload``.

    python -m benchmarks.bench_plan --sizes 10000,100000 --repeat 5 --json results.json
"""

from __future__ import annotations

import argparse
import gc
import graphlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import executor
from benchmarks.workload import RENDERERS, listing_order, make_graph, predecessors, to_build

# `layered-shuffled` is `layered` with its steps listed in a seeded random order, so the planner
# cannot profit from a file whose order is already topological.
VARIANTS = ("wide", "chain", "layered", "layered-shuffled", "diamond")
YAML_MAX_STEPS = 10_000
TARGET_RATIO = 1.5  # plan / graphlib on 100k steps


@dataclass(frozen=True, slots=True)
class Timing:
    median_ms: float
    min_ms: float

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} ({self.min_ms:.1f})"


@dataclass(frozen=True, slots=True)
class Row:
    shape: str
    steps: int
    edges: int
    graphlib: Timing
    plan: Timing
    validate: Timing
    load_plan_json: Timing
    load_plan_yaml: Timing | None

    @property
    def ratio(self) -> float:
        return self.plan.median_ms / self.graphlib.median_ms


def time_interleaved(fns: Sequence[Callable[[], object]], repeat: int) -> list[Timing]:
    """Run each function ``repeat`` times, round-robin, and summarize its wall times."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, runs in zip(fns, samples, strict=True):
            gc.collect()
            start = time.perf_counter()
            result = fn()
            runs.append(time.perf_counter() - start)
            del result  # freeing the result is not part of what is measured
    return [Timing(statistics.median(s) * 1e3, min(s) * 1e3) for s in samples]


def check_order(order: Sequence[str], preds: Mapping[str, Iterable[str]]) -> None:
    """Fail unless ``order`` lists every step once, each after all of its prerequisites."""
    position = {key: i for i, key in enumerate(order)}
    if len(position) != len(order) or position.keys() != preds.keys():
        raise RuntimeError("the plan's order is not a permutation of the workload's steps")
    for key, deps in preds.items():
        for dep in deps:
            if position[dep] > position[key]:
                raise RuntimeError(f"the plan orders {key!r} before its prerequisite {dep!r}")


def _sorted_by_graphlib(preds: Mapping[str, Iterable[str]]) -> list[str]:
    return list(graphlib.TopologicalSorter(preds).static_order())


def _full_plan(spec: executor.BuildSpec) -> executor.Plan:
    plan = executor.build_plan(spec)
    _ = plan.order, plan.levels, plan.critical_path
    return plan


def measure(variant: str, steps: int, *, repeat: int, seed: int, tmp: Path) -> Row:
    shape, _, listing = variant.partition("-")
    graph = make_graph(shape, steps, seed=seed)
    order = listing_order(steps, shuffle=listing == "shuffled", seed=seed)
    build = to_build(graph, "true", order)
    preds = predecessors(build)
    spec = executor.BuildSpec.model_validate(build)
    check_order(executor.build_plan(spec).order, preds)

    formats = ("json", "yaml") if steps <= YAML_MAX_STEPS else ("json",)
    loads: list[Callable[[], object]] = []
    for fmt in formats:
        path = tmp / f"{variant}-{steps}.{fmt}"
        path.write_text(RENDERERS[fmt](graph, "true", order), encoding="utf-8")
        check_order(executor.load_plan(path).order, preds)
        loads.append(partial(executor.load_plan, path))

    timings = time_interleaved(
        [
            partial(_sorted_by_graphlib, preds),
            partial(_full_plan, spec),
            partial(executor.BuildSpec.model_validate, build),
            *loads,
        ],
        repeat,
    )
    return Row(
        shape=variant,
        steps=steps,
        edges=graph.edge_count,
        graphlib=timings[0],
        plan=timings[1],
        validate=timings[2],
        load_plan_json=timings[3],
        load_plan_yaml=timings[4] if len(timings) > 4 else None,
    )


_COLUMNS = (
    ("shape", 16),
    ("steps", 7),
    ("edges", 7),
    ("graphlib ms", 17),
    ("plan ms", 17),
    ("plan/graphlib", 13),
    ("validate ms", 17),
    ("load+plan(json) ms", 19),
    ("load+plan(yaml) ms", 19),
)


def _format_line(cells: Sequence[object]) -> str:
    return "  ".join(
        f"{cell!s:<{width}}" if i == 0 else f"{cell!s:>{width}}"
        for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS, strict=True))
    ).rstrip()


def format_row(row: Row) -> str:
    return _format_line(
        [
            row.shape,
            row.steps,
            row.edges,
            row.graphlib,
            row.plan,
            f"{row.ratio:.2f}x",
            row.validate,
            row.load_plan_json,
            row.load_plan_yaml or "-",
        ]
    )


def _parse_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 10000,100000: {text!r}")
    return sizes


def _parse_variants(text: str) -> list[str]:
    variants = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise argparse.ArgumentTypeError(f"unknown shape(s) {unknown}; choose from {VARIANTS}")
    return variants


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_plan", description="Time planning against graphlib."
    )
    parser.add_argument("--sizes", type=_parse_sizes, default=[10_000, 100_000])
    parser.add_argument(
        "--shapes", type=_parse_variants, default=list(VARIANTS), help=", ".join(VARIANTS)
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"times in ms: median (min) of {args.repeat} runs")
    print(_format_line([name for name, _ in _COLUMNS]))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="harmont-bench-") as tmp:
        for steps in args.sizes:
            for variant in args.shapes:
                row = measure(variant, steps, repeat=args.repeat, seed=args.seed, tmp=Path(tmp))
                rows.append(row)
                print(format_row(row), flush=True)
    print(f"target: plan/graphlib <= {TARGET_RATIO}x at 100000 steps (ratio of medians)")

    if args.json:
        report = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "repeat": args.repeat,
            "seed": args.seed,
            "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
