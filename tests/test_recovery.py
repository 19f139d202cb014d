"""Nothing lost when the executor dies (SPEC §5): a `harmont-exec run` process killed with
SIGKILL mid-build is found by the next command that opens the store, its build finished once
and correctly, its jobs' leftover processes killed; a live build is never touched."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from serving import TIMEOUT_S, assert_sound, cli, output, poll, poll_async, start, stop

from executor.api import create_app
from executor.load import load_plan
from executor.states import TRANSITIONS, Event, JobState
from executor.store import JobRow, Store, open_store
from executor.store.liveness import LOST_AFTER_S, process_identity

# `work` and `side` wait for a file `go`, each with a grandchild (`sleep 300`) in its process
# group: the kind of process a kill -9 of the executor leaves behind. `quick` passes first;
# `after` waits for both.
BUILD = {
    "steps": [
        {"key": "quick", "command": "echo quick"},
        {
            "key": "work",
            "command": "sleep 300 & echo started > started; while [ ! -e go ]; do sleep 0.05; done",
            "depends_on": "quick",
        },
        {
            "key": "side",
            "command": "sleep 300 & while [ ! -e go ]; do sleep 0.05; done",
            "depends_on": "quick",
        },
        {"key": "after", "command": "echo after", "depends_on": ["work", "side"]},
    ]
}


def job_processes(job_ids: set[str]) -> list[int]:
    """Pids of this user's processes that carry one of the jobs' HARMONT_JOB_ID."""
    wanted = {f"HARMONT_JOB_ID={j}".encode() for j in job_ids}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and not wanted.isdisjoint(environ.split(b"\0")):
            found.append(int(entry.name))
    return found


def assert_histories_are_legal(store: Store, build_id: str) -> None:
    """Every job's history is a path through THE transition table from `pending`, ending in
    the job's current state, seq 0, 1, 2... without gaps."""
    for job in store.list_jobs(build_id):
        history = store.job_transitions(job.id)
        assert [t.seq for t in history] == list(range(len(history))), job.step_key
        assert history[0].event == "created" and history[0].to_state is JobState.PENDING
        state = JobState.PENDING
        for step in history[1:]:
            assert step.from_state is state, (job.step_key, history)
            assert TRANSITIONS[(state, Event(step.event))] is step.to_state, (job.step_key, step)
            state = step.to_state
        assert state is job.state, job.step_key


@dataclass
class Killed:
    db: str  # a SQLite file or a PostgreSQL URL: every test that takes `killed` runs on both
    work: Path
    build_id: str
    job_ids: dict[str, str]


@pytest.fixture
def killed(tmp_path: Path, store_url: str) -> Iterator[Killed]:
    """A `run` process SIGKILLed while `work` and `side` run and `after` waits; reaped."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "b.json").write_text(json.dumps(BUILD))
    db = store_url
    out = tmp_path / "run"
    run = start(["run", "b.json", "--db", db, "-j", "4"], work, out)
    job_ids: dict[str, str] = {}
    try:
        poll(lambda: (work / "started").exists() or None, "the job to start", (run, out))

        def side_running() -> bool | None:
            with open_store(db, recover=False) as store:
                build = store.get_build(1)
                if build is None:
                    return None
                jobs = {j.step_key: j for j in store.list_jobs(build.id)}
            job_ids.update({k: j.id for k, j in jobs.items()})
            return True if jobs["side"].state is JobState.RUNNING else None

        poll(side_running, "the side job to run", (run, out))
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=TIMEOUT_S)  # reaped: no zombie that looks alive
        with open_store(db, recover=False) as store:
            build = store.get_build(1)
            assert build is not None
        yield Killed(db, work, build.id, job_ids)
    finally:
        stop(run)
        left = job_processes(set(job_ids.values()))
        for pid in left:
            os.kill(pid, signal.SIGKILL)


def test_recovery_kill_9_leaves_no_job_process_behind_without_another_command(
    killed: Killed,
) -> None:
    """The executor's watchdog kills its jobs' processes (their `sleep 300` grandchildren
    too) the moment it dies: no other harmont-exec command is run, and the record still says
    the build runs (nobody has looked at it yet)."""

    def gone() -> bool | None:
        return True if not job_processes(set(killed.job_ids.values())) else None

    poll(gone, "the killed run's job processes to be gone")
    with open_store(killed.db, recover=False) as store:
        build = store.get_build(1)
        assert build is not None and not build.state.is_terminal  # no command recovered it
    # The next command finishes the build and says how to resume it.
    result = cli("builds", "--db", killed.db, cwd=killed.work)
    assert result.returncode == 0, result.stderr
    assert "build_abandoned" in result.stderr
    assert "harmont-exec resume 1 --pipeline b" in result.stderr  # exact, copyable


def test_recovery_finishes_the_lost_build_as_the_spec_says(killed: Killed) -> None:
    with open_store(killed.db) as store:
        build = store.get_build_by_id(killed.build_id)
        assert build is not None
        assert build.state.value == "failed"
        assert build.error_code == "build_abandoned"
        assert build.finished_at is not None
        assert "stopped before the build ended" in (build.error_message or "")
        jobs = {j.step_key: j for j in store.list_jobs(killed.build_id)}
        assert jobs["quick"].state is JobState.PASSED  # finished jobs keep their results
        for key in ("work", "side"):
            assert jobs[key].state is JobState.FAILED
            assert jobs[key].error_code == "executor_lost"
            (attempt,) = store.list_attempts(jobs[key].id)
            assert attempt.outcome == "executor_lost" and attempt.finished_at is not None
        assert jobs["after"].state is JobState.CANCELED
        assert jobs["after"].error_code == "build_abandoned"
        assert_histories_are_legal(store, killed.build_id)
        assert_sound(store)


def test_recovery_happens_once_when_several_processes_notice_at_once(killed: Killed) -> None:
    code = (  # four processes look for lost builds at once; each prints what it finished
        "import sys, json; from datetime import UTC, datetime; "
        "from executor.store import open_store; "
        "s = open_store(sys.argv[1], recover=False); "
        "print(json.dumps([b.number for b in s.recover_lost_builds(datetime.now(UTC))])); "
        "s.close()"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, killed.db],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    finished = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err
        finished.extend(json.loads(out))
    assert finished == [1]  # exactly one of them finished build #1
    with open_store(killed.db) as store:
        for job_id in (killed.job_ids["work"], killed.job_ids["side"]):
            events = [t.event for t in store.job_transitions(job_id)]
            assert events.count("executor_lost") == 1
        assert_histories_are_legal(store, killed.build_id)


SHARED = {  # each build's jobs wait for `go`, so that two builds are surely running together
    "steps": [
        {
            "key": f"job{i}",
            "command": "while [ ! -e ../go ]; do sleep 0.05; done; echo $HARMONT_BUILD_NUMBER",
        }
        for i in range(6)
    ]
    + [{"key": "last", "command": "echo last", "depends_on": [f"job{i}" for i in range(6)]}]
}


def test_two_executors_running_one_pipeline_at_once_share_the_store(
    tmp_path: Path, store_url: str
) -> None:
    runs = []
    try:
        for name in ("a", "b"):
            work = tmp_path / name
            work.mkdir()
            (work / "ci.json").write_text(json.dumps(SHARED))
            args = ["run", "ci.json", "--db", store_url, "--pipeline", "shared", "-j", "3"]
            runs.append((start(args, work, tmp_path / f"{name}.out"), tmp_path / f"{name}.out"))

        def both_running() -> bool | None:
            with open_store(store_url, recover=False) as store:
                builds = store.list_builds(pipeline="shared")
                running = [
                    b
                    for b in builds
                    if sum(j.state is JobState.RUNNING for j in store.list_jobs(b.id)) == 3
                ]
            return True if len(running) == 2 else None

        poll(both_running, "both builds to run three jobs each", *runs)
        (tmp_path / "go").touch()
        for run, out in runs:
            assert run.wait(timeout=TIMEOUT_S) == 0, output(out)
    finally:
        for run, _ in runs:
            stop(run)
    with open_store(store_url) as store:
        builds = store.list_builds(pipeline="shared")
        assert sorted(b.number for b in builds) == [1, 2]
        assert {b.working_dir for b in builds} == {str(tmp_path / "a"), str(tmp_path / "b")}
        for build in builds:
            assert (build.state.value, build.error_code) == ("passed", None)
            jobs = store.list_jobs(build.id)
            assert [j.state for j in jobs] == [JobState.PASSED] * 7
            for job in jobs[:6]:  # each job's log is its own build's
                log = b"".join(c.content for c in store.read_log(job.id))
                assert log == f"{build.number}\n".encode()
            assert_histories_are_legal(store, build.id)
        assert_sound(store)


def test_recovery_never_touches_a_live_build(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "b.json").write_text(json.dumps(BUILD))
    db = tmp_path / "harmont.db"
    out = tmp_path / "run"
    run = start(["run", "b.json", "--db", str(db)], work, out)
    try:

        def work_running() -> bool | None:
            with open_store(db, recover=False) as store:
                build = store.get_build(1)
                if build is None:
                    return None
                states = {j.step_key: j.state for j in store.list_jobs(build.id)}
            return True if states["work"] is JobState.RUNNING else None

        poll(work_running, "the job to run", (run, out))
        with open_store(db) as store:  # recovery runs here, and must leave it alone
            build = store.get_build(1)
            assert build is not None and not build.state.is_terminal
            jobs = {j.step_key: j.state for j in store.list_jobs(build.id)}
        assert jobs["work"] is JobState.RUNNING
        run.send_signal(signal.SIGTERM)  # its own end: a graceful cancel, not an abandonment
        assert run.wait(timeout=TIMEOUT_S) == 130, output(out)
        with open_store(db) as store:
            build = store.get_build(1)
            assert build is not None
            assert (build.state.value, build.error_code) == ("canceled", None)
    finally:
        stop(run)


def _recorded_build(tmp_path: Path) -> tuple[Path, str]:
    """A build recorded by this process (its executor is this test), still `scheduled`."""
    (tmp_path / "b.json").write_text(json.dumps(BUILD))
    db = tmp_path / "harmont.db"
    with open_store(db) as store:
        created = store.create_build(
            org="local",
            pipeline="b",
            plan=load_plan(tmp_path / "b.json"),
            build_file=None,
            working_dir=str(tmp_path),
            now=datetime.now(UTC),
        )
    return db, created.id


def _set(db: Path, build_id: str, **columns: object) -> None:
    """Rewrite the build's executor columns, as another host or process would have them."""
    with sqlite3.connect(db) as raw:
        for name, value in columns.items():
            raw.execute(f"UPDATE builds SET {name} = ? WHERE id = ?", (value, build_id))


def _state(db: Path, build_id: str, *, recover: bool = True) -> str:
    with open_store(db, recover=recover) as store:
        build = store.get_build_by_id(build_id)
        assert build is not None
        return build.state.value


def test_recovery_of_a_build_on_another_host_waits_for_a_stale_heartbeat(tmp_path: Path) -> None:
    db, build_id = _recorded_build(tmp_path)
    now = datetime.now(UTC)
    fresh = (now - timedelta(seconds=LOST_AFTER_S / 2)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    _set(db, build_id, executor_host="elsewhere.example", executor_pid=1, heartbeat_at=fresh)
    assert _state(db, build_id) == "scheduled"  # alive as far as anyone here can tell
    stale = (now - timedelta(seconds=LOST_AFTER_S + 5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    _set(db, build_id, heartbeat_at=stale)
    assert _state(db, build_id) == "failed"


def test_recovery_sees_through_a_reused_pid(tmp_path: Path) -> None:
    db, build_id = _recorded_build(tmp_path)
    assert _state(db, build_id) == "scheduled"  # its executor (this process) is alive
    identity = process_identity()
    assert identity is not None
    boot, pid, _ = identity.split("/")
    # The same pid, alive, but started at another time: another process wearing the pid.
    _set(db, build_id, executor_id=f"{boot}/{pid}/1")
    assert _state(db, build_id) == "failed"


def test_recovery_after_a_reboot(tmp_path: Path) -> None:
    db, build_id = _recorded_build(tmp_path)
    identity = process_identity()
    assert identity is not None
    _, pid, start_ticks = identity.split("/")
    _set(db, build_id, executor_id=f"00000000-0000-0000-0000-000000000000/{pid}/{start_ticks}")
    assert _state(db, build_id) == "failed"


def test_heartbeat_is_recorded_while_a_build_runs(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        "steps:\n  - {key: w, command: 'while [ ! -e go ]; do sleep 0.05; done'}\n"
    )
    db = tmp_path / "harmont.db"
    out = tmp_path / "run"
    run = start(["run", "b.yaml", "--db", str(db)], tmp_path, out)
    try:

        def beat() -> datetime | None:
            with open_store(db, recover=False) as store:
                build = store.get_build(1)
                if build is None or build.heartbeat_at is None:
                    return None
                return build.heartbeat_at if build.heartbeat_at > build.created_at else None

        first = poll(beat, "a heartbeat after the build's creation", (run, out))

        def later() -> datetime | None:
            now = beat()
            return now if now is not None and now > first else None

        # Nothing changes state while the job waits: only the heartbeat timer can write this.
        second = poll(later, "a later heartbeat", (run, out))
        assert second > first
        (tmp_path / "go").touch()
        assert run.wait(timeout=TIMEOUT_S) == 0, output(out)
    finally:
        stop(run)


# --- resume -----------------------------------------------------------------------------------


def test_resume_runs_the_lost_jobs_again_and_keeps_the_finished_ones(killed: Killed) -> None:
    (killed.work / "go").touch()  # this time the waiting jobs can finish
    result = cli("resume", "1", "--db", str(killed.db), cwd=killed.work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "build #1 passed" in result.stdout
    with open_store(killed.db) as store:
        build = store.get_build_by_id(killed.build_id)
        assert build is not None
        assert (build.state.value, build.error_code, build.error_message) == ("passed", None, None)
        jobs = {j.step_key: j for j in store.list_jobs(killed.build_id)}
        assert all(j.state is JobState.PASSED for j in jobs.values())
        attempts = {k: [a.outcome for a in store.list_attempts(j.id)] for k, j in jobs.items()}
        assert attempts == {
            "quick": ["exited"],  # kept, not run again
            "work": ["executor_lost", "exited"],  # the lost attempt stays in the history
            "side": ["executor_lost", "exited"],
            "after": ["exited"],  # never started before
        }
        events = [t.event for t in store.job_transitions(jobs["after"].id)]
        assert events[:3] == ["created", "cancel_requested", "resumed"]
        assert_histories_are_legal(store, killed.build_id)
        assert_sound(store)


def test_resume_is_refused_for_a_live_build(tmp_path: Path) -> None:
    db, _ = _recorded_build(tmp_path)  # its executor, this test, is alive
    result = cli("resume", "1", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 2  # refused: exit 2, as a bad argument
    assert "is scheduled: its executor (pid" in result.stderr
    assert "resume continues only a build whose executor is gone" in result.stderr


def test_resume_is_refused_for_a_build_that_finished_by_itself(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text("steps:\n  - {key: a, command: 'true'}\n")
    assert cli("run", "ok.yaml", cwd=tmp_path).returncode == 0
    result = cli("resume", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "finished by itself (passed)" in result.stderr
    assert "harmont-exec retry 1 --pipeline ok" in result.stderr


# --- kill -9 at random points, property-style -------------------------------------------------

# Parallel jobs, retries (each `flaky` fails its first attempt), jobs that leave a background
# process in their group, a wait barrier; `last` waits for a file `go` that the test creates
# only after the kill, so the build cannot end before any kill point: every kill lands
# mid-build, whatever the machine's speed.
CHAOS = {
    "steps": [
        *(
            {
                "key": f"flaky{i}",
                "command": 'sleep 0.1; test "$HARMONT_ATTEMPT" -ge 2',
                "retry_policy": {"limit": 2, "exit_codes": [1], "backoff": {"initial_seconds": 0}},
            }
            for i in range(4)
        ),
        *(
            {"key": f"bg{i}", "command": "sleep 30 & sleep 0.2; echo bg", "depends_on": "flaky0"}
            for i in range(3)
        ),
        "wait",
        {"key": "join", "command": "echo join"},
        {
            "key": "last",
            "command": "while [ ! -e go ]; do sleep 0.05; done",
            "depends_on": "join",
        },
    ]
}
CHAOS_ROWS_BEFORE_GO = 56
"""History rows CHAOS records before `last` waits for `go`, whatever the order: the 9 jobs'
created, ready, slot_acquired, started and end, 3 more for each `flaky` job's retry
(retry_scheduled, slot_acquired, started), but not the end of `last`."""
KILLED = "killed mid-build"


def _transitions_recorded(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as raw:
            return int(raw.execute("SELECT COUNT(*) FROM job_transitions").fetchone()[0])
    except sqlite3.Error:
        return 0  # not created yet


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kill_after=st.integers(min_value=9, max_value=CHAOS_ROWS_BEFORE_GO),
    jobs=st.sampled_from(["2", "4"]),
)
def _kill_9_then_resume(
    tmp_path_factory: pytest.TempPathFactory, outcomes: list[str], kill_after: int, jobs: str
) -> None:
    """Kill -9 `run` once the store holds ``kill_after`` history rows (9 are the jobs'
    creation): the next start finishes it legally and kills its leftovers, and `resume`
    completes it. How the kill landed goes into ``outcomes``."""
    work = tmp_path_factory.mktemp("chaos")
    (work / "b.json").write_text(json.dumps(CHAOS))
    db = work / "harmont.db"
    out = work / "run"
    run = start(["run", "b.json", "--db", str(db), "-j", jobs], work, out)
    try:
        poll(
            lambda: (
                True if _transitions_recorded(db) >= kill_after or run.poll() is not None else None
            ),
            f"{kill_after} history rows",
        )
        run.kill()
        run.wait(timeout=TIMEOUT_S)
        with open_store(db) as store:  # the next start: recovery
            build = store.get_build(1)
            assert build is not None
            assert build.state.is_terminal
            assert_sound(store)
            assert_histories_are_legal(store, build.id)
            job_ids = {j.id for j in store.list_jobs(build.id)}
            abandoned = build.error_code == "build_abandoned"
        outcome = KILLED if abandoned else f"ended {build.state.value} before the kill"
        event(outcome)
        note(f"kill after {kill_after} rows, -j {jobs}: {outcome}")
        outcomes.append(outcome)
        poll(lambda: True if not job_processes(job_ids) else None, "no leftover job process")
        if not abandoned:
            assert build.state.value == "passed"  # it ended before the kill
            return
        (work / "go").touch()  # this time `last` can finish
        resumed = cli("resume", "1", "--db", str(db), cwd=work)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        with open_store(db) as store:
            build = store.get_build(1)
            assert build is not None and build.state.value == "passed"
            assert_histories_are_legal(store, build.id)
            assert_sound(store)
        assert not job_processes(job_ids)
    finally:
        stop(run)


def test_recovery_kill_9_at_any_point_then_resume_completes_the_build(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The property above, and that it tested something: a kill that came after the build
    had ended would pass it without testing recovery. CHAOS cannot end before the kill, so
    every example must have killed it mid-build."""
    outcomes: list[str] = []
    _kill_9_then_resume(tmp_path_factory=tmp_path_factory, outcomes=outcomes)
    hit = outcomes.count(KILLED)
    print(f"kill points: {hit} of {len(outcomes)} examples killed the build mid-build")
    assert outcomes and hit == len(outcomes), f"only {hit} of {len(outcomes)}: {outcomes}"


# --- disk trouble -------------------------------------------------------------------------------

DISK_BUILD = """\
steps:
  - {key: before, command: echo recorded-before}
  - key: talk
    command: 'echo started > started; sleep 300 & while [ ! -e go ]; do echo tick; sleep 0.05; done'
    depends_on: before
  - {key: other, command: 'sleep 300', depends_on: before}
  - {key: never, command: 'echo never', depends_on: [talk, other]}
"""


# The build of DISK_BUILD in a child process (as `harmont-exec run` would be), with a write
# failure injected at the store boundary once `talk` runs: as root, permissions cannot make a
# file read-only, and a full disk cannot be had without a mount; a PRAGMA on the writer's
# connection (tests/faults.py wraps the backend) makes every later commit fail as those would
# ("database or disk is full", "attempt to write a readonly database").
DISK_CHILD = """
import sys, anyio, executor
from pathlib import Path
work, db, statement = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, sys.argv[4])
from faults import open_faulty_store
store, faults = open_faulty_store(db)

async def main():
    async with anyio.create_task_group() as tg:
        async def inject():
            while not (work / "started").exists():
                await anyio.sleep(0.02)
            store.flush()
            faults.inject(statement)
        tg.start_soon(inject)
        await executor.run_build(work / "b.yaml", store=store)

failed = None
try:
    anyio.run(main)
except* executor.StoreError as group:  # raised in this script's own task group
    failed = group.exceptions[0]
if failed is not None:
    print(failed, file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize(
    ("statement", "error", "recorded"),
    [
        # A file that cannot grow (as a full disk; state changes still fit in its pages): the
        # build is stopped and recorded as stopped.
        ("PRAGMA max_page_count = 1", "the disk is full.*recorded as stopped", "record_failed"),
        # A file turned read-only: nothing more can be written; the next start finds the build
        # abandoned.
        ("PRAGMA query_only = 1", "readonly.*make the database file", "build_abandoned"),
    ],
    ids=["full", "read-only"],
)
def test_disk_trouble_mid_build_stops_the_jobs_and_loses_nothing_recorded(
    tmp_path: Path, statement: str, error: str, recorded: str
) -> None:
    (tmp_path / "b.yaml").write_text(DISK_BUILD)
    db = tmp_path / "harmont.db"
    tests = str(Path(__file__).parent)  # where the child finds faults.py
    child = subprocess.run(
        [sys.executable, "-c", DISK_CHILD, str(tmp_path), str(db), statement, tests],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert child.returncode == 1, child.stdout + child.stderr
    message = child.stderr.strip().splitlines()[-1]
    assert re.search(error, message), message
    assert "`harmont-exec resume 1 --pipeline b` runs" in message  # exact, copyable
    with open_store(db) as again:  # the next start: the build is resumable
        assert_sound(again)
        build = again.get_build(1)
        assert build is not None
        assert (build.state.value, build.error_code) == ("failed", recorded)
        jobs = {j.step_key: j for j in again.list_jobs(build.id)}
        assert jobs["before"].state is JobState.PASSED  # recorded before: kept
        log = b"".join(c.content for c in again.read_log(jobs["before"].id))
        assert log == b"recorded-before\n"
        assert_histories_are_legal(again, build.id)
        # The jobs were stopped by the run itself (their leftovers too), not by recovery.
        assert not job_processes({j.id for j in jobs.values()})


# --- retry ------------------------------------------------------------------------------------

RETRY_BUILD = """\
steps:
  - {key: a, command: 'echo a > a.txt', artifact_paths: ['a.txt']}
  - {key: b, command: 'echo "b ran"; test -e fixed', depends_on: a}
  - {key: c, command: 'echo c', depends_on: b}
  - {key: d, command: 'echo d'}
"""


def test_retry_failed_runs_only_what_did_not_pass_and_reuses_the_rest(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RETRY_BUILD)
    assert cli("run", "r.yaml", cwd=tmp_path).returncode == 1  # b fails, c is skipped
    (tmp_path / "fixed").touch()
    result = cli("retry", "1", "--failed", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "build #2 passed" in result.stdout
    with open_store(tmp_path / ".harmont" / "harmont.db") as store:
        first, second = store.get_build(1), store.get_build(2)
        assert first is not None and second is not None
        assert second.message == "retry of build #1 (failed jobs only)"
        old = {j.step_key: j for j in store.list_jobs(first.id)}
        new = {j.step_key: j for j in store.list_jobs(second.id)}
        assert all(j.state is JobState.PASSED for j in new.values())
        for key in ("a", "d"):  # passed in #1: reused, not run
            assert new[key].reused_from_job_id == old[key].id
            assert store.list_attempts(new[key].id) == []
            assert [t.event for t in store.job_transitions(new[key].id)] == ["created", "reused"]
            assert (new[key].started_at, new[key].finished_at) == (
                old[key].started_at,
                old[key].finished_at,
            )
        for key in ("b", "c"):  # failed or skipped in #1: run
            assert new[key].reused_from_job_id is None
            assert len(store.list_attempts(new[key].id)) == 1
        (artifact,) = store.list_artifacts(job_id=new["a"].id)  # the result's artifacts too
        (original,) = store.list_artifacts(job_id=old["a"].id)
        assert (artifact.path, artifact.sha256) == (original.path, original.sha256)
        assert artifact.id != original.id
        assert_histories_are_legal(store, second.id)
    listing = cli("jobs", "2", cwd=tmp_path)
    assert "reused from build #1" in listing.stdout


def test_retry_without_failed_runs_every_job_again(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RETRY_BUILD)
    (tmp_path / "fixed").touch()
    assert cli("run", "r.yaml", cwd=tmp_path).returncode == 0
    result = cli("retry", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with open_store(tmp_path / ".harmont" / "harmont.db") as store:
        second = store.get_build(2)
        assert second is not None and second.message == "retry of build #1"
        for job in store.list_jobs(second.id):
            assert job.reused_from_job_id is None
            assert len(store.list_attempts(job.id)) == 1


def test_retry_is_refused_for_a_build_still_running(tmp_path: Path) -> None:
    db, _ = _recorded_build(tmp_path)  # scheduled, its executor (this test) alive
    result = cli("retry", "1", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 2
    assert "is scheduled; retry a build once it has finished" in result.stderr


@pytest.mark.anyio
async def test_a_running_api_server_finishes_lost_builds_too(tmp_path: Path) -> None:
    db, build_id = _recorded_build(tmp_path)
    identity = process_identity()
    assert identity is not None
    boot, pid, _ = identity.split("/")
    app = create_app(db=db, recover_every_s=0.05)  # its own open already looked: alive then
    _set(db, build_id, executor_id=f"{boot}/{pid}/1")  # now its executor is "gone"
    with anyio.fail_after(TIMEOUT_S):
        async with app.router.lifespan_context(app):
            # Read without recovering (this check must not do the server's work).
            await poll_async(
                lambda: True if _state(db, build_id, recover=False) == "failed" else None,
                "the server to finish the lost build",
            )


def _kill_mid_build(tmp_path: Path, text: str, ready: Callable[[JobRow], bool]) -> Path:
    """Run ``text`` as b.yaml, SIGKILL the run once its first job, as recorded, is ``ready``,
    reap it; return the database."""
    (tmp_path / "b.yaml").write_text(text)
    db = tmp_path / "harmont.db"
    out = tmp_path / "run"
    run = start(["run", "b.yaml", "--db", str(db)], tmp_path, out)

    def recorded() -> bool | None:
        with open_store(db, recover=False) as store:
            build = store.get_build(1)
            jobs = store.list_jobs(build.id) if build is not None else []
        return True if jobs and ready(jobs[0]) else None

    try:
        poll(recorded, "the job to be where the test kills the run", (run, out))
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=TIMEOUT_S)
    finally:
        stop(run)
    return db


def test_resume_of_a_build_whose_jobs_were_all_lost_is_running_from_its_first_start(
    tmp_path: Path,
) -> None:
    db = _kill_mid_build(
        tmp_path,
        "steps:\n  - {key: w, command: 'while [ ! -e go ]; do sleep 0.05; done'}\n",
        lambda job: job.state is JobState.RUNNING,
    )
    with open_store(db) as store:
        before = store.get_build(1)
        assert before is not None and before.started_at is not None
    (tmp_path / "go").touch()
    result = cli("resume", "1", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "build scheduled" not in result.stdout  # it never goes back to scheduled
    assert "retry after" not in result.stdout  # a resumed job is not a retry
    with open_store(db) as store:
        after = store.get_build(1)
        assert after is not None and after.state.value == "passed"
        assert after.started_at == before.started_at  # the build's duration is its whole life


def test_recovery_of_a_job_waiting_to_retry_says_so(tmp_path: Path) -> None:
    db = _kill_mid_build(
        tmp_path,
        "steps:\n"
        "  - key: flaky\n"
        "    command: 'exit 3'\n"
        "    retry_policy: {limit: 3, exit_codes: [3], backoff: {initial_seconds: 300}}\n",
        lambda job: job.retries_count == 1,  # attempt 1 failed: it waits out its backoff
    )
    with open_store(db) as store:
        build = store.get_build(1)
        assert build is not None
        (job,) = store.list_jobs(build.id)
    assert (job.state.value, job.error_code) == ("canceled", "build_abandoned")
    assert (job.error_message or "").startswith("waiting to retry (after attempt 1)")


def test_resume_is_refused_when_no_job_can_run_again(tmp_path: Path) -> None:
    db, build_id = _recorded_build(tmp_path)
    # An abandoned build whose every job had ended (here: never started, then finished).
    with open_store(db) as store:
        jobs = store.list_jobs(build_id)
    _set(db, build_id, state="failed", error_code="build_abandoned")
    with sqlite3.connect(db) as raw:
        for job in jobs:
            raw.execute("UPDATE jobs SET state = 'skipped' WHERE id = ?", (job.id,))
    result = cli("resume", "1", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 2
    assert "has no job to run again" in result.stderr and "harmont-exec retry 1" in result.stderr


def test_retry_warns_when_the_build_file_changed_since(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("steps:\n  - {key: a, command: 'exit 1'}\n")
    assert cli("run", "r.yaml", cwd=tmp_path).returncode == 1
    (tmp_path / "r.yaml").write_text("steps:\n  - {key: a, command: 'exit 0'}\n")
    result = cli("retry", "1", "--failed", cwd=tmp_path)
    assert result.returncode == 1  # the recorded plan ran: still `exit 1`
    assert "build_file_changed" in result.stderr
    assert "harmont-exec run" in result.stderr
