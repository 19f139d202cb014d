"""The runner's semantics (SPEC §2-§4) with real subprocesses and a real SQLite store."""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
from itertools import pairwise
from pathlib import Path

import anyio
import pytest
from serving import TIMEOUT_S, alive, job_log

from executor import JobState
from executor.run.build import run_build
from executor.run.scheduler import BuildResult, RunOptions
from executor.states import TRANSITIONS, BuildState, Event
from executor.store import Store

pytestmark = pytest.mark.anyio
PY = sys.executable


def _write(tmp_path: Path, text: str, name: str = "build.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


async def _run(path: Path, store: Store, **options: object) -> BuildResult:
    with anyio.fail_after(60):
        return await run_build(path, store=store, options=RunOptions(**options))  # type: ignore[arg-type]


def _resolved(path: Path) -> str:
    return str(path.resolve())


def _events(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in path.read_text().splitlines()]  # type: ignore[misc]


def _assert_legal_history(store: Store, job_id: str) -> None:
    history = store.job_transitions(job_id)
    assert history[0].to_state is JobState.PENDING
    for row in history[1:]:
        assert TRANSITIONS[(row.from_state, Event(row.event))] is row.to_state, row
    assert history[-1].to_state.is_terminal
    assert not any(r.to_state.is_terminal for r in history[:-1])


# A job that appends "start KEY" and "end KEY" to events.log around its work.
MARK = f"{PY} mark.py"


@pytest.fixture(autouse=True)
def _mark_script(tmp_path: Path) -> None:
    (tmp_path / "mark.py").write_text(
        "import sys\n"
        "with open('events.log', 'a') as f:\n"
        "    f.write(' '.join(sys.argv[1:]) + chr(10))\n"
    )


async def test_run_starts_jobs_only_after_their_prerequisites(tmp_path: Path, store: Store) -> None:
    build = _write(
        tmp_path,
        f"""
        concurrency: 4
        steps:
          - {{key: a, command: '{MARK} start a && {MARK} end a'}}
          - {{key: b, command: '{MARK} start b && {MARK} end b', depends_on: a}}
          - {{key: c, command: '{MARK} start c && {MARK} end c', depends_on: a}}
          - {{key: d, command: '{MARK} start d && {MARK} end d', depends_on: [b, c]}}
    """,
    )
    result = await _run(build, store)
    assert result.state is BuildState.PASSED and result.exit_status == 0
    events = _events(tmp_path / "events.log")
    position = {e: n for n, e in enumerate(events)}
    for job, prerequisites in {"b": "a", "c": "a", "d": "bc"}.items():
        for p in prerequisites:
            assert position[("end", p)] < position[("start", job)]
    for job in result.jobs.values():
        _assert_legal_history(store, job.job_id)


# Job #N to start (numbered by arrived/N, claimed in turn) records "start KEY", fails at once if
# fewer than N - LIMIT jobs have ended (ended/ only grows: more than LIMIT ran at once), then
# waits, bounded, until job #N+LIMIT-1 has started (or all TOTAL have) and records "end KEY".
# So LIMIT jobs are running at every start after the first LIMIT, whatever the timing; a
# scheduler that runs fewer leaves a job waiting for one that cannot start: its bounded wait
# fails it, saying so, instead of hanging.
GATE = """\
import os, sys, time
key, limit, total, bound_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
with open('events.log', 'a') as f:
    f.write('start ' + key + chr(10))
n = 1
while True:
    try:
        open(os.path.join('arrived', str(n)), 'x').close()
        break
    except FileExistsError:
        n += 1
ended = len(os.listdir('ended'))
if ended < n - limit:
    sys.exit(f'{key}: job #{n} started while only {ended} had ended: over the limit {limit}')
want = min(total, n + limit - 1)
deadline = time.monotonic() + bound_s
while len(os.listdir('arrived')) < want:
    if time.monotonic() > deadline:
        got = len(os.listdir('arrived'))
        sys.exit(f'{key}: job #{n} waited {bound_s}s for job #{want} to start; {got} started')
    time.sleep(0.01)
with open('events.log', 'a') as f:
    f.write('end ' + key + chr(10))
open(os.path.join('ended', key), 'x').close()
"""


async def test_run_never_exceeds_the_concurrency_limit_and_reaches_it(
    tmp_path: Path, store: Store
) -> None:
    (tmp_path / "gate.py").write_text(GATE)
    (tmp_path / "arrived").mkdir()
    (tmp_path / "ended").mkdir()
    steps = "\n".join(
        f"  - {{key: j{n}, command: '{PY} gate.py j{n} 3 16 {TIMEOUT_S}'}}" for n in range(16)
    )
    build = _write(tmp_path, "steps:\n" + steps + "\n")
    with anyio.fail_after(2 * TIMEOUT_S):
        # fail_fast: a job that finds the limit broken (or never reached) ends the build.
        options = RunOptions(concurrency=3, fail_fast=True)
        result = await run_build(build, store=store, options=options)
    logs = {k: job_log(store, j.job_id) for k, j in result.jobs.items() if j.exit_code}
    assert result.state is BuildState.PASSED, logs
    running = peak = 0
    for kind, _ in _events(tmp_path / "events.log"):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 3  # never more (checked by each job as it started), and reached


async def test_run_retries_only_listed_exit_codes(tmp_path: Path, store: Store) -> None:
    build = _write(
        tmp_path,
        """
        steps:
          - key: flaky
            command: 'n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count; [ $n -ge 2 ]'
            retry_policy: {limit: 5, exit_codes: [1], backoff: {initial_seconds: 0}}
          - key: wrong-code
            command: exit 2
            retry_policy: {limit: 3, exit_codes: [1]}
    """,
    )
    result = await _run(build, store)
    flaky, wrong = result.jobs["flaky"], result.jobs["wrong-code"]
    assert (flaky.state, flaky.attempts) == (JobState.PASSED, 3)
    assert (wrong.state, wrong.attempts, wrong.exit_code) == (JobState.FAILED, 1, 2)
    attempts = store.list_attempts(flaky.job_id)
    assert [a.exit_code for a in attempts] == [1, 1, 0]
    assert store.get_job(flaky.job_id).retries_count == 2  # type: ignore[union-attr]
    _assert_legal_history(store, flaky.job_id)
    assert result.exit_status == 1


async def test_run_retry_waits_its_backoff(tmp_path: Path, store: Store) -> None:
    build = _write(
        tmp_path,
        """
        steps:
          - key: failing
            command: exit 1
            retry_policy: {limit: 2, backoff: {initial_seconds: 0.3, factor: 2, jitter: false}}
    """,
    )
    result = await _run(build, store)
    attempts = store.list_attempts(result.jobs["failing"].job_id)
    assert len(attempts) == 3
    gaps = [
        (later.started_at - earlier.finished_at).total_seconds()  # type: ignore[operator]
        for earlier, later in pairwise(attempts)
    ]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6


async def test_run_soft_failure_passes_the_build_and_runs_dependents(
    tmp_path: Path, store: Store
) -> None:
    build = _write(
        tmp_path,
        """
        steps:
          - {key: lint, command: exit 3, soft_fail_policy: {exit_codes: [3]}}
          - {key: test, command: 'true', depends_on: lint}
    """,
    )
    result = await _run(build, store)
    assert result.state is BuildState.PASSED and result.exit_status == 0
    lint = store.get_job(result.jobs["lint"].job_id)
    assert lint is not None and (lint.state, lint.soft_failed, lint.exit_code) == (
        JobState.FAILED,
        True,
        3,
    )
    assert result.jobs["test"].state is JobState.PASSED


async def test_run_skips_dependents_naming_the_root_cause(tmp_path: Path, store: Store) -> None:
    build = _write(
        tmp_path,
        """
        steps:
          - {key: compile, command: exit 4}
          - {key: test, command: 'true', depends_on: compile}
          - {key: package, command: 'true', depends_on: test}
          - {key: report, command: 'true', depends_on: package, allow_dependency_failure: true}
          - {type: wait, continue_on_failure: true}
          - {key: cleanup, command: 'true'}
    """,
    )
    result = await _run(build, store)
    assert result.state is BuildState.FAILED and result.exit_status == 1
    package = store.get_job(result.jobs["package"].job_id)
    assert package is not None and package.state is JobState.SKIPPED
    assert package.error_code == "dependency_failed"
    assert "'compile'" in (package.error_message or "")
    assert result.jobs["report"].state is JobState.PASSED
    assert result.jobs["cleanup"].state is JobState.PASSED


async def test_run_timeout_kills_a_term_trapping_child_and_its_grandchildren(
    tmp_path: Path, store: Store
) -> None:
    build = _write(
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
    result = await _run(build, store, grace_period_s=0.5)
    job = store.get_job(result.jobs["stuck"].job_id)
    assert job is not None and job.state is JobState.TIMED_OUT
    assert job.exit_code == 137  # SIGKILL after the grace period
    assert job.error_code == "job_timeout"
    assert result.state is BuildState.FAILED
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert not any(alive(pid) for pid in pids)
    _assert_legal_history(store, job.id)


async def test_run_build_timeout_times_out_every_job(tmp_path: Path, store: Store) -> None:
    build = _write(
        tmp_path,
        """
        timeout_seconds: 1
        steps:
          - {key: slow, command: 'sleep 1000'}
          - {key: after, command: 'true', depends_on: slow}
    """,
    )
    result = await _run(build, store, grace_period_s=0.5)
    assert result.state is BuildState.FAILED and result.error_code == "pipeline_timeout"
    assert result.exit_status == 124
    for job in result.jobs.values():
        row = store.get_job(job.job_id)
        assert row is not None and row.state is JobState.TIMED_OUT
        assert row.error_code == "pipeline_timeout"
    build_row = store.get_build_by_id(result.build_id)
    assert build_row is not None and build_row.error_code == "pipeline_timeout"


async def test_run_fail_fast_cancels_the_rest(tmp_path: Path, store: Store) -> None:
    build = _write(
        tmp_path,
        """
        steps:
          - {key: bad, command: exit 1}
          - {key: slow, command: 'sleep 1000'}
          - {key: later, command: 'true', depends_on: slow}
    """,
    )
    result = await _run(build, store, fail_fast=True, concurrency=2, grace_period_s=0.5)
    assert result.state is BuildState.FAILED and result.exit_status == 1
    assert result.jobs["slow"].state is JobState.CANCELED
    assert result.jobs["later"].state is JobState.CANCELED


async def test_run_output_survives_invalid_utf8_and_tens_of_megabytes(
    tmp_path: Path, store: Store
) -> None:
    script = tmp_path / "noise.py"
    script.write_text(
        "import random, sys\n"
        "rng = random.Random(7)\n"
        "for _ in range(24):\n"
        "    sys.stdout.buffer.write(rng.randbytes(1 << 20))\n"
        "sys.stderr.buffer.write(b'\\xff\\xfe not utf-8 \\xc3\\x28\\n')\n"
    )
    build = _write(tmp_path, f"steps:\n  - {{key: noisy, command: '{PY} noise.py'}}\n")
    result = await _run(build, store)
    job = result.jobs["noisy"]
    assert job.state is JobState.PASSED
    chunks = list(store.read_log(job.job_id))
    stdout = b"".join(c.content for c in chunks if c.stream == "stdout")
    stderr = b"".join(c.content for c in chunks if c.stream == "stderr")
    rng = __import__("random").Random(7)
    expected = b"".join(rng.randbytes(1 << 20) for _ in range(24))
    assert hashlib.sha256(stdout).digest() == hashlib.sha256(expected).digest()
    assert stderr == b"\xff\xfe not utf-8 \xc3\x28\n"


async def test_run_missing_command_fails_with_127(tmp_path: Path, store: Store) -> None:
    build = _write(tmp_path, "steps:\n  - {key: typo, command: no-such-command-here}\n")
    result = await _run(build, store)
    job = store.get_job(result.jobs["typo"].job_id)
    assert job is not None and (job.state, job.exit_code) == (JobState.FAILED, 127)
    assert b"not found" in job_log(store, job.id)


async def test_run_environment_working_dir_and_stdin(tmp_path: Path, store: Store) -> None:
    build = _write(
        tmp_path,
        """
        env: {LAYER: build, BUILD_ONLY: b}
        steps:
          - key: show
            env: {LAYER: step}
            command: |
              echo "$LAYER $BUILD_ONLY $HARMONT_STEP_KEY $HARMONT_ATTEMPT" \
                "$HARMONT_BUILD_NUMBER $HARMONT_JOB_ID"
              pwd; cat; echo "[$FROM_EXECUTOR]"
    """,
    )
    cwd = _resolved(tmp_path)
    result = await _run(build, store, base_env={**os.environ, "FROM_EXECUTOR": "yes"})
    job = result.jobs["show"]
    lines = job_log(store, job.job_id).decode().splitlines()
    assert lines[0] == f"step b show 1 {result.number} {job.job_id}"
    assert lines[1] == cwd
    assert lines[2] == "[yes]"  # `cat` read nothing: stdin is /dev/null


async def test_run_numbers_builds_per_pipeline(tmp_path: Path, store: Store) -> None:
    build = _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n", name="ci.yaml")
    first = await _run(build, store)
    second = await _run(build, store)
    assert (first.number, second.number) == (1, 2)
    assert first.pipeline == "ci" and first.org == "local"


async def test_run_job_that_cannot_start_fails_with_spawn_failed(
    tmp_path: Path, store: Store
) -> None:
    build = _write(tmp_path, "steps:\n  - {key: a, command: 'true'}\n")
    result = await _run(build, store, working_dir=tmp_path / "missing")
    job = store.get_job(result.jobs["a"].job_id)
    assert job is not None and job.state is JobState.FAILED
    assert job.error_code == "spawn_failed"
    assert "cannot start /bin/sh in" in (job.error_message or "")
    assert result.state is BuildState.FAILED and result.exit_status == 1
    _assert_legal_history(store, job.id)


class _LosesFirstAttempt:
    """A fake runner: the first attempt of every job is lost with its executor, the next pass."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def run(self, spec, *, on_start, on_output, stop):  # type: ignore[no-untyped-def]
        from executor.run.process import AttemptResult, Reason

        on_start()
        at = __import__("datetime").datetime.now(__import__("datetime").UTC)
        key = spec.env["HARMONT_STEP_KEY"]
        if key not in self.seen:
            self.seen.add(key)
            return AttemptResult(Reason.EXECUTOR_LOST, None, None, at, at, "worker gone")
        return AttemptResult(Reason.EXITED, 0, None, at, at)


async def test_run_lost_attempt_is_retried_only_by_a_policy_retrying_every_exit(
    tmp_path: Path, store: Store
) -> None:
    build = _write(
        tmp_path,
        """
        steps:
          - {key: star, command: 'true', retry_policy: {limit: 1}}
          - {key: listed, command: 'true', retry_policy: {limit: 1, exit_codes: [1]}}
          - {key: none, command: 'true'}
    """,
    )
    with anyio.fail_after(60):
        result = await run_build(build, store=store, runner=_LosesFirstAttempt())
    star = store.get_job(result.jobs["star"].job_id)
    assert star is not None and (star.state, star.retries_count) == (JobState.PASSED, 1)
    assert [a.outcome for a in store.list_attempts(star.id)] == ["executor_lost", "exited"]
    for key in ("listed", "none"):
        job = store.get_job(result.jobs[key].job_id)
        assert job is not None and (job.state, job.error_code) == (JobState.FAILED, "executor_lost")
        assert job.error_message == "worker gone"
    for job in result.jobs.values():
        _assert_legal_history(store, job.job_id)
