"""Dask executor benchmark: the same builds through the local executor and the Dask executor.

Two workloads of trivial jobs (``true``), so that what is measured is each executor's cost per
job, not the jobs' work: ``flat`` (N independent jobs) and ``chain`` (M jobs, each depending on
the one before, so every job waits for the previous one's whole round trip); and ``work``
(K independent jobs of ``sleep 0.25``), where that cost meets jobs that do something. Each runs
with ``run_build`` in this process, recording into a new SQLite database every time (and, with
``--postgresql URL``, also into a PostgreSQL store: a new schema, dropped at the end), with the
same
concurrency for both executors (``--jobs``, default 2): the local runner, and a
``DaskProcessRunner`` on a ``distributed.LocalCluster`` on 127.0.0.1 with ``--jobs``
single-threaded worker processes (started once, outside the timings; the client connects inside
them). Runs of the two executors are interleaved within each repeat; each figure is the median
of ``--repeat`` wall times. Reported: jobs/s, milliseconds per job (wall time / jobs; for the
chain, that is one job's latency end to end) and the ratio dask/local of the wall times.
Every run must pass (all jobs ``passed``), else the benchmark stops.

    python -m benchmarks.bench_dask --flat 200 --chain 50 --work 20 --repeat 5 \
        [--postgresql postgresql://...] [--json dask.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

EXECUTORS = ("local", "dask")


def _build(shape: str, size: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for n in range(size):
        command = "sleep 0.25" if shape == "work" else "true"
        step: dict[str, Any] = {"key": f"j{n}", "command": command}
        if shape == "chain" and n:
            step["depends_on"] = f"j{n - 1}"
        steps.append(step)
    return {"steps": steps}


async def _once(executor: str, address: str, path: Path, db: str, jobs: int) -> float:
    from executor import RunOptions, open_dask_runner, run_build

    options = RunOptions(concurrency=jobs)
    started = time.perf_counter()
    if executor == "local":
        result = await run_build(path, db=db, options=options)
    else:
        async with open_dask_runner(address) as runner:
            result = await run_build(path, db=db, options=options, runner=runner)
    elapsed = time.perf_counter() - started
    states = {job.state.value for job in result.jobs.values()}
    if states != {"passed"}:
        raise SystemExit(f"{executor} {path.name}: jobs ended {sorted(states)}; expected passed")
    return elapsed


def _with_schema(url: str, schema: str | None) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def _pg_schema(url: str) -> str:
    import uuid

    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    return schema


def _pg_drop(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flat", type=int, default=200, help="jobs of the flat workload")
    parser.add_argument("--chain", type=int, default=50, help="jobs of the chain workload")
    parser.add_argument("--work", type=int, default=20, help="jobs of 0.25 s (0: none)")
    parser.add_argument(
        "--postgresql",
        metavar="URL",
        help="also record into this PostgreSQL server (a superuser: a schema is created)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="concurrency = Dask workers")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import dask
    import distributed
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    dask.config.set({"distributed.logging.distributed": "error"})
    workloads = [("flat", args.flat), ("chain", args.chain), ("work", args.work)]
    workloads = [(shape, size) for shape, size in workloads if size > 0]
    stores = ["sqlite"] + (["postgresql"] if args.postgresql else [])
    schema = _pg_schema(args.postgresql) if args.postgresql else None
    times: dict[tuple[str, str, str], list[float]] = {}
    with (
        distributed.LocalCluster(
            n_workers=args.jobs,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"allowed_failures": 0, "dashboard_address": ":0"},
        ) as cluster,
        tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp,
    ):
        directory = Path(tmp)
        for shape, size in workloads:
            (directory / f"{shape}.json").write_text(json.dumps(_build(shape, size)))
        try:
            for repeat in range(args.repeat):
                for shape, _ in workloads:
                    for store in stores:
                        for executor in EXECUTORS:
                            db = (
                                str(directory / f"{executor}-{shape}-{repeat}.db")
                                if store == "sqlite"
                                else _with_schema(args.postgresql, schema)
                            )
                            path = directory / f"{shape}.json"
                            elapsed = anyio.run(
                                _once, executor, cluster.scheduler_address, path, db, args.jobs
                            )
                            times.setdefault((shape, store, executor), []).append(elapsed)
        finally:
            if schema is not None:
                _pg_drop(args.postgresql, schema)
    rows = []
    print(
        f"harmont-exec local vs dask executor; python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, -j {args.jobs}, {args.repeat} repeats (median); "
        "ratio: wall time / local executor's on SQLite"
    )
    print(
        f"{'workload':<12}{'store':<12}{'executor':<10}{'wall s':>9}{'jobs/s':>10}"
        f"{'ms/job':>9}{'ratio':>8}"
    )
    for shape, size in workloads:
        local = statistics.median(times[(shape, "sqlite", "local")])
        for store in stores:
            for executor in EXECUTORS:
                wall = statistics.median(times[(shape, store, executor)])
                row = {
                    "workload": f"{shape}-{size}",
                    "store": store,
                    "executor": executor,
                    "median_s": round(wall, 4),
                    "jobs_per_s": round(size / wall, 1),
                    "ms_per_job": round(wall / size * 1000, 2),
                    "ratio_to_local": round(wall / local, 2),
                }
                rows.append(row)
                print(
                    f"{row['workload']:<12}{store:<12}{executor:<10}{wall:>9.3f}"
                    f"{row['jobs_per_s']:>10}{row['ms_per_job']:>9}{row['ratio_to_local']:>8}"
                )
    if args.json is not None:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
