"""Soak: the read API keeps answering correctly while several big builds record at once.

In a temporary directory: ``python -m executor serve`` on a free port of 127.0.0.1, a token,
then ``--builds`` (default 4) ``python -m executor run`` processes started together, each
recording ``--steps`` (default 1000) ``true`` jobs (shape ``--shape``) into its own pipeline
``soak-K`` of the same database, at ``-j --jobs``. While they run, ``--concurrency`` client
coroutines read the API round-robin: the pipeline's build list, the build, its whole job list,
and one of its jobs. When the runs end, it stops (or after ``--timeout`` s, which is a failure).
``--rounds`` repeats the whole thing (each round a fresh database) for a longer soak.

Every answer is checked, not only counted:
- before a run has recorded its build, a 404 ``organization_not_found`` /
  ``pipeline_not_found`` / ``build_not_found`` is the right answer (counted as ``not yet``);
  once the client has seen the build, anything but 200 is an error;
- a job list has exactly ``--steps`` jobs, each in a known state;
- per build, the number of finished jobs a client sees never goes down;
- every run exits 0 and its build ends ``passed``.

Reported per round: requests/s, p50/p99 latency, errors (must be 0; exit status 1 otherwise),
``not yet`` answers, and the runs' recorded jobs/s. ``--json OUT`` writes every figure.

    python -m benchmarks.bench_soak                      # 4 x 1000 jobs, one round
    python -m benchmarks.bench_soak --rounds 5 --steps 2000 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_api import (
    HARMONT,
    SetupFailed,
    background,
    free_ports,
    kill_group,
    percentile,
    run_checked,
    unavailable,
    wait_ready,
)
from benchmarks.workload import make_graph, render_json

TERMINAL = {"passed", "failed", "skipped", "canceled", "timed_out"}
STATES = TERMINAL | {"pending", "scheduled", "assigned", "running", "canceling", "timing_out"}
NOT_YET = {"organization_not_found", "pipeline_not_found", "build_not_found"}


@dataclass
class SoakResult:
    builds: int
    steps: int
    seconds: float
    requests: int
    errors: int
    not_yet: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    jobs_per_s: float
    error_samples: list[str] = field(default_factory=list)


class _Checks:
    """What the client saw, checked as it goes."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.latencies: list[float] = []
        self.errors = 0
        self.not_yet = 0
        self.samples: list[str] = []
        # pipeline -> (when an answer arrived, finished jobs in it), for the monotony check
        self.seen: dict[str, list[tuple[float, int]]] = {}

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(what[:300])

    def answer(
        self,
        pipeline: str,
        kind: str,
        status: int,
        body: Any,
        recorded: bool,
        sent: float,
        received: float,
    ) -> None:
        if status == 404 and not recorded and isinstance(body, dict):
            if body.get("error", {}).get("code") in NOT_YET:
                self.not_yet += 1
                return
        if status != 200:
            self.error(f"{kind} {pipeline}: HTTP {status}: {json.dumps(body)}")
            return
        if kind == "jobs":
            jobs = body.get("data", [])
            if len(jobs) != self.steps:
                self.error(f"jobs {pipeline}: {len(jobs)} jobs, not {self.steps}")
            unknown = {j.get("state") for j in jobs} - STATES
            if unknown:
                self.error(f"jobs {pipeline}: unknown states {unknown}")
            finished = sum(j.get("state") in TERMINAL for j in jobs)
            # Answers to concurrent requests may arrive in any order; but a request sent
            # after an answer arrived must see at least as many finished jobs as it showed.
            earlier = [n for at, n in self.seen.get(pipeline, []) if at < sent]
            if earlier and finished < max(earlier):
                self.error(
                    f"jobs {pipeline}: {finished} finished, in answer to a request sent after "
                    f"an answer with {max(earlier)} arrived"
                )
            self.seen.setdefault(pipeline, []).append((received, finished))


async def _client_loop(
    client: Any, base: str, pipelines: list[str], checks: _Checks, recorded: set[str], stop: Any
) -> None:
    kinds = itertools.cycle(["builds", "build", "jobs", "job"])
    names = itertools.cycle(pipelines)
    job_ids: dict[str, str] = {}
    while not stop.is_set():
        kind, pipeline = next(kinds), next(names)
        path = f"{base}/organizations/local/pipelines/{pipeline}"
        url = {
            "builds": f"{path}/builds",
            "build": f"{path}/builds/1",
            "jobs": f"{path}/builds/1/jobs",
            "job": f"{path}/builds/1/jobs/{job_ids.get(pipeline, '')}",
        }[kind]
        if kind == "job" and pipeline not in job_ids:
            continue
        was_recorded = pipeline in recorded
        started = time.perf_counter()
        try:
            response = await client.get(url)
            body = response.json()
        except Exception as exc:  # a transport error or a body that is not JSON
            checks.error(f"{kind} {pipeline}: {type(exc).__name__}: {exc}")
            continue
        received = time.perf_counter()
        checks.latencies.append(received - started)
        if response.status_code == 200 and kind in ("builds", "build"):
            recorded.add(pipeline)
        if response.status_code == 200 and kind == "jobs" and body.get("data"):
            job_ids[pipeline] = body["data"][len(body["data"]) // 2]["id"]
        checks.answer(pipeline, kind, response.status_code, body, was_recorded, started, received)


async def _drive(
    url: str, token: str, pipelines: list[str], concurrency: int, checks: _Checks, runs: list[Any]
) -> float:
    import httpx

    stop = asyncio.Event()
    recorded: set[str] = set()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=60, limits=limits
    ) as client:
        started = time.perf_counter()
        tasks = [
            asyncio.create_task(_client_loop(client, url, pipelines, checks, recorded, stop))
            for _ in range(concurrency)
        ]
        await asyncio.gather(*(asyncio.to_thread(run.wait) for run in runs))
        stop.set()
        await asyncio.gather(*tasks)
        return time.perf_counter() - started


def soak_round(
    work: Path, *, builds: int, steps: int, jobs: int, shape: str, concurrency: int, timeout: float
) -> SoakResult:
    """One round in ``work``: serve, ``builds`` runs at once, the client checking; raises
    SetupFailed if something could not start or a run failed."""
    import httpx

    db = work / "harmont.db"
    graph = make_graph(shape, steps, seed=1)
    files = []
    for k in range(builds):
        path = work / f"soak-{k + 1}.json"
        path.write_text(render_json(graph, "true", range(steps)))
        files.append(path)
    token = run_checked(
        [*HARMONT, "token", "create", "--db", str(db)], cwd=work, what="token create"
    ).strip()
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}/api/v0"
    checks = _Checks(steps)
    with ExitStack() as stack:
        server = stack.enter_context(
            background(
                [*HARMONT, "serve", "--db", str(db), "--port", str(port)],
                cwd=work,
                log=work / "serve.log",
            )
        )
        with httpx.Client() as probe:
            wait_ready(probe, f"{url}/ping", server, work / "serve.log")
        runs = [
            stack.enter_context(
                background(
                    [*HARMONT, "run", str(f), "--db", str(db), "-j", str(jobs)],
                    cwd=work,
                    log=work / f"{f.stem}.log",
                )
            )
            for f in files
        ]
        began = time.perf_counter()
        wall = asyncio.run(
            asyncio.wait_for(
                _drive(url, token, [f.stem for f in files], concurrency, checks, runs), timeout
            )
        )
        run_s = time.perf_counter() - began
        for f, run in zip(files, runs, strict=True):
            if run.wait() != 0:
                raise SetupFailed(f"{f.stem}: run exited {run.returncode}; see {f.stem}.log")
        kill_group(server)
    latencies = sorted(checks.latencies)
    return SoakResult(
        builds=builds,
        steps=steps,
        seconds=round(wall, 2),
        requests=len(latencies),
        errors=checks.errors,
        not_yet=checks.not_yet,
        req_per_s=round(len(latencies) / wall, 1) if wall else 0.0,
        p50_ms=round(percentile(latencies, 50) * 1000, 2) if latencies else 0.0,
        p99_ms=round(percentile(latencies, 99) * 1000, 2) if latencies else 0.0,
        jobs_per_s=round(builds * steps / run_s, 1),
        error_samples=checks.samples,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2, help="-j of each run")
    parser.add_argument("--shape", default="layered", choices=["wide", "chain", "layered"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    missing = unavailable()
    if missing:
        print(f"skipped: {missing}")
        return 0
    results = []
    print(
        "round | builds x steps | seconds | requests | req/s | p50 ms | p99 ms | errors | "
        "not yet | recorded jobs/s"
    )
    for round_no in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory(prefix="harmont-soak-") as tmp:
            try:
                result = soak_round(
                    Path(tmp),
                    builds=args.builds,
                    steps=args.steps,
                    jobs=args.jobs,
                    shape=args.shape,
                    concurrency=args.concurrency,
                    timeout=args.timeout,
                )
            except (SetupFailed, TimeoutError) as exc:
                print(f"round {round_no}: FAILED: {exc}")
                return 1
        results.append(result)
        print(
            f"{round_no} | {result.builds} x {result.steps} | {result.seconds} | "
            f"{result.requests} | {result.req_per_s} | {result.p50_ms} | {result.p99_ms} | "
            f"{result.errors}{' !' if result.errors else ''} | {result.not_yet} | "
            f"{result.jobs_per_s}"
        )
        for sample in result.error_samples:
            print(f"FLAG {sample}")
    if len(results) > 1:
        print(
            f"median of {len(results)} rounds: "
            f"{statistics.median(r.req_per_s for r in results)} req/s, "
            f"p99 {statistics.median(r.p99_ms for r in results)} ms, "
            f"errors {sum(r.errors for r in results)}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
