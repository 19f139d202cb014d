"""Execution benchmark: the same synthetic builds run by harmont-exec, ninja and GNU make.

For each workload (shape x size) the graph from ``benchmarks.workload`` is written three ways
into one temporary directory (``build.ninja``, ``Makefile``, ``build.json``) and each tool runs
all of it, at the same ``-j``, as a subprocess timed with ``time.perf_counter``:

- ``ninja -C DIR -j N``, a fresh build every time (``.ninja_log`` / ``.ninja_deps`` deleted);
- ``make -C DIR -r -s -j N -f Makefile all`` with ``MAKEFLAGS`` and friends cleared;
- ``python -m executor run build.json --db DIR/bench.db -j N`` (recording on, a new database
  every time), run with ``sys.executable`` so that PATH does not matter.

The runs of the tools are interleaved within each repeat, so that machine noise hits them
alike; each figure is the median (and min) of ``--repeat`` wall times, and jobs/s is steps over
the median. Every run is checked: exit code 0 for all; for ninja also one ``.ninja_log`` entry
per step; before timing, ``ninja -t commands`` and ``make -n`` must list one command per step.
A tool that is missing, or a harmont-exec without ``run``, is reported and skipped; the others
still run. This module owns the running, the checks and the report; it does not import
``executor`` (a broken build of it must not stop ninja's and make's figures).

    python -m benchmarks.bench_run --sizes 1000,10000 --jobs 2 --repeat 3 --json run.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.workload import (
    SHAPES,
    Graph,
    listing_order,
    make_graph,
    render_json,
    to_makefile,
    to_ninja,
)

TOOLS = ("ninja", "make", "harmont", "harmont-normal")
DEFAULT_TOOLS = ("ninja", "make", "harmont")
TARGET_RATIO = 0.5  # harmont-exec / ninja throughput, 10k trivial wide jobs, equal -j
TARGET_STEPS = 10_000
LOG_TAIL_LINES = 5
# Make reads these from the environment (a parent make, the user's shell): cleared so that
# every make run gets exactly the flags on its command line.
MAKE_ENV_VARS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GNUMAKEFLAGS")


class ToolFailed(Exception):
    """A tool ran but did not run every job: its figures for this workload are void."""


class ToolUnavailable(Exception):
    """A tool cannot run at all in this environment: skipped for every workload."""


@dataclass(frozen=True, slots=True)
class Timing:
    median_s: float
    min_s: float

    def __str__(self) -> str:
        return f"{self.median_s:.3f} ({self.min_s:.3f})"


@dataclass(slots=True)
class Row:
    shape: str
    steps: int
    edges: int
    timings: dict[str, Timing] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # tool -> why it has no figure

    def jobs_per_s(self, tool: str) -> float | None:
        timing = self.timings.get(tool)
        return self.steps / timing.median_s if timing else None

    def ratio_to_ninja(self, tool: str) -> float | None:
        """``tool``'s throughput over ninja's (ratio of the medians); None if either is missing."""
        own, ninja = self.timings.get(tool), self.timings.get("ninja")
        return ninja.median_s / own.median_s if own and ninja else None


@dataclass(frozen=True, slots=True)
class RunResult:
    elapsed_s: float
    returncode: int
    log: Path


# -- running one command ---------------------------------------------------------------------


def run_timed(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path, timeout_s: float
) -> RunResult:
    """Run ``argv`` to completion, stdout and stderr into ``log``, and time it.

    The command runs in its own session, so that a timeout kills it with all of its jobs. The
    wait is a plain blocking ``wait()``, with the timeout on a timer thread: ``wait(timeout=)``
    polls with sleeps of up to 50 ms, which would round every figure up by as much.
    """
    timed_out = threading.Event()

    def kill_group(proc: subprocess.Popen[bytes]) -> None:
        if proc.returncode is None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        timer = threading.Timer(timeout_s, kill_group, args=(proc,))
        timer.start()
        try:
            returncode = proc.wait()
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - start
    if timed_out.is_set():
        raise ToolFailed(f"still running after {timeout_s:g} s; killed")
    return RunResult(elapsed, returncode, log)


def _tail(path: Path) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(lines[-LOG_TAIL_LINES:]) or "(no output)"


def _count_lines(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str]) -> int:
    done = subprocess.run(argv, cwd=cwd, env=dict(env), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ToolFailed(f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
    return len(done.stdout.splitlines())


# -- the tools -------------------------------------------------------------------------------


class Tool:
    """One build tool: how to write the workload for it, run it fresh, and check the run."""

    name: str
    label: str

    def unavailable(self) -> str | None:
        """Why this tool cannot run here, or None."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def write(self, workdir: Path, graph: Graph, command: str, order: Sequence[int]) -> None:
        raise NotImplementedError

    def check_graph(self, workdir: Path, steps: int) -> None:
        """Before timing: fail unless the tool sees one command per step."""

    def reset(self, workdir: Path) -> None:
        """Remove whatever a previous run left, so that the next run is a fresh build."""

    def argv(self, workdir: Path, jobs: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def check_run(self, workdir: Path, steps: int, result: RunResult) -> None:
        if result.returncode != 0:
            raise ToolFailed(f"exit code {result.returncode}: {_tail(result.log)}")


class Ninja(Tool):
    name = "ninja"
    label = "ninja"

    def unavailable(self) -> str | None:
        return None if shutil.which("ninja") else "ninja is not on PATH (--install installs it)"

    def version(self) -> str:
        out = subprocess.run(["ninja", "--version"], capture_output=True, text=True, check=False)
        return f"ninja {out.stdout.strip()}"

    def write(self, workdir: Path, graph: Graph, command: str, order: Sequence[int]) -> None:
        (workdir / "build.ninja").write_text(to_ninja(graph, command, order), encoding="utf-8")

    def check_graph(self, workdir: Path, steps: int) -> None:
        argv = ["ninja", "-C", str(workdir), "-t", "commands", "all"]
        listed = _count_lines(argv, cwd=workdir, env=self.env())
        if listed != steps:
            raise ToolFailed(f"ninja -t commands lists {listed} commands for {steps} steps")

    def reset(self, workdir: Path) -> None:
        # The outputs are never created (see workload.to_ninja); only ninja's own state goes.
        for name in (".ninja_log", ".ninja_deps"):
            (workdir / name).unlink(missing_ok=True)

    def argv(self, workdir: Path, jobs: int) -> list[str]:
        return ["ninja", "-C", str(workdir), "-j", str(jobs)]

    def check_run(self, workdir: Path, steps: int, result: RunResult) -> None:
        super().check_run(workdir, steps, result)
        # ninja logs every command it ran (one output per edge here); the log was deleted
        # before the run, so it holds exactly this run's commands.
        lines = (workdir / ".ninja_log").read_text(encoding="utf-8").splitlines()
        ran = sum(1 for line in lines if line and not line.startswith("#"))
        if ran != steps:
            raise ToolFailed(f"ninja ran {ran} commands for {steps} steps")


class Make(Tool):
    name = "make"
    label = "make"

    def unavailable(self) -> str | None:
        return None if shutil.which("make") else "make is not on PATH (--install installs it)"

    def version(self) -> str:
        out = subprocess.run(["make", "--version"], capture_output=True, text=True, check=False)
        return out.stdout.splitlines()[0] if out.stdout else "unknown"

    def write(self, workdir: Path, graph: Graph, command: str, order: Sequence[int]) -> None:
        (workdir / "Makefile").write_text(to_makefile(graph, command, order), encoding="utf-8")

    def check_graph(self, workdir: Path, steps: int) -> None:
        argv = ["make", "-C", str(workdir), "-r", "-s", "-n", "-f", "Makefile", "all"]
        listed = _count_lines(argv, cwd=workdir, env=self.env())
        if listed != steps:
            raise ToolFailed(f"make -n lists {listed} commands for {steps} steps")

    def argv(self, workdir: Path, jobs: int) -> list[str]:
        return ["make", "-C", str(workdir), "-r", "-s", "-j", str(jobs), "-f", "Makefile", "all"]

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in MAKE_ENV_VARS}


class Harmont(Tool):
    name = "harmont"
    label = "harmont-exec"
    _base = (sys.executable, "-m", "executor")

    def unavailable(self) -> str | None:
        probe = subprocess.run(
            [*self._base, "run", "--help"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return None
        output = (probe.stdout + probe.stderr).strip()
        if "No such command" in output:
            return "harmont-exec run not available"
        last = output.splitlines()[-1] if output else f"exit code {probe.returncode}"
        return f"harmont-exec does not start: {last}"

    def version(self) -> str:
        out = subprocess.run(
            [*self._base, "--version"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or "unknown"

    def write(self, workdir: Path, graph: Graph, command: str, order: Sequence[int]) -> None:
        (workdir / "build.json").write_text(render_json(graph, command, order), encoding="utf-8")

    def reset(self, workdir: Path) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            (workdir / f"bench.db{suffix}").unlink(missing_ok=True)

    def argv(self, workdir: Path, jobs: int) -> list[str]:
        db = str(workdir / "bench.db")
        return [*self._base, "run", str(workdir / "build.json"), "--db", db, "-j", str(jobs)]

    def startup_s(self, runs: int = 3) -> float:
        """Median wall time of ``python -m executor --version``: the fixed cost of every run."""
        times: list[float] = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([*self._base, "--version"], capture_output=True, check=False)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def check_run(self, workdir: Path, steps: int, result: RunResult) -> None:
        if result.returncode != 0 and "No such command" in result.log.read_text(
            encoding="utf-8", errors="replace"
        ):
            raise ToolUnavailable("harmont-exec run not available")
        super().check_run(workdir, steps, result)


class HarmontNormal(Harmont):
    """harmont-exec with SQLite's ``synchronous=NORMAL`` instead of its ``FULL`` (set in the
    benchmark's own process, not a setting of harmont-exec): what durability costs."""

    name = "harmont-normal"
    label = "harmont-exec, synchronous=NORMAL"
    _base = (
        sys.executable,
        "-c",
        "import executor.store.sqlite as s; s.SYNCHRONOUS = 'NORMAL'; "
        "from executor.cli import main; main()",
    )


# -- measuring -------------------------------------------------------------------------------


def measure(
    shape: str,
    steps: int,
    tools: Sequence[Tool],
    unavailable: dict[str, str],
    *,
    jobs: int,
    repeat: int,
    command: str,
    seed: int,
    timeout_s: float,
    tmp: Path,
) -> Row:
    """Time every available tool on one workload; ``unavailable`` grows if one turns out so."""
    graph = make_graph(shape, steps, seed=seed)
    order = listing_order(steps, seed=seed)
    row = Row(shape=shape, steps=steps, edges=graph.edge_count)
    workdir = tmp / f"{shape}-{steps}"
    workdir.mkdir()

    active: list[Tool] = []
    for tool in tools:
        if tool.name in unavailable:
            row.errors[tool.name] = unavailable[tool.name]
            continue
        tool.write(workdir, graph, command, order)
        try:
            tool.check_graph(workdir, steps)
        except ToolFailed as exc:
            row.errors[tool.name] = str(exc)
            continue
        active.append(tool)

    samples: dict[str, list[float]] = {tool.name: [] for tool in active}
    for _ in range(repeat):
        for tool in list(active):
            tool.reset(workdir)
            try:
                result = run_timed(
                    tool.argv(workdir, jobs),
                    cwd=workdir,
                    env=tool.env(),
                    log=workdir / f"{tool.name}.log",
                    timeout_s=timeout_s,
                )
                tool.check_run(workdir, steps, result)
            except ToolUnavailable as exc:
                unavailable[tool.name] = row.errors[tool.name] = str(exc)
                active.remove(tool)
            except ToolFailed as exc:
                row.errors[tool.name] = str(exc)
                active.remove(tool)
            else:
                samples[tool.name].append(result.elapsed_s)
    for tool in active:
        runs = samples[tool.name]
        row.timings[tool.name] = Timing(statistics.median(runs), min(runs))
    return row


# -- report ----------------------------------------------------------------------------------

_COLUMNS = (
    ("shape", 8),
    ("steps", 6),
    ("edges", 6),
    ("ninja s", 16),
    ("ninja jobs/s", 12),
    ("make s", 16),
    ("make jobs/s", 11),
    ("harmont-exec s", 16),
    ("harmont jobs/s", 14),
    ("harmont/ninja", 13),
    ("make/ninja", 10),
)


def _format_line(cells: Sequence[object]) -> str:
    return "  ".join(
        f"{cell!s:<{width}}" if i == 0 else f"{cell!s:>{width}}"
        for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS, strict=True))
    ).rstrip()


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_row(row: Row) -> str:
    cells: list[object] = [row.shape, row.steps, row.edges]
    for tool in DEFAULT_TOOLS:
        cells += [row.timings.get(tool, "-"), _rate(row.jobs_per_s(tool))]
    cells += [_ratio(row.ratio_to_ninja("harmont")), _ratio(row.ratio_to_ninja("make"))]
    line = _format_line(cells)
    normal, full = row.timings.get("harmont-normal"), row.timings.get("harmont")
    if normal is not None:
        line += (
            f"\n  synchronous=NORMAL: {normal} s, {_rate(row.jobs_per_s('harmont-normal'))} "
            f"jobs/s, {_ratio(row.ratio_to_ninja('harmont-normal'))} ninja"
        )
        if full is not None:
            line += f"; FULL takes {full.median_s / normal.median_s:.3f}x NORMAL's time"
    return line


def target_line(rows: Sequence[Row], command: str) -> str:
    goal = (
        f"target: on {TARGET_STEPS // 1000}k trivial wide jobs, harmont-exec throughput "
        f">= {TARGET_RATIO}x ninja's at equal -j"
    )
    row = next((r for r in rows if r.shape == "wide" and r.steps == TARGET_STEPS), None)
    if row is None:
        return f"{goal}: not measured (add wide to --shapes and {TARGET_STEPS} to --sizes)"
    ratio = row.ratio_to_ninja("harmont")
    if ratio is None:
        why = row.errors.get("harmont") or row.errors.get("ninja") or "left out by --tools"
        return f"{goal}: not measured ({why})"
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    note = "" if command == "true" else f"; measured with --command {command!r}, not `true`"
    return f"{goal}: {ratio:.2f}x, {verdict}{note}"


# -- installing and command line -------------------------------------------------------------


def install_tools() -> None:
    """``apt-get install -y ninja-build make``, through ``sudo -n`` when not root."""
    argv = ["apt-get", "install", "-y", "ninja-build", "make"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        argv = ["sudo", "-n", *argv]
    if not shutil.which("apt-get"):
        print("--install: apt-get is not available; install ninja and make yourself")
        return
    print(f"installing: {' '.join(argv)}", flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-LOG_TAIL_LINES:])
        print(f"--install failed (exit code {done.returncode}): {tail}")


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1000,10000: {text!r}")
    return sizes


def _parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        picked = [part.strip() for part in text.split(",") if part.strip()]
        unknown = sorted(set(picked) - set(choices))
        if unknown or not picked:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
        return picked

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_run",
        description="Run the same workloads with ninja, make and harmont-exec; compare jobs/s.",
    )
    parser.add_argument("--sizes", type=_parse_sizes, default=[1_000, 10_000])
    parser.add_argument(
        "--shapes", type=_parse_list(SHAPES), default=list(SHAPES), help=", ".join(SHAPES)
    )
    parser.add_argument(
        "--tools",
        type=_parse_list(TOOLS),
        default=list(DEFAULT_TOOLS),
        help=", ".join(TOOLS) + " (harmont-normal: with SQLite synchronous=NORMAL)",
    )
    parser.add_argument("-j", "--jobs", type=int, default=2, help="parallel jobs, every tool")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool and workload")
    parser.add_argument("--command", default="true", help="every step's command ({key} = key)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--install", action="store_true", help="apt-get missing ninja/make")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.jobs < 1:
        parser.error("--repeat and --jobs must be at least 1")

    all_tools: list[Tool] = [Ninja(), Make(), Harmont(), HarmontNormal()]
    tools = [tool for tool in all_tools if tool.name in args.tools]
    if args.install and any(t.unavailable() for t in tools if t.name in {"ninja", "make"}):
        install_tools()
    unavailable: dict[str, str] = {}
    versions: dict[str, str] = {}
    for tool in tools:
        reason = tool.unavailable()
        if reason:
            unavailable[tool.name] = reason
            print(f"skipping {tool.label}: {reason}")
        else:
            versions[tool.name] = tool.version()
    harmont = next((t for t in tools if type(t) is Harmont), None)
    startup = harmont.startup_s() if harmont and harmont.name not in unavailable else None

    print(f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} CPUs")
    print("tools: " + "; ".join(versions.values()))
    if startup is not None:
        print(f"harmont-exec startup (python -m executor --version): {startup:.3f} s")
    print(f"-j {args.jobs}, command {args.command!r}; seconds: median (min) of {args.repeat} runs")
    print(_format_line([name for name, _ in _COLUMNS]))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="harmont-bench-run-") as tmp:
        for steps in args.sizes:
            for shape in args.shapes:
                row = measure(
                    shape,
                    steps,
                    tools,
                    unavailable,
                    jobs=args.jobs,
                    repeat=args.repeat,
                    command=args.command,
                    seed=args.seed,
                    timeout_s=args.timeout,
                    tmp=Path(tmp),
                )
                rows.append(row)
                print(format_row(row), flush=True)
                for name, error in row.errors.items():
                    if name not in unavailable:
                        print(f"  {name} failed: {error}", flush=True)
    for name, reason in unavailable.items():
        print(f"{name}: {reason}")
    print(target_line(rows, args.command))

    if args.json:
        report = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "versions": versions,
            "harmont_startup_s": startup,
            "jobs": args.jobs,
            "repeat": args.repeat,
            "command": args.command,
            "seed": args.seed,
            "rows": [
                {
                    "shape": row.shape,
                    "steps": row.steps,
                    "edges": row.edges,
                    "tools": {
                        name: {
                            "median_s": t.median_s,
                            "min_s": t.min_s,
                            "jobs_per_s": row.jobs_per_s(name),
                        }
                        for name, t in row.timings.items()
                    },
                    "errors": row.errors,
                    "harmont_to_ninja": row.ratio_to_ninja("harmont"),
                    "make_to_ninja": row.ratio_to_ninja("make"),
                }
                for row in rows
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
