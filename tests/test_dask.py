"""The Dask executor (SPEC §8) on real Dask clusters on 127.0.0.1, with real subprocesses and a
real SQLite store: the run semantics recorded exactly as the local executor records them,
timeouts and cancels that kill the remote process group, live output, resources, a worker
killed mid-job, the command line, and real `dask scheduler` / `dask worker` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import absent

from executor import JobState, RunOptions, load_plan, open_dask_runner, run_build
from executor.run.process import ProcessRunner
from executor.run.scheduler import BuildResult, Scheduler
from executor.states import BuildState
from executor.store import Store, open_store

try:
    import distributed
except ImportError:  # pragma: no cover - CI installs the test extra, which has it
    absent(
        "the `distributed` package is not installed, so the Dask executor is not tested: "
        "pip install -e '.[test]' (or 'harmont-exec[dask]')",
        allow_module_level=True,
    )

from serving import TIMEOUT_S, alive, cli, free_port, job_log, poll, poll_async

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RUNNERS = ["local", "dask"]


# --- clusters --------------------------------------------------------------------------------


def _cluster(**kwargs: Any) -> distributed.LocalCluster:
    """Two single-threaded worker processes (each with a nanny) on 127.0.0.1, no dashboard
    (its HTTP server, which is there anyway, on a free port)."""
    options = {"dashboard_address": ":0", "allowed_failures": 0}
    kwargs["scheduler_kwargs"] = {**options, **kwargs.get("scheduler_kwargs", {})}
    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        **kwargs,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The shared cluster; its workers offer cpus=1 each. Yields the scheduler's address."""
    with _cluster(resources={"cpus": 1}) as c:
        yield c.scheduler_address


@asynccontextmanager
async def _runner(kind: str, address: str) -> AsyncIterator[ProcessRunner | None]:
    if kind == "local":
        yield None
        return
    async with open_dask_runner(address) as runner:
        yield runner


# --- helpers -----------------------------------------------------------------------------------


def _write(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "build.yaml"
    path.write_text(textwrap.dedent(text))
    return path


async def _run(kind: str, address: str, path: Path, store: Store, **options: Any) -> BuildResult:
    with anyio.fail_after(TIMEOUT_S):
        async with _runner(kind, address) as runner:
            return await run_build(path, store=store, runner=runner, options=RunOptions(**options))


def _pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()]


def _wait_gone(pids: list[int]) -> None:
    poll(lambda: None if any(alive(p) for p in pids) else True, f"processes {pids} to be gone")


def _record(store: Store, result: BuildResult) -> dict[str, tuple[Any, ...]]:
    """What the store says of each job and its attempts (nothing that depends on timing)."""
    out = {}
    for key, job in result.jobs.items():
        row = store.get_job(job.job_id)
        assert row is not None
        attempts = tuple(
            (a.number, a.outcome, a.exit_code) for a in store.list_attempts(job.job_id)
        )
        out[key] = (
            row.state.value,
            row.exit_code,
            row.retries_count,
            row.soft_failed,
            row.error_code,
            attempts,
            job_log(store, job.job_id),
        )
    return out


# --- the same semantics as the local executor --------------------------------------------------

SEMANTICS = """
    env: {LAYER: build}
    concurrency: 4
    steps:
      - key: a
        command: 'echo "start a" >> events.log; echo out-a; echo "end a" >> events.log'
      - key: b
        depends_on: a
        env: {LAYER: step}
        command: |
          echo "start b" >> events.log
          echo "$LAYER $HARMONT_STEP_KEY $HARMONT_ATTEMPT $(basename "$(pwd)")"; cat
          echo oops >&2
      - key: flaky
        depends_on: a
        command: |
          n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count
          echo try $n; [ $n -ge 2 ]
        retry_policy: {limit: 5, exit_codes: [1], backoff: {initial_seconds: 0}}
      - key: wrong-code
        command: exit 2
        retry_policy: {limit: 3, exit_codes: [1]}
      - {key: lint, command: 'echo warn; exit 3', soft_fail_policy: {exit_codes: [3]}}
      - {key: after-lint, command: 'true', depends_on: lint}
      - {key: compile, command: exit 4}
      - {key: test, command: 'true', depends_on: compile}
      - {key: report, command: 'echo r', depends_on: test, allow_dependency_failure: true}
      - {key: typo, command: no-such-command-here}
"""


@pytest.mark.anyio
async def test_dask_records_the_same_results_as_the_local_executor(
    tmp_path: Path, cluster: str
) -> None:
    records = {}
    for kind in RUNNERS:
        directory = tmp_path / kind / "work"
        path = _write(directory, SEMANTICS)
        with open_store(tmp_path / kind / "h.db") as store:
            result = await _run(kind, cluster, path, store)
            assert result.state is BuildState.FAILED and result.exit_status == 1
            records[kind] = _record(store, result)
            events = (directory / "events.log").read_text().splitlines()
            assert events.index("end a") < events.index("start b")
    local, dask = records["local"], records["dask"]
    typo = dask.pop("typo"), local.pop("typo")  # the shell's message names the command only
    assert typo[0][:6] == typo[1][:6] == ("failed", 127, 0, False, None, ((1, "exited", 127),))
    assert dask == local
    assert local["flaky"][:6] == (
        "passed",
        0,
        2,
        False,
        None,
        ((1, "exited", 1), (2, "exited", 1), (3, "exited", 0)),
    )
    assert local["b"][6] == b"step b 1 work\noops\n"  # stdin was /dev/null: cat read nothing
    assert local["lint"][:5] == ("failed", 3, 0, True, None)
    assert local["after-lint"][0] == local["report"][0] == "passed"
    assert local["test"][:5] == ("skipped", None, 0, False, "dependency_failed")
    assert local["wrong-code"][5] == ((1, "exited", 2),)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", RUNNERS)
async def test_dask_timeout_kills_the_remote_process_group(
    kind: str, tmp_path: Path, store: Store, cluster: str
) -> None:
    path = _write(
        tmp_path,
        """
        steps:
          - key: stuck
            timeout_seconds: 1
            command: |
              trap '' TERM
              sleep 1000 &
              echo $$ $! > pids
              wait
        """,
    )
    result = await _run(kind, cluster, path, store, grace_period_s=0.5)
    job = store.get_job(result.jobs["stuck"].job_id)
    assert job is not None and job.state is JobState.TIMED_OUT
    assert (job.exit_code, job.error_code) == (137, "job_timeout")  # SIGKILL after the grace
    assert [a.outcome for a in store.list_attempts(job.id)] == ["timed_out"]
    _wait_gone(_pids(tmp_path / "pids"))


@pytest.mark.anyio
@pytest.mark.parametrize("kind", RUNNERS)
async def test_dask_cancel_stops_running_and_waiting_jobs(
    kind: str, tmp_path: Path, store: Store, cluster: str
) -> None:
    # Two jobs run (one per worker) and a third waits for a worker in Dask's queue.
    steps = "\n".join(
        f"  - {{key: {k}, command: 'sleep 1000 & echo $! > {k}.pid; wait'}}" for k in "abc"
    )
    path = _write(tmp_path, "concurrency: 3\nsteps:\n" + steps + "\n")
    plan = load_plan(path)
    created = store.create_build(
        org="local",
        pipeline="cancel",
        plan=plan,
        build_file=str(path),
        working_dir=str(tmp_path),
        branch=None,
        commit=None,
        message=None,
        now=datetime.now(UTC),
    )
    with anyio.fail_after(TIMEOUT_S):
        async with _runner(kind, cluster) as runner:
            scheduler = Scheduler(
                plan, store, created, runner=runner, options=RunOptions(grace_period_s=0.5)
            )
            async with anyio.create_task_group() as tg:
                done: list[BuildResult] = []

                async def go() -> None:
                    done.append(await scheduler.run())

                tg.start_soon(go)
                pidfiles = [tmp_path / "a.pid", tmp_path / "b.pid"]
                await poll_async(lambda: all(p.exists() for p in pidfiles) or None, "a and b")
                scheduler.cancel()
    result = done[0]
    assert result.state is BuildState.CANCELED and result.exit_status == 130
    assert {j.state for j in result.jobs.values()} == {JobState.CANCELED}
    pidfiles = sorted(tmp_path.glob("*.pid"))  # noqa: ASYNC240  (the build is over)
    _wait_gone([pid for p in pidfiles for pid in _pids(p)])  # whatever started is gone
    if kind == "dask":  # c waited in Dask's queue: it never starts, even as a and b free
        # their workers' threads (every worker refuses it before a and b are stopped)
        assert [p.stem for p in pidfiles] == ["a", "b"]
        assert store.list_attempts(created.job_ids["c"]) == []  # and it has no attempt


@pytest.mark.anyio
@pytest.mark.parametrize("kind", RUNNERS)
async def test_dask_output_reaches_the_log_while_the_job_runs(
    kind: str, tmp_path: Path, store: Store, cluster: str
) -> None:
    path = _write(
        tmp_path,
        """
        steps:
          - key: talk
            command: |
              echo first
              while [ ! -e go ]; do sleep 0.02; done
              echo second >&2
        """,
    )
    with anyio.fail_after(TIMEOUT_S):
        async with _runner(kind, cluster) as runner, anyio.create_task_group() as tg:
            done: list[BuildResult] = []

            async def go() -> None:
                done.append(await run_build(path, store=store, runner=runner))

            tg.start_soon(go)

            def first_chunk() -> bytes | None:
                builds = store.list_builds(limit=1)
                if not builds:
                    return None
                jobs = store.list_jobs(builds[0].id)
                log = job_log(store, jobs[0].id) if jobs else b""
                return log or None

            assert await poll_async(first_chunk, "the first chunk") == b"first\n"
            assert store.list_jobs(store.list_builds(limit=1)[0].id)[0].state is JobState.RUNNING
            (tmp_path / "go").touch()
    job = done[0].jobs["talk"]
    assert job.state is JobState.PASSED
    chunks = [(c.stream, c.content) for c in store.read_log(job.job_id)]
    assert chunks == [("stdout", b"first\n"), ("stderr", b"second\n")]


@pytest.mark.anyio
async def test_dask_output_keeps_order_and_every_byte(
    tmp_path: Path, store: Store, cluster: str
) -> None:
    script = tmp_path / "noise.py"
    script.write_text(
        "import random, sys\n"
        "rng = random.Random(7)\n"
        "for _ in range(8):\n"
        "    sys.stdout.buffer.write(rng.randbytes(1 << 20)); sys.stdout.flush()\n"
        "sys.stderr.buffer.write(b'\\xff\\xfe not utf-8\\n')\n"
    )
    path = _write(tmp_path, f"steps:\n  - {{key: noisy, command: '{PY} noise.py'}}\n")
    result = await _run("dask", cluster, path, store)
    job = result.jobs["noisy"]
    assert job.state is JobState.PASSED
    chunks = list(store.read_log(job.job_id))
    rng = __import__("random").Random(7)
    expected = b"".join(rng.randbytes(1 << 20) for _ in range(8))
    assert b"".join(c.content for c in chunks if c.stream == "stdout") == expected
    assert chunks[-1].content == b"\xff\xfe not utf-8\n"


# --- resources ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_dask_step_runs_on_a_worker_with_its_resources(
    tmp_path: Path, store: Store, cluster: str
) -> None:
    path = _write(
        tmp_path,
        """
        steps:
          - {key: one-cpu, command: 'echo ran', resources: {cpus: 1}}
          - {key: too-many, command: 'echo never', resources: {cpus: 2}}
          - {key: gpu, command: 'echo never', resources: {gpus: 1}}
        """,
    )
    result = await _run("dask", cluster, path, store)
    assert result.jobs["one-cpu"].state is JobState.PASSED
    assert job_log(store, result.jobs["one-cpu"].job_id) == b"ran\n"
    for key, wanted in (("too-many", "cpus=2"), ("gpu", "gpus=1")):
        row = store.get_job(result.jobs[key].job_id)
        assert row is not None and (row.state, row.error_code) == (JobState.FAILED, "spawn_failed")
        assert f"needs resources {wanted}, which no worker of the Dask cluster offers" in (
            row.error_message or ""
        )
        assert f"--resources {wanted}" in (row.error_message or "")


@pytest.mark.anyio
async def test_dask_local_executor_ignores_resources(tmp_path: Path, store: Store) -> None:
    path = _write(tmp_path, "steps:\n  - {key: a, command: 'true', resources: {gpus: 8}}\n")
    result = await _run("local", "", path, store)
    assert result.jobs["a"].state is JobState.PASSED


# --- a worker lost mid-job ---------------------------------------------------------------------

LOSE_ONCE = """
    steps:
      - key: work
        command: |
          echo "$HARMONT_ATTEMPT" >> starts.log
          if [ "$HARMONT_ATTEMPT" = 1 ]; then
            sleep 1000 & echo $! > sleep.pid
            echo $PPID > worker.pid
            wait
          fi
          echo done
"""


async def _run_and_kill_worker(address: str, path: Path, store: Store) -> BuildResult:
    """Run ``path``; when its first attempt writes worker.pid, SIGKILL that worker process."""
    marker = path.parent / "worker.pid"
    with anyio.fail_after(TIMEOUT_S):
        async with open_dask_runner(address) as runner, anyio.create_task_group() as tg:
            done: list[BuildResult] = []

            async def go() -> None:
                done.append(await run_build(path, store=store, runner=runner))

            tg.start_soon(go)
            worker = await poll_async(lambda: (marker.exists() and _pids(marker)) or None, "worker")
            assert worker[0] != os.getpid()  # the job runs in a worker process, not here
            os.kill(worker[0], signal.SIGKILL)
    return done[0]


@pytest.mark.anyio
async def test_dask_lost_worker_fails_the_attempt_executor_lost(
    tmp_path: Path, store: Store
) -> None:
    path = _write(tmp_path, LOSE_ONCE)
    with _cluster() as c:
        result = await _run_and_kill_worker(c.scheduler_address, path, store)
    row = store.get_job(result.jobs["work"].job_id)
    assert row is not None and (row.state, row.error_code) == (JobState.FAILED, "executor_lost")
    assert "went away" in (row.error_message or "")
    assert [(a.outcome, a.exit_code) for a in store.list_attempts(row.id)] == [
        ("executor_lost", None)
    ]
    assert result.exit_status == 1
    assert (tmp_path / "starts.log").read_text() == "1\n"
    _wait_gone(_pids(tmp_path / "sleep.pid"))  # the worker's watchdog killed the lost job


@pytest.mark.anyio
async def test_dask_lost_worker_is_retried_by_a_retry_policy_and_never_rerun_by_dask(
    tmp_path: Path, store: Store
) -> None:
    path = _write(
        tmp_path,
        LOSE_ONCE + "        retry_policy: {limit: 1, backoff: {initial_seconds: 0}}\n",
    )
    # The scheduler's default allowed-failures (3): Dask itself tries the task again on the
    # other worker; the attempt's claim makes that run refuse to start the command.
    with _cluster(scheduler_kwargs={"allowed_failures": 3}) as c:
        result = await _run_and_kill_worker(c.scheduler_address, path, store)
    row = store.get_job(result.jobs["work"].job_id)
    assert row is not None and (row.state, row.retries_count) == (JobState.PASSED, 1)
    assert [(a.outcome, a.exit_code) for a in store.list_attempts(row.id)] == [
        ("executor_lost", None),
        ("exited", 0),
    ]
    assert (tmp_path / "starts.log").read_text() == "1\n2\n"  # attempt 1 started once
    assert job_log(store, row.id).endswith(b"done\n")
    _wait_gone(_pids(tmp_path / "sleep.pid"))


# --- the command line --------------------------------------------------------------------------


def test_dask_cli_executor_dask_without_a_scheduler_is_a_usage_error(tmp_path: Path) -> None:
    _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    env = {k: v for k, v in os.environ.items() if k != "HARMONT_DASK_SCHEDULER"}
    result = cli("run", "build.yaml", "--executor", "dask", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--executor dask needs the Dask scheduler's address" in result.stderr
    assert "HARMONT_DASK_SCHEDULER" in result.stderr
    assert not (tmp_path / ".harmont").exists()


@pytest.mark.parametrize("command", [["run", "build.yaml"], ["resume", "1"], ["retry", "1"]])
def test_dask_cli_scheduler_without_executor_dask_is_a_usage_error(
    tmp_path: Path, command: list[str]
) -> None:
    _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    result = cli(*command, "--scheduler", "tcp://127.0.0.1:8786", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--scheduler tcp://127.0.0.1:8786 is only used by --executor dask" in result.stderr


def test_dask_cli_scheduler_from_the_environment_is_ignored_by_the_local_executor(
    tmp_path: Path,
) -> None:
    _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    env = {**os.environ, "HARMONT_DASK_SCHEDULER": "tcp://127.0.0.1:1"}
    result = cli("run", "build.yaml", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dask_cli_unreachable_scheduler_names_it_and_says_what_to_start(tmp_path: Path) -> None:
    _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "HARMONT_DASK_SCHEDULER": address}
    result = cli("run", "build.yaml", "--executor", "dask", cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot reach the Dask scheduler at '{address}' within 10s" in result.stderr
    assert f"`dask worker {address} --nthreads 1`" in result.stderr
    assert "Traceback" not in result.stderr
    store_file = tmp_path / ".harmont" / "harmont.db"
    if store_file.exists():  # nothing recorded: it connects before it records the build
        with open_store(store_file) as store:
            assert store.list_builds() == []


def test_dask_cli_malformed_scheduler_address_is_a_usage_error(tmp_path: Path) -> None:
    _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    result = cli(
        "run", "build.yaml", "--executor", "dask", "--scheduler", "127.0.0.1", cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'127.0.0.1' is not a Dask scheduler address; use the form tcp://HOST:PORT" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and "RuntimeWarning" not in result.stderr


def test_dask_cli_without_distributed_says_what_to_install(tmp_path: Path) -> None:
    _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    code = (
        "import sys; sys.modules['distributed'] = None\n"  # as if it were not installed
        "from executor.cli import main; sys.argv = ['harmont-exec', 'run', 'build.yaml', "
        "'--executor', 'dask', '--scheduler', 'tcp://127.0.0.1:8786']; main()"
    )
    result = subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT_S
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--executor dask needs the `distributed` package" in result.stderr
    assert "pip install 'harmont-exec[dask]'" in result.stderr


def test_dask_import_executor_and_a_local_run_never_load_dask(tmp_path: Path) -> None:
    _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    code = (
        "import sys, executor\n"
        "result = executor.run_build_sync('build.yaml', db='h.db')\n"
        "assert result.exit_status == 0, result\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "print('loaded:', loaded)\n"
    )
    result = subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "loaded: []"


# --- real `dask scheduler` and `dask worker` processes -----------------------------------------


def _dask_cli(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as log:
        return subprocess.Popen(
            [str(Path(PY).parent / "dask"), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[str]:
    """`dask scheduler` and one `dask worker` on a free loopback port, as the README starts
    them; yields the scheduler's address once the worker has joined."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env_config = tmp_path / "dask-scheduler.log"
    scheduler = _dask_cli(
        ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], env_config
    )
    worker = None
    try:
        worker = _dask_cli(
            ["worker", address, "--nthreads", "1", "--no-dashboard", "--resources", "cpus=2"],
            tmp_path / "dask-worker.log",
        )

        def joined() -> bool | None:
            assert scheduler.poll() is None, env_config.read_text()
            return "Register worker" in env_config.read_text() or None

        poll(joined, "the Dask worker to join the scheduler")
        yield address
    finally:
        if worker is not None:
            _terminate(worker)
        _terminate(scheduler)


def test_dask_cli_runs_an_example_on_real_dask_processes(
    tmp_path: Path, dask_processes: str
) -> None:
    db = tmp_path / "h.db"
    result = cli(
        "run",
        str(EXAMPLES / "python-ci.yaml"),
        "--db",
        str(db),
        "--executor",
        "dask",
        "--scheduler",
        dask_processes,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout.splitlines()[-1]
    local = cli("run", str(EXAMPLES / "python-ci.yaml"), "--db", str(db), cwd=tmp_path)
    assert local.returncode == 0, local.stdout + local.stderr
    with open_store(db) as store:
        first, second = sorted(store.list_builds(limit=2), key=lambda b: b.number)
        assert first.state is second.state is BuildState.PASSED
        jobs = [store.list_jobs(b.id) for b in (first, second)]
        assert [(j.step_key, j.state, j.exit_code, j.retries_count) for j in jobs[0]] == [
            (j.step_key, j.state, j.exit_code, j.retries_count) for j in jobs[1]
        ]


def test_dask_attempt_is_stopped_when_its_executor_dies(tmp_path: Path, cluster: str) -> None:
    # The job and a background child write their pids, then wait; the `run` that submitted it
    # is killed -9, so nobody will record what it does: the worker must stop it by itself (no
    # harmont-exec command runs on this host meanwhile to clean up orphans).
    path = _write(
        tmp_path,
        "steps:\n  - key: long\n    command: 'sleep 300 & echo $! $$ > pids.tmp; "
        "mv pids.tmp pids; wait'\n",
    )
    out = tmp_path / "run.out"
    args = ["run", str(path), "--db", str(tmp_path / "h.db"), "--executor", "dask"]
    with out.open("wb") as log:
        run = subprocess.Popen(
            [PY, "-m", "executor", *args, "--scheduler", cluster],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def started() -> bool | None:
            assert run.poll() is None, out.read_text()
            return True if (tmp_path / "pids").exists() else None

        poll(started, "the job to write its pids")
        pids = _pids(tmp_path / "pids")
        assert all(alive(p) for p in pids)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=TIMEOUT_S)
        _wait_gone(pids)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
