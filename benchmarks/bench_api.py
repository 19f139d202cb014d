"""API load benchmark: ``harmont-exec serve`` under concurrent reads while a build is recorded.

In one temporary directory it records a build of ``--steps`` trivial jobs (``true``, shape
``--shape``) with ``python -m executor run``, creates a token with ``python -m executor token
create``, and starts two servers on free ports of 127.0.0.1, each a subprocess in its own
session (its whole process group is killed at the end, whatever happens):

- ``python -m executor serve --db DB --port P``: the read API under test;
- a baseline: a bare FastAPI app with one endpoint returning a constant JSON, run by
  ``uvicorn.run`` with the same settings as ``serve`` (127.0.0.1, ``log_level="warning"``,
  uvicorn's default loop and HTTP implementation), so that its figure is the floor of "answer a
  GET with FastAPI and uvicorn" on this machine.

While measuring, a writer (another ``python -m executor run``, a chain of ``--writer-steps``
short jobs in pipeline ``live`` of the same database, restarted whenever it ends) keeps a build
being recorded, so every read happens while the store is being written; it runs during the
baseline's measurement too, so that all targets share the machine alike. Targets:

- ``jobs``: ``GET .../pipelines/api-bench/builds/1/jobs`` (the whole job list of build 1);
- ``job``: ``GET .../builds/1/jobs/<id>`` (one job, the middle one of the list);
- ``baseline``: ``GET /constant`` on the bare app.

Each is driven from this process with ``--concurrency`` requests in flight (one worker
coroutine per slot, each sending its next request when the previous one is answered), through
one ``httpx.AsyncClient`` per target (``--client httpx``, the default) or a minimal keep-alive
HTTP/1.1 client on asyncio streams (``--client raw``: httpx costs so much CPU per request that
on a small machine it bounds the baseline's figure; the client's CPU share is reported): first
``--warmup`` seconds unrecorded, then ``--seconds`` recorded. Targets are run round-robin
within each of ``--repeat`` rounds. Per target: requests/s (answered requests over
the wall time from the first send to the last answer, median of the repeats), p50 and p99
latency (nearest rank over each repeat's samples, then the median of the repeats), the count of
non-2xx answers and transport errors over every request (warm-up included; it must be 0), and
requests/s relative to the baseline's. Before timing, the job list is checked (200 with
``--steps`` jobs). Missing ``httpx``/``fastapi``/``uvicorn`` or a harmont-exec without ``serve``
is reported and skipped (exit 0); a set-up failure exits 1, and so does any non-2xx answer. It
does not import ``executor``.

    python -m benchmarks.bench_api --seconds 5 --repeat 3 --concurrency 8 --json api.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.workload import listing_order, make_graph, render_json

API_PREFIX = "/api/v0"
ORG = "local"
PIPELINE = "api-bench"
WRITER_PIPELINE = "live"
LOG_TAIL_LINES = 5
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
HARMONT = (sys.executable, "-m", "executor")

# The baseline server: the same uvicorn.run call as `harmont-exec serve` (executor/cli/serve.py),
# over an app with one endpoint that answers a constant JSON, built the way the API's handlers
# answer (an async handler returning a JSONResponse).
BASELINE_APP = """
import sys

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/constant")
async def constant() -> JSONResponse:
    return JSONResponse({"status": "ok", "data": [1, 2, 3]})


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
BASELINE_PATH = "/constant"


class SetupFailed(Exception):
    """Something the measurement needs did not come up: nothing can be measured."""


@dataclass(slots=True)
class Target:
    name: str
    base_url: str
    path: str
    rates: list[float] = field(default_factory=list)  # requests/s, one per repeat
    p50s: list[float] = field(default_factory=list)  # ms, one per repeat
    p99s: list[float] = field(default_factory=list)
    client_cpus: list[float] = field(default_factory=list)
    requests: int = 0  # recorded requests, every repeat
    bad: int = 0  # non-2xx answers and transport errors, warm-up included
    bad_samples: list[str] = field(default_factory=list)
    body_bytes: int = 0

    @property
    def rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def p50(self) -> float | None:
        return statistics.median(self.p50s) if self.p50s else None

    @property
    def p99(self) -> float | None:
        return statistics.median(self.p99s) if self.p99s else None

    @property
    def client_cpu(self) -> float | None:
        return statistics.median(self.client_cpus) if self.client_cpus else None


@dataclass(frozen=True, slots=True)
class Round:
    requests: int
    elapsed_s: float
    latencies_s: list[float]
    client_cpu: float  # this process's CPU seconds per wall second (1.0 = one CPU busy)


# -- processes -------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports of 127.0.0.1 (all held open while they are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _tail(path: Path) -> str:
    if not path.exists():
        return "(no output)"
    lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(lines[-LOG_TAIL_LINES:]) or "(no output)"


def kill_group(proc: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
    """SIGTERM the process's group (it leads its own session), SIGKILL it after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; anything left in its group goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


@contextlib.contextmanager
def background(argv: Sequence[str], *, cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        kill_group(proc)


def run_checked(argv: Sequence[str], *, cwd: Path, what: str, timeout_s: float = 600.0) -> str:
    """Run to completion; stdout on success, SetupFailed (with the output's tail) otherwise."""
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SetupFailed(f"{what}: still running after {timeout_s:g} s; killed") from exc
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()
        raise SetupFailed(
            f"{what}: exit code {done.returncode}: {' | '.join(lines[-LOG_TAIL_LINES:])}"
        )
    return done.stdout


class Writer:
    """Keeps ``python -m executor run`` recording the writer build, restarting it when it ends."""

    def __init__(self, build: Path, db: Path, cwd: Path, log: Path) -> None:
        self.argv = [
            *HARMONT,
            "run",
            str(build),
            "--db",
            str(db),
            "--pipeline",
            WRITER_PIPELINE,
            "-j",
            "1",
        ]
        self.cwd, self.log = cwd, log
        self.started = 0
        self.failed: list[int] = []  # exit codes of runs that ended badly on their own
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._loop, name="writer", daemon=True)

    def _loop(self) -> None:
        with self.log.open("ab") as out:
            while not self._stop.is_set():
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._proc = subprocess.Popen(
                        self.argv,
                        cwd=self.cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        start_new_session=True,
                    )
                    self.started += 1
                code = self._proc.wait()
                if code != 0 and not self._stop.is_set():
                    self.failed.append(code)
                    time.sleep(0.5)  # a writer that cannot run must not spin

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is not None:
            kill_group(proc)
        self._thread.join(timeout=10)


def wait_ready(client: Any, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` until it answers 200, the process dies, or READY_TIMEOUT_S passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupFailed(f"{url}: server exited {proc.returncode}: {_tail(log)}")
        try:
            answer = client.get(url, timeout=2.0)
        except Exception as exc:  # connection refused while it starts
            last = type(exc).__name__
        else:
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}"
        time.sleep(0.1)
    raise SetupFailed(f"{url}: not ready after {READY_TIMEOUT_S:g} s ({last}): {_tail(log)}")


# -- measuring -------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


class HttpxClient:
    """Requests through one shared ``httpx.AsyncClient`` (a pool of keep-alive connections)."""

    def __init__(self, base_url: str, headers: dict[str, str], concurrency: int) -> None:
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.AsyncClient(
            base_url=base_url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
        )

    async def connect(self) -> HttpxClient:
        return self

    async def get(self, path: str) -> tuple[int, bytes]:
        answer = await self._client.get(path)
        return answer.status_code, answer.content

    async def close(self) -> None:
        """One worker is done (the pool stays)."""

    async def aclose(self) -> None:
        await self._client.aclose()


class RawClient:
    """A minimal HTTP/1.1 keep-alive client, one connection per worker: GET, then read the
    status line, the headers and ``content-length`` bytes. Far cheaper per request than httpx,
    so that the client does not bound the figures (answers without ``content-length`` are
    not supported and count as failed)."""

    def __init__(self, base_url: str, headers: dict[str, str], concurrency: int) -> None:
        host_port = base_url.removeprefix("http://")
        self._host, _, port = host_port.partition(":")
        self._port = int(port)
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    async def connect(self) -> _RawConnection:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        return _RawConnection(
            reader, writer, f"Host: {self._host}:{self._port}\r\n" + self._headers
        )

    async def aclose(self) -> None:
        """Nothing shared to close."""


class _RawConnection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: str
    ) -> None:
        self._reader, self._writer, self._headers = reader, writer, headers

    async def get(self, path: str) -> tuple[int, bytes]:
        self._writer.write(f"GET {path} HTTP/1.1\r\n{self._headers}\r\n".encode("latin-1"))
        await self._writer.drain()
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ValueError(
                f"HTTP {status} without content-length (not supported by --client raw)"
            )
        body = await asyncio.wait_for(self._reader.readexactly(length), REQUEST_TIMEOUT_S)
        return status, body

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


CLIENTS = {"httpx": HttpxClient, "raw": RawClient}


async def drive(client: Any, target: Target, concurrency: int, seconds: float) -> Round:
    """``concurrency`` workers send GETs back to back until ``seconds`` have passed."""
    latencies: list[float] = []
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds

    def failed(why: str) -> None:
        target.bad += 1
        if len(target.bad_samples) < 3:
            target.bad_samples.append(why)

    async def worker() -> None:
        conn = None
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                if conn is None:
                    conn = await client.connect()
                status, body = await conn.get(target.path)
            except Exception as exc:  # any transport error counts as a failed request
                failed(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    await conn.close()
                    conn = None
                continue
            latencies.append(time.perf_counter() - sent)
            if not 200 <= status < 300:
                failed(f"HTTP {status}: {body[:200]!r}")
            else:
                target.body_bytes = len(body)
        if conn is not None:
            await conn.close()

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    elapsed = time.perf_counter() - start
    return Round(len(latencies), elapsed, latencies, (time.process_time() - cpu) / elapsed)


async def measure(
    targets: Sequence[Target],
    headers: dict[str, str],
    *,
    client_kind: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    repeat: int,
) -> None:
    clients = {t.name: CLIENTS[client_kind](t.base_url, headers, concurrency) for t in targets}
    try:
        for index in range(repeat):
            for target in targets:
                client = clients[target.name]
                if warmup > 0:
                    await drive(client, target, concurrency, warmup)
                done = await drive(client, target, concurrency, seconds)
                ordered = sorted(done.latencies_s)
                target.requests += done.requests
                target.rates.append(done.requests / done.elapsed_s)
                target.client_cpus.append(done.client_cpu)
                if ordered:
                    target.p50s.append(percentile(ordered, 50) * 1000)
                    target.p99s.append(percentile(ordered, 99) * 1000)
                print(
                    f"  repeat {index + 1}/{repeat} {target.name:<8} "
                    f"{target.rates[-1]:8.0f} req/s, {done.requests} requests, "
                    f"client CPU {done.client_cpu:.0%}",
                    flush=True,
                )
    finally:
        for client in clients.values():
            await client.aclose()


# -- set-up ----------------------------------------------------------------------------------


def unavailable() -> str | None:
    """Why this benchmark cannot run here, or None."""
    missing = [m for m in ("httpx", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return f"missing Python packages: {', '.join(missing)} (pip install -e '.[test]')"
    probe = subprocess.run([*HARMONT, "serve", "--help"], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    output = (probe.stdout + probe.stderr).strip()
    if "No such command" in output:
        return "harmont-exec serve not available"
    last = output.splitlines()[-1] if output else f"exit code {probe.returncode}"
    return f"harmont-exec does not start: {last}"


def record_build(tmp: Path, db: Path, shape: str, steps: int, seed: int) -> None:
    build = tmp / "build.json"
    order = listing_order(steps, seed=seed)
    build.write_text(render_json(make_graph(shape, steps, seed=seed), "true", order), "utf-8")
    argv = [*HARMONT, "run", str(build), "--db", str(db), "--pipeline", PIPELINE, "-j", "2"]
    run_checked(argv, cwd=tmp, what="recording the measured build")


def pick_job(client: Any, base_url: str, headers: dict[str, str], steps: int) -> str:
    """Check the job list (200, ``steps`` jobs) and return the middle job's id."""
    url = f"{base_url}{API_PREFIX}/organizations/{ORG}/pipelines/{PIPELINE}/builds/1/jobs"
    answer = client.get(url, headers=headers, timeout=REQUEST_TIMEOUT_S)
    if answer.status_code != 200:
        raise SetupFailed(f"GET {url}: HTTP {answer.status_code}: {answer.text[:300]}")
    jobs = answer.json()["data"]
    if len(jobs) != steps:
        raise SetupFailed(f"GET {url}: {len(jobs)} jobs, expected {steps}")
    job_id: str = jobs[len(jobs) // 2]["id"]
    single = client.get(f"{url}/{job_id}", headers=headers, timeout=REQUEST_TIMEOUT_S)
    if single.status_code != 200 or single.json().get("id") != job_id:
        raise SetupFailed(f"GET {url}/{job_id}: HTTP {single.status_code}: {single.text[:300]}")
    return job_id


# -- report ----------------------------------------------------------------------------------

_COLUMNS = (
    ("target", 8),
    ("req/s", 8),
    ("p50 ms", 7),
    ("p99 ms", 7),
    ("non-2xx", 7),
    ("vs baseline", 11),
    ("client CPU", 10),
    ("body bytes", 10),
    ("path", 0),
)


def _format_line(cells: Sequence[object]) -> str:
    return "  ".join(
        f"{cell!s:<{width}}" if i in (0, len(_COLUMNS) - 1) else f"{cell!s:>{width}}"
        for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS, strict=True))
    ).rstrip()


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(target: Target, baseline: Target) -> float | None:
    own, base = target.rate, baseline.rate
    return own / base if own is not None and base else None


def format_row(target: Target, baseline: Target) -> str:
    rel = ratio(target, baseline)
    flag = "" if target.bad == 0 else " !"
    return _format_line(
        [
            target.name,
            _num(target.rate, 0),
            _num(target.p50, 2),
            _num(target.p99, 2),
            f"{target.bad}{flag}",
            "-" if rel is None else f"{rel:.2f}x",
            "-" if target.client_cpu is None else f"{target.client_cpu:.0%}",
            target.body_bytes,
            target.path if len(target.path) < 60 else "..." + target.path[-57:],
        ]
    )


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_api",
        description="Load the read API (harmont-exec serve) while a build is recorded; compare "
        "requests/s with a bare FastAPI app.",
    )
    parser.add_argument("--steps", type=int, default=200, help="jobs in the measured build")
    parser.add_argument("--shape", choices=("wide", "layered"), default="wide")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--seconds", type=float, default=5.0, help="recorded time per target")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded time first")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the targets")
    parser.add_argument(
        "--writer-steps", type=int, default=2000, help="chain length of the writer build"
    )
    parser.add_argument(
        "--no-writer", action="store_true", help="measure without a build being recorded"
    )
    parser.add_argument(
        "--client",
        choices=tuple(CLIENTS),
        default="httpx",
        help="httpx.AsyncClient, or a minimal keep-alive HTTP/1.1 client (cheaper per request)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.concurrency < 1 or args.steps < 1 or args.writer_steps < 1:
        parser.error("--repeat, --concurrency, --steps and --writer-steps must be at least 1")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be positive and --warmup not negative")

    reason = unavailable()
    if reason:
        print(f"skipping the API benchmark: {reason}")
        return 0

    import httpx

    version = run_checked([*HARMONT, "--version"], cwd=Path.cwd(), what="version").strip()
    print(f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"{version}; uvicorn log level warning, default loop and http")
    print(
        f"{args.steps} {args.shape} jobs; {args.client} client, {args.concurrency} in flight; "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s per target, {args.repeat} rounds; writer: "
        + ("off" if args.no_writer else f"chain of {args.writer_steps} `true` jobs, -j 1")
    )
    targets: list[Target] = []
    writer: Writer | None = None
    with tempfile.TemporaryDirectory(prefix="harmont-bench-api-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "bench.db"
        try:
            with contextlib.ExitStack() as stack:
                record_build(tmp, db, args.shape, args.steps, args.seed)
                secret = run_checked(
                    [*HARMONT, "token", "create", "--db", str(db), "--description", "bench"],
                    cwd=tmp,
                    what="token create",
                ).strip()
                headers = {"Authorization": f"Bearer {secret}"}

                api_port, base_port = free_ports(2)
                api_log, base_log = tmp / "serve.log", tmp / "baseline.log"
                serve_argv = [*HARMONT, "serve", "--db", str(db), "--port", str(api_port)]
                api = stack.enter_context(background(serve_argv, cwd=tmp, log=api_log))
                base_argv = [sys.executable, "-c", BASELINE_APP, str(base_port)]
                base = stack.enter_context(background(base_argv, cwd=tmp, log=base_log))
                api_url, base_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{base_port}"
                with httpx.Client() as sync:
                    wait_ready(sync, f"{api_url}{API_PREFIX}/ping", api, api_log)
                    wait_ready(sync, f"{base_url}{BASELINE_PATH}", base, base_log)
                    job_id = pick_job(sync, api_url, headers, args.steps)

                if not args.no_writer:
                    chain = tmp / "writer.json"
                    graph = make_graph("chain", args.writer_steps, seed=args.seed)
                    chain.write_text(
                        render_json(graph, "true", listing_order(args.writer_steps)), "utf-8"
                    )
                    writer = Writer(chain, db, tmp, tmp / "writer.log")
                    stack.callback(writer.stop)
                    writer.start()
                    time.sleep(1.0)  # past its start-up: the build is being written

                jobs_path = f"{API_PREFIX}/organizations/{ORG}/pipelines/{PIPELINE}/builds/1/jobs"
                targets = [
                    Target("jobs", api_url, jobs_path),
                    Target("job", api_url, f"{jobs_path}/{job_id}"),
                    Target("baseline", base_url, BASELINE_PATH),
                ]
                asyncio.run(
                    measure(
                        targets,
                        headers,
                        client_kind=args.client,
                        concurrency=args.concurrency,
                        seconds=args.seconds,
                        warmup=args.warmup,
                        repeat=args.repeat,
                    )
                )
                for proc, name, log in ((api, "serve", api_log), (base, "baseline", base_log)):
                    if proc.poll() is not None:
                        raise SetupFailed(f"{name} exited {proc.returncode}: {_tail(log)}")
                server_log = api_log.read_text(encoding="utf-8", errors="replace").strip()
                writer_log_tail = _tail(tmp / "writer.log") if writer else ""
        except SetupFailed as exc:
            print(f"API benchmark failed to set up: {exc}")
            return 1

    baseline = targets[-1]
    print(
        f"req/s: median of {args.repeat} repeats; p50/p99: median of the per-repeat "
        "percentiles; non-2xx: every request, warm-up included"
    )
    print(_format_line([name for name, _ in _COLUMNS]))
    for target in targets:
        print(format_row(target, baseline))
    if writer is not None:
        print(
            f"writer: {writer.started} run(s) started, {len(writer.failed)} ended badly"
            + (f" (exit codes {writer.failed}; log: {writer_log_tail})" if writer.failed else "")
        )
    errors = [line for line in server_log.splitlines() if line.strip()]
    # The first line is serve's banner; anything else at log level warning is worth a look.
    if len(errors) > 1:
        print(f"serve logged {len(errors) - 1} more line(s): " + " | ".join(errors[1:6]))
    bad = [t for t in targets if t.bad]
    for target in bad:
        print(f"FLAG {target.name}: {target.bad} non-2xx/failed requests: {target.bad_samples}")

    if args.json:
        report = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "version": version,
            "steps": args.steps,
            "shape": args.shape,
            "concurrency": args.concurrency,
            "client": args.client,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "writer": None
            if writer is None
            else {
                "steps": args.writer_steps,
                "runs_started": writer.started,
                "failed": writer.failed,
            },
            "targets": {
                t.name: {
                    "path": t.path,
                    "requests_per_s": t.rate,
                    "requests_per_s_repeats": t.rates,
                    "p50_ms": t.p50,
                    "p99_ms": t.p99,
                    "p50_ms_repeats": t.p50s,
                    "p99_ms_repeats": t.p99s,
                    "client_cpu": t.client_cpu,
                    "requests": t.requests,
                    "non_2xx": t.bad,
                    "non_2xx_samples": t.bad_samples,
                    "body_bytes": t.body_bytes,
                    "to_baseline": ratio(t, baseline),
                }
                for t in targets
            },
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
