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

**The write path** (``--write``): ``python -m executor serve --db DB --port P --max-builds N``
(``--max-builds``, default 2) on a free port of 127.0.0.1, in its own session like the servers
above, and one pipeline created through the API (``createPipeline``). Every build it is sent is
the same one-job build file (``true``), with a gzip tarball of it as its source, as ``submit``
would send it (``--no-source``: none). Each of ``--repeat`` rounds measures, in this order:

- (a) ``createBuild`` under load: ``--builds`` requests from ``--clients`` httpx workers at once
  (each sending its next request when the previous one is answered); the service starts
  running them as they arrive, ``--max-builds`` at a time, so most wait in the queue while the
  rest are sent (how many had not started when the last one was answered is reported). Then as
  many ``getBuild`` requests the same way, the queue still running the round's builds: the read
  beside the write, on the same busy server. Per target, as for the reads: 2xx answers per second
  (median of the rounds), p50/p99 latency (median of the per-round percentiles), non-2xx
  answers. Then every build of the round must pass; from their recorded times, how long the
  queue took (first send to the last recorded finish) and so how many builds/s it ran.
- (b) the time from sending ``createBuild`` to its job's recorded ``started_at`` (the server's
  clock: the same machine's, compared with ``datetime.now(UTC)`` taken just before the send),
  ``--samples`` times per case, one build at a time: ``idle``, the queue empty; ``busy``,
  ``--max-builds`` holder builds first take every slot (their one job blocks on a FIFO), the
  measured build is sent, and ``--hold`` seconds after the send the holders are released, so
  the figure includes waiting for a slot by design; ``busy handover`` is the part of it after
  the slot was freed: from the first holder build's recorded ``finished_at`` to the job's
  ``started_at``. Builds are looked at every 50 ms, which does not change the figures (they are
  recorded times).
- (c) beside ``run``: ``python -m executor run FILE --db DB2`` of the same build file, from just
  before the process is started to its job's recorded ``started_at`` (read from DB2 with
  ``sqlite3``), interleaved with (b)'s samples.

(b) and (c) are reported as the median and the p99 (nearest rank) of every sample of every
round, and the median relative to ``run``'s. A build and a ``run`` are done once, unrecorded,
before the rounds. Holder jobs still blocked at the end are released before ``serve`` stops.

    python -m benchmarks.bench_api --write --builds 100 --clients 4 --samples 5 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import importlib.util
import io
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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


def unavailable(*, write: bool = False) -> str | None:
    """Why this benchmark (``write``: its write path) cannot run here, or None."""
    missing = [m for m in ("httpx", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return f"missing Python packages: {', '.join(missing)} (pip install -e '.[test]')"
    probe = subprocess.run([*HARMONT, "serve", "--help"], capture_output=True, text=True)
    if probe.returncode == 0:
        if write and "--max-builds" not in probe.stdout:
            return "harmont-exec serve does not run builds (no --max-builds)"
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


def _format_line(cells: Sequence[object], columns: Sequence[tuple[str, int]] = _COLUMNS) -> str:
    """One line of a table: the first and the last column left-aligned, the others right."""
    return "  ".join(
        f"{cell!s:<{width}}" if i in (0, len(columns) - 1) else f"{cell!s:>{width}}"
        for i, (cell, (_, width)) in enumerate(zip(cells, columns, strict=True))
    ).rstrip()


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(target: Target, baseline: Target) -> float | None:
    own, base = target.rate, baseline.rate
    return own / base if own is not None and base else None


def format_row(
    target: Target, baseline: Target, columns: Sequence[tuple[str, int]] = _COLUMNS
) -> str:
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
        ],
        columns,
    )


# -- the write path (--write) ----------------------------------------------------------------

WRITE_PIPELINE = "write-bench"
RUN_PIPELINE = "run-bench"
POLL_S = 0.05  # how often a build or a job is looked at (the figures come from recorded times)
BUILD_TIMEOUT_S = 120.0
RELEASE_TIMEOUT_S = 10.0
TERMINAL_BUILD_STATES = frozenset({"passed", "failed", "canceled"})
JSON_HEADERS = {"content-type": "application/json"}
ONE_JOB_BUILD = 'version: "0"\nsteps:\n  - key: job\n    command: "true"\n'
# A holder build keeps a slot of the queue: its one job blocks, using no CPU, until the benchmark
# writes a line into the FIFO named by its HOLD_FIFO (sent as the build's env).
HOLDER_BUILD = 'version: "0"\nsteps:\n  - key: hold\n    command: \'read line < "$HOLD_FIFO"\'\n'
_WRITE_COLUMNS = (
    ("target", 11),
    ("req/s", 8),
    ("p50 ms", 7),
    ("p99 ms", 7),
    ("non-2xx", 7),
    ("vs getBuild", 11),
    ("client CPU", 10),
    ("body bytes", 10),
    ("path", 0),
)
_START_COLUMNS = (
    ("case", 13),
    ("samples", 7),
    ("median ms", 9),
    ("p99 ms", 8),
    ("vs run", 7),
    ("answer ms", 9),
    ("from -> to", 0),
)


def utc_now() -> datetime:
    return datetime.now(UTC)


def ms_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() * 1000


def recorded(build_or_job: dict[str, Any], name: str) -> datetime:
    value = build_or_job.get(name)
    if not isinstance(value, str):
        raise SetupFailed(f"no {name} recorded: {json.dumps(build_or_job)[:300]}")
    return datetime.fromisoformat(value)


def source_tarball(build_text: str) -> bytes:
    """A gzip tarball holding the build file as ``build.yaml``, as ``submit`` would pack it."""
    raw = io.BytesIO()
    data = build_text.encode()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("build.yaml")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def build_body(build_text: str, source: bytes | None, env: dict[str, str] | None = None) -> bytes:
    body: dict[str, Any] = {"pipeline_ir": build_text, "branch": "main", "commit": "0" * 40}
    if source is not None:
        body["source_b64"] = base64.b64encode(source).decode("ascii")
    if env:
        body["env"] = env
    return json.dumps(body).encode()


def release(fifo: Path, timeout_s: float = RELEASE_TIMEOUT_S) -> bool:
    """Write a line into ``fifo`` for the holder job reading it; False if no reader opened it
    within ``timeout_s`` (0: one try, for the clean-up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO or time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
            continue
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)
        return True


def release_all(fifos: list[Path]) -> None:
    """At the end, whatever happened: no holder job is left blocked on its FIFO."""
    for fifo in fifos:
        release(fifo, timeout_s=0)
    fifos.clear()


class WriteApi:
    """The calls of the write benchmark, through one keep-alive ``httpx.Client``; any answer
    but the expected one is a SetupFailed (nothing that follows could be trusted)."""

    def __init__(self, client: Any, base_url: str, pipeline: str) -> None:
        self.client = client
        self.pipelines = f"{base_url}{API_PREFIX}/organizations/{ORG}/pipelines"
        self.builds = f"{self.pipelines}/{pipeline}/builds"

    def _expect(self, answer: Any, status: int, what: str) -> Any:
        if answer.status_code != status:
            raise SetupFailed(f"{what}: HTTP {answer.status_code}: {answer.text[:300]}")
        return answer.json()

    def create_pipeline(self, name: str) -> None:
        body = {
            "name": name,
            "repository": f"https://example.invalid/bench/{name}.git",
            "default_branch": "main",
        }
        self._expect(self.client.post(self.pipelines, json=body), 201, "createPipeline")

    def create_build(self, body: bytes) -> tuple[int, datetime, float]:
        """The new build's number, when the request was sent (UTC) and its latency (s)."""
        sent, start = utc_now(), time.perf_counter()
        answer = self.client.post(self.builds, content=body, headers=JSON_HEADERS)
        took = time.perf_counter() - start
        number: int = self._expect(answer, 201, "createBuild")["number"]
        return number, sent, took

    def build(self, number: int) -> dict[str, Any]:
        build: dict[str, Any] = self._expect(
            self.client.get(f"{self.builds}/{number}"), 200, f"getBuild #{number}"
        )
        return build

    def job(self, number: int) -> dict[str, Any]:
        """The build's one job."""
        jobs = self._expect(
            self.client.get(f"{self.builds}/{number}/jobs"), 200, f"listJobs #{number}"
        )["data"]
        if len(jobs) != 1:
            raise SetupFailed(f"build #{number}: {len(jobs)} jobs, expected 1")
        job: dict[str, Any] = jobs[0]
        return job

    def wait_build(self, number: int, *, passed: bool = True) -> dict[str, Any]:
        """Poll until the build has ended (it must have passed); the build."""
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while True:
            time.sleep(POLL_S)
            build = self.build(number)
            if build["state"] in TERMINAL_BUILD_STATES:
                if passed and build["state"] != "passed":
                    raise SetupFailed(f"build #{number} ended {build['state']}: {build}")
                return build
            if time.monotonic() > deadline:
                raise SetupFailed(
                    f"build #{number} still {build['state']} after {BUILD_TIMEOUT_S:g} s"
                )

    def wait_running(self, number: int) -> None:
        """Poll until the build's job is recorded running."""
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while (state := self.job(number)["state"]) != "running":
            if state in TERMINAL_BUILD_STATES or time.monotonic() > deadline:
                raise SetupFailed(f"build #{number}: its job is {state}, not running")
            time.sleep(POLL_S)


@dataclass(slots=True)
class Starts:
    """One case of "until the job runs": milliseconds per sample, pooled over the rounds."""

    name: str
    what: str
    values_ms: list[float] = field(default_factory=list)
    answers_ms: list[float] = field(default_factory=list)  # createBuild's own latency

    @property
    def median(self) -> float | None:
        return statistics.median(self.values_ms) if self.values_ms else None

    @property
    def p99(self) -> float | None:
        return percentile(sorted(self.values_ms), 99) if self.values_ms else None

    @property
    def answer(self) -> float | None:
        return statistics.median(self.answers_ms) if self.answers_ms else None


@dataclass(slots=True)
class Burst:
    """One round of ``count`` requests from ``clients`` workers."""

    elapsed_s: float
    latencies_s: list[float]
    numbers: list[int]  # of the builds created
    first_sent: datetime
    last_answer: datetime
    client_cpu: float


async def burst(
    base_url: str,
    headers: dict[str, str],
    target: Target,
    *,
    count: int,
    clients: int,
    body: bytes | None,
    expect: int,
) -> Burst:
    """``count`` requests (a POST of ``body``, else a GET of ``target.path``), ``clients`` in
    flight, each worker sending its next request when the previous one is answered."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    numbers: list[int] = []
    left = count

    def failed(why: str) -> None:
        target.bad += 1
        if len(target.bad_samples) < 3:
            target.bad_samples.append(why)

    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
    ) as client:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                sent = time.perf_counter()
                try:
                    if body is None:
                        answer = await client.get(target.path)
                    else:
                        answer = await client.post(target.path, content=body, headers=JSON_HEADERS)
                except httpx.HTTPError as exc:
                    failed(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - sent)
                if answer.status_code != expect:
                    failed(f"HTTP {answer.status_code}: {answer.content[:200]!r}")
                    continue
                target.body_bytes = len(answer.content)
                if body is not None:
                    numbers.append(answer.json()["number"])

        cpu = time.process_time()
        first_sent, start = utc_now(), time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(clients):
                group.create_task(worker())
        elapsed = time.perf_counter() - start
        last_answer = utc_now()
    cpu_share = (time.process_time() - cpu) / elapsed
    return Burst(elapsed, latencies, numbers, first_sent, last_answer, cpu_share)


def add_round(target: Target, done: Burst) -> None:
    ordered = sorted(done.latencies_s)
    target.requests += len(ordered)
    target.rates.append(len(ordered) / done.elapsed_s)
    target.client_cpus.append(done.client_cpu)
    if ordered:
        target.p50s.append(percentile(ordered, 50) * 1000)
        target.p99s.append(percentile(ordered, 99) * 1000)


@dataclass(slots=True)
class Queue:
    """What the queue did with each round's builds (recorded times)."""

    waited: list[int] = field(default_factory=list)  # not started when the last 201 came
    drain_s: list[float] = field(default_factory=list)  # first send -> last build finished
    run_rates: list[float] = field(default_factory=list)  # builds finished / drain_s
    reads_while_busy: list[bool] = field(default_factory=list)  # getBuild's round ended first


def submit_round(
    api: WriteApi,
    base_url: str,
    headers: dict[str, str],
    create: Target,
    read: Target,
    queue: Queue,
    *,
    body: bytes,
    count: int,
    clients: int,
) -> None:
    """(a): ``count`` createBuilds, then as many getBuilds (the queue still running the
    builds), then wait until every build of the round has passed."""
    made = asyncio.run(
        burst(base_url, headers, create, count=count, clients=clients, body=body, expect=201)
    )
    add_round(create, made)
    if not made.numbers:
        raise SetupFailed(f"no createBuild answered 201: {create.bad_samples}")
    read.path = f"{create.path}/{min(made.numbers)}"
    reads = asyncio.run(
        burst(base_url, headers, read, count=count, clients=clients, body=None, expect=200)
    )
    add_round(read, reads)
    builds = [api.wait_build(number) for number in sorted(made.numbers)]
    last_finished = max(recorded(b, "finished_at") for b in builds)
    drain_s = (last_finished - made.first_sent).total_seconds()
    queue.waited.append(sum(recorded(b, "started_at") > made.last_answer for b in builds))
    queue.drain_s.append(drain_s)
    queue.run_rates.append(len(builds) / drain_s)
    queue.reads_while_busy.append(reads.last_answer < last_finished)


def idle_sample(api: WriteApi, body: bytes, idle: Starts) -> None:
    """(b), idle: createBuild on an idle queue; its job's recorded start."""
    number, sent, took = api.create_build(body)
    api.wait_build(number)
    idle.values_ms.append(ms_between(sent, recorded(api.job(number), "started_at")))
    idle.answers_ms.append(took * 1000)


def busy_sample(
    api: WriteApi,
    body: bytes,
    holder: Callable[[Path], bytes],
    fifos: list[Path],
    fifo_dir: Path,
    busy: Starts,
    handover: Starts,
    *,
    max_builds: int,
    hold_s: float,
) -> None:
    """(b), busy: ``max_builds`` holder builds take every slot; the measured createBuild is
    sent; ``hold_s`` after the send the holders are released; the measured job's recorded
    start, from the send (waiting for a slot included) and from the first holder's recorded
    end (the hand-over of the slot)."""
    mine = []
    for _ in range(max_builds):
        fifo = fifo_dir / f"hold-{len(list(fifo_dir.glob('hold-*')))}"
        os.mkfifo(fifo)
        fifos.append(fifo)
        mine.append(fifo)
    holders = [api.create_build(holder(fifo))[0] for fifo in mine]
    for number in holders:
        api.wait_running(number)
    number, sent, took = api.create_build(body)
    time.sleep(max(0.0, hold_s - (utc_now() - sent).total_seconds()))
    for fifo in mine:
        if not release(fifo):
            raise SetupFailed(f"no holder job opened {fifo} within {RELEASE_TIMEOUT_S:g} s")
        fifos.remove(fifo)
    api.wait_build(number)
    started = recorded(api.job(number), "started_at")
    freed = min(recorded(api.wait_build(n), "finished_at") for n in holders)
    if started < freed:
        raise SetupFailed(
            f"build #{number} started before a holder ended: more than {max_builds} at once"
        )
    busy.values_ms.append(ms_between(sent, started))
    busy.answers_ms.append(took * 1000)
    handover.values_ms.append(ms_between(freed, started))


def newest_job_start(db: Path) -> datetime:
    """The recorded start of the newest build's job in ``db`` (read-only, with sqlite3:
    this benchmark does not import ``executor``)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT jobs.started_at FROM jobs JOIN builds ON builds.id = jobs.build_id "
            "WHERE builds.number = (SELECT MAX(number) FROM builds)"
        ).fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0], str):
        raise SetupFailed(f"{db}: the newest build has {rows!r}, not one started job")
    return datetime.fromisoformat(rows[0][0])


def run_sample(build_file: Path, db: Path, tmp: Path, local: Starts) -> None:
    """(c): ``python -m executor run`` of the same build file, from the process's start to its
    job's recorded start."""
    argv = [*HARMONT, "run", str(build_file), "--db", str(db), "--pipeline", RUN_PIPELINE]
    started = utc_now()
    run_checked(argv, cwd=tmp, what="python -m executor run")
    local.values_ms.append(ms_between(started, newest_job_start(db)))


def format_start(case: Starts, run: Starts) -> str:
    rel = None if case.median is None or not run.median else case.median / run.median
    return _format_line(
        [
            case.name,
            len(case.values_ms),
            _num(case.median, 1),
            _num(case.p99, 1),
            "-" if rel is None else f"{rel:.2f}x",
            _num(case.answer, 1),
            case.what,
        ],
        _START_COLUMNS,
    )


def write_main(args: argparse.Namespace) -> int:
    import httpx

    version = run_checked([*HARMONT, "--version"], cwd=Path.cwd(), what="version").strip()
    source = None if args.no_source else source_tarball(ONE_JOB_BUILD)
    body = build_body(ONE_JOB_BUILD, source)
    print(f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"{version}; serve --max-builds {args.max_builds}; load average {_loadavg()}")
    print(
        "one-job build (`true`), "
        + ("no source" if source is None else f"with a {len(source)}-byte source tarball")
        + f" ({len(body)}-byte body); per round: {args.builds} createBuilds from {args.clients} "
        f"clients, then {args.samples} samples of each start case; {args.repeat} rounds"
    )
    create = Target("createBuild", "", "")
    read = Target("getBuild", "", "")
    queue = Queue()
    run = Starts("run", "`python -m executor run` process start -> job started_at")
    idle = Starts("idle", "createBuild sent -> job started_at, queue idle")
    busy = Starts(
        "busy",
        f"createBuild sent -> job started_at, {args.max_builds} slots held "
        f"{args.hold:g} s after the send (the wait is included)",
    )
    handover = Starts("busy handover", "first holder build's finished_at -> job started_at")
    fifos: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="harmont-bench-api-write-") as tmp_name:
        tmp = Path(tmp_name)
        db, run_db = tmp / "serve.db", tmp / "run.db"
        build_file = tmp / "one-job.yaml"
        build_file.write_text(ONE_JOB_BUILD, "utf-8")
        holder_dir = tmp / "fifos"
        holder_dir.mkdir()

        def holder(fifo: Path) -> bytes:
            return build_body(HOLDER_BUILD, None, {"HOLD_FIFO": str(fifo)})

        try:
            with contextlib.ExitStack() as stack:
                secret = run_checked(
                    [*HARMONT, "token", "create", "--db", str(db), "--description", "bench"],
                    cwd=tmp,
                    what="token create",
                ).strip()
                headers = {"Authorization": f"Bearer {secret}"}
                (port,) = free_ports(1)
                log = tmp / "serve.log"
                serve_argv = [*HARMONT, "serve", "--db", str(db), "--port", str(port)]
                serve_argv += ["--max-builds", str(args.max_builds)]
                proc = stack.enter_context(background(serve_argv, cwd=tmp, log=log))
                stack.callback(release_all, fifos)  # before serve is stopped
                url = f"http://127.0.0.1:{port}"
                with httpx.Client(headers=headers, timeout=REQUEST_TIMEOUT_S) as sync:
                    wait_ready(sync, f"{url}{API_PREFIX}/ping", proc, log)
                    api = WriteApi(sync, url, WRITE_PIPELINE)
                    api.create_pipeline(WRITE_PIPELINE)
                    create.base_url = read.base_url = url
                    create.path = api.builds.removeprefix(url)
                    # Unrecorded: a build through serve and one `run`, warming both paths up
                    # (and checking them).
                    idle_sample(api, body, Starts("warm-up", ""))
                    run_sample(build_file, run_db, tmp, Starts("warm-up", ""))
                    for index in range(args.repeat):
                        submit_round(
                            api,
                            url,
                            headers,
                            create,
                            read,
                            queue,
                            body=body,
                            count=args.builds,
                            clients=args.clients,
                        )
                        print(
                            f"  repeat {index + 1}/{args.repeat} createBuild "
                            f"{create.rates[-1]:.0f} req/s (getBuild {read.rates[-1]:.0f}), "
                            f"{queue.waited[-1]} of {args.builds} waited, ran in "
                            f"{queue.drain_s[-1]:.1f} s",
                            flush=True,
                        )
                        for _ in range(args.samples):
                            idle_sample(api, body, idle)
                            busy_sample(
                                api,
                                body,
                                holder,
                                fifos,
                                holder_dir,
                                busy,
                                handover,
                                max_builds=args.max_builds,
                                hold_s=args.hold,
                            )
                            run_sample(build_file, run_db, tmp, run)
                        print(
                            f"  repeat {index + 1}/{args.repeat} starts: idle "
                            f"{statistics.median(idle.values_ms[-args.samples :]):.1f} ms, busy "
                            f"{statistics.median(busy.values_ms[-args.samples :]):.1f} ms, run "
                            f"{statistics.median(run.values_ms[-args.samples :]):.1f} ms",
                            flush=True,
                        )
                if proc.poll() is not None:
                    raise SetupFailed(f"serve exited {proc.returncode}: {_tail(log)}")
                server_log = log.read_text(encoding="utf-8", errors="replace").strip()
        except SetupFailed as exc:
            print(f"API write benchmark failed: {exc}")
            return 1
    loadavg = _loadavg()

    print(
        f"requests: {args.builds} per round from {args.clients} clients; req/s: median of "
        f"{args.repeat} rounds; p50/p99: median of the per-round percentiles; getBuild: right "
        "after each round's createBuilds, the queue still running them"
    )
    print(_format_line([name for name, _ in _WRITE_COLUMNS], _WRITE_COLUMNS))
    for target in (create, read):
        print(format_row(target, read, _WRITE_COLUMNS))
    print(
        f"queue: {statistics.median(queue.waited):g} of {args.builds} builds not started when "
        f"the last createBuild was answered; the round ran in "
        f"{statistics.median(queue.drain_s):.2f} s, first send to last recorded finish "
        f"({statistics.median(queue.run_rates):.1f} builds/s; medians); getBuild's round ended "
        f"before the queue drained in {sum(queue.reads_while_busy)} of {args.repeat}"
    )
    samples = args.samples * args.repeat
    print(
        f"until the job runs: {samples} samples per case (p99 = nearest rank: of fewer than "
        "100 samples, the slowest); answer ms: createBuild's own latency (median)"
    )
    print(_format_line([name for name, _ in _START_COLUMNS], _START_COLUMNS))
    for case in (run, idle, busy, handover):
        print(format_start(case, run))
    print(f"load average after: {loadavg}")
    report_server_log(server_log)
    bad = [t for t in (create, read) if t.bad]
    for target in bad:
        print(f"FLAG {target.name}: {target.bad} non-2xx/failed requests: {target.bad_samples}")

    if args.json:

        def starts(case: Starts) -> dict[str, Any]:
            return {
                "what": case.what,
                "median_ms": case.median,
                "p99_ms": case.p99,
                "to_run": None
                if case.median is None or not run.median
                else case.median / run.median,
                "answer_ms": case.answer,
                "samples_ms": case.values_ms,
                "answers_ms": case.answers_ms,
            }

        report = {
            "mode": "write",
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "version": version,
            "load_average_after": loadavg,
            "max_builds": args.max_builds,
            "builds": args.builds,
            "clients": args.clients,
            "samples": args.samples,
            "hold_s": args.hold,
            "repeat": args.repeat,
            "source_bytes": None if source is None else len(source),
            "body_bytes": len(body),
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
                    "to_get_build": ratio(t, read),
                }
                for t in (create, read)
            },
            "queue": {
                "waited_repeats": queue.waited,
                "drain_s_repeats": queue.drain_s,
                "builds_per_s_repeats": queue.run_rates,
                "reads_while_busy_repeats": queue.reads_while_busy,
            },
            "starts": {case.name: starts(case) for case in (run, idle, busy, handover)},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if bad else 0


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


SERVE_BANNER = ("serving ", "builds sent here run as ")


def report_server_log(text: str) -> None:
    """Print what ``serve`` logged besides its banner (at log level warning: worth a look)."""
    extra = [
        line for line in text.splitlines() if line.strip() and not line.startswith(SERVE_BANNER)
    ]
    if extra:
        print(f"serve logged {len(extra)} more line(s): " + " | ".join(extra[:5]))


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_api",
        description="Load the read API (harmont-exec serve) while a build is recorded; compare "
        "requests/s with a bare FastAPI app. With --write: the write path (createBuild).",
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
    write = parser.add_argument_group(
        "the write path (--write)",
        "createBuild under load and the time until a build's job runs, beside `run`; "
        "--repeat and --json apply, the read options do not",
    )
    write.add_argument(
        "--write", action="store_true", help="measure the write path instead of the reads"
    )
    write.add_argument("--builds", type=int, default=100, help="createBuilds per round")
    write.add_argument("--clients", type=int, default=4, help="createBuilds in flight")
    write.add_argument(
        "--samples", type=int, default=5, help="samples of each start case per round"
    )
    write.add_argument(
        "--hold", type=float, default=0.5, help="busy case: seconds the slots stay held"
    )
    write.add_argument("--max-builds", type=int, default=2, help="serve --max-builds")
    write.add_argument(
        "--no-source", action="store_true", help="send createBuild without a source tarball"
    )
    args = parser.parse_args(argv)
    if args.write:
        if min(args.repeat, args.builds, args.clients, args.samples, args.max_builds) < 1:
            parser.error(
                "--repeat, --builds, --clients, --samples and --max-builds must be at least 1"
            )
        if args.hold < 0:
            parser.error("--hold must not be negative")
        reason = unavailable(write=True)
        if reason:
            print(f"skipping the API write benchmark: {reason}")
            return 0
        return write_main(args)
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
    report_server_log(server_log)
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
