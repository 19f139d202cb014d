"""The scheduler's retry, soft-fail and cascade rules, one behaviour per test (docs/mutation.md:
each test here kills mutants the broader scheduler tests let survive)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
import structlog
from faults import open_faulty_store
from hypothesis import given
from hypothesis import strategies as st

from executor import (
    Backoff,
    BuildState,
    JobState,
    RetryPolicy,
    StepSpec,
    build_plan,
    parse_build_text,
)
from executor.errors import ErrorCode, RecordFailedError
from executor.run.job import Job, Outcome, retry_delay
from executor.run.process import AttemptResult, AttemptSpec, Reason, StopRequest
from executor.run.scheduler import BuildResult, JobResult, JobUpdate, RunOptions, Scheduler
from executor.states import Event
from executor.store import Store, open_store

# --- THE retry rule and how an attempt's end moves a job (executor.run.job): pure ------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _job(state: JobState = JobState.RUNNING, **step: object) -> Job:
    return Job("a", "job-a", StepSpec.model_validate({"key": "a", "command": "x", **step}), state)


def _ended(exit_code: int | None, reason: Reason = Reason.EXITED) -> AttemptResult:
    return AttemptResult(reason, exit_code, None, T0, T0 + timedelta(seconds=1))


RETRY_ANY = {"retry_policy": {"limit": 3}}


def test_job_retry_wanted_never_retries_a_passing_attempt() -> None:
    assert not _job(**RETRY_ANY).retry_wanted(1, _ended(0), stopping=False)


def test_job_retry_wanted_never_retries_an_attempt_that_could_not_start() -> None:
    job = _job(**RETRY_ANY)
    assert not job.retry_wanted(1, _ended(None, Reason.SPAWN_FAILED), stopping=False)


def test_job_retry_wanted_never_retries_a_canceled_attempt() -> None:
    job = _job(JobState.CANCELING, **RETRY_ANY)
    assert not job.retry_wanted(1, _ended(143, Reason.CANCELED), stopping=False)


def test_job_retry_wanted_retries_a_timeout_only_while_the_build_goes_on() -> None:
    job = _job(JobState.TIMING_OUT, retry_policy={"limit": 3, "on_timeout": True})
    timed_out = _ended(143, Reason.TIMED_OUT)
    assert job.retry_wanted(1, timed_out, stopping=False)
    assert not job.retry_wanted(1, timed_out, stopping=True)


def test_job_retry_wanted_takes_a_missing_exit_code_as_255() -> None:
    assert _job(retry_policy={"limit": 1, "exit_codes": [255]}).retry_wanted(
        1, _ended(None), stopping=False
    )
    assert not _job(retry_policy={"limit": 1, "exit_codes": [1]}).retry_wanted(
        1, _ended(None), stopping=False
    )


@pytest.mark.parametrize(
    ("state", "reason", "retry", "event"),
    [
        (JobState.RUNNING, Reason.EXECUTOR_LOST, True, Event.RETRY_SCHEDULED),
        (JobState.RUNNING, Reason.EXECUTOR_LOST, False, Event.EXECUTOR_LOST),
        (JobState.CANCELING, Reason.CANCELED, False, Event.PROCESS_GONE),
        (JobState.TIMING_OUT, Reason.TIMED_OUT, False, Event.PROCESS_GONE),
        (JobState.TIMING_OUT, Reason.TIMED_OUT, True, Event.RETRY_SCHEDULED),
        (JobState.RUNNING, Reason.EXITED, True, Event.RETRY_SCHEDULED),
    ],
    ids=str,
)
def test_job_outcome_keeps_the_attempts_exit_code(
    state: JobState, reason: Reason, retry: bool, event: Event
) -> None:
    outcome = _job(state, **RETRY_ANY).outcome(_ended(7, reason), [], retry=retry)
    assert (outcome.event, outcome.exit_code) == (event, 7)


def test_job_outcome_of_a_passing_attempt_records_exit_code_zero() -> None:
    assert _job().outcome(_ended(0), [], retry=False) == Outcome(
        Event.EXITED_ZERO, 0, False, None, None
    )


def test_job_outcome_takes_a_missing_exit_code_as_255() -> None:
    assert _job().outcome(_ended(None), [], retry=False) == Outcome(
        Event.EXITED_NONZERO, 255, False, None, None
    )


@pytest.mark.parametrize(
    ("failures", "message"),
    [(["a.txt"], "a.txt"), (["a.txt", "b.txt"], "a.txt (and 1 more)")],
)
def test_job_outcome_fails_a_job_whose_artifacts_could_not_be_kept(
    failures: list[str], message: str
) -> None:
    job = _job(soft_fail_policy=True)  # a hard failure all the same: the files are lost
    assert job.outcome(_ended(3), failures, retry=False) == Outcome(
        Event.ARTIFACT_UPLOAD_FAILED, 3, False, ErrorCode.ARTIFACT_UPLOAD_FAILED, message
    )


def test_retry_delay_grows_by_its_factor_up_to_its_maximum() -> None:
    policy = RetryPolicy(
        limit=5, backoff=Backoff(initial_seconds=1, factor=2, max_seconds=5, jitter=False)
    )
    assert [retry_delay(policy, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]


@given(
    initial=st.floats(0, 10),
    factor=st.floats(1, 4),
    attempt=st.integers(1, 5),
)
def test_retry_delay_jitter_stays_between_zero_and_the_backoff(
    initial: float, factor: float, attempt: int
) -> None:
    backoff = Backoff(initial_seconds=initial, factor=factor, jitter=False)
    plain = retry_delay(RetryPolicy(limit=5, backoff=backoff), attempt)
    jittered = retry_delay(
        RetryPolicy(limit=5, backoff=backoff.model_copy(update={"jitter": True})), attempt
    )
    assert 0 <= jittered <= plain


# --- the scheduler, driven by a scripted fake runner over a real SQLite store ---------------

HANG = -1  # the attempt runs until the scheduler stops it


class ScriptedRunner:
    """Each job's attempts exit with the codes its script lists (the last one repeats; HANG
    waits until the scheduler stops the attempt, then calls ``on_hang`` / ``on_stop``).
    ``files``: what a job writes into its working directory."""

    def __init__(
        self,
        script: Mapping[str, Sequence[int]] | None = None,
        *,
        signal: int | None = None,
        files: Mapping[str, Mapping[str, bytes]] | None = None,
    ) -> None:
        self.script = script or {}
        self.signal = signal
        self.files = files or {}
        self.on_hang: Callable[[str], None] = lambda key: None
        self.on_stop: Callable[[str], None] = lambda key: None
        self.started: list[str] = []  # the keys of the attempts run, in order

    async def run(
        self,
        spec: AttemptSpec,
        *,
        on_start: Callable[[], None],
        on_output: Callable[..., None],
        stop: StopRequest,
    ) -> AttemptResult:
        key = spec.env["HARMONT_STEP_KEY"]
        self.started.append(key)
        plays = self.script.get(key, [0])
        code = plays[min(int(spec.env["HARMONT_ATTEMPT"]), len(plays)) - 1]
        started_at = datetime.now(UTC)
        on_start()
        for name, content in self.files.get(key, {}).items():
            (spec.cwd / name).write_bytes(content)
        await anyio.lowlevel.checkpoint()
        reason = Reason.EXITED
        if code == HANG:
            self.on_hang(key)
            await stop.requested.wait()
            self.on_stop(key)
            code, reason = 143, stop.reason or Reason.CANCELED
        return AttemptResult(reason, code, self.signal, started_at, datetime.now(UTC))


def _scheduler(
    store: Store,
    tmp_path: Path,
    steps: str,
    runner: ScriptedRunner,
    *,
    shown: list[JobUpdate] | None = None,
    **options: object,
) -> Scheduler:
    plan = build_plan(parse_build_text(f"steps:\n{steps}"))
    created = store.create_build(
        org="local",
        pipeline="p",
        plan=plan,
        build_file=None,
        working_dir=str(tmp_path),
        now=datetime.now(UTC),
    )
    return Scheduler(
        plan,
        store,
        created,
        options=RunOptions(working_dir=tmp_path, **options),  # type: ignore[arg-type]
        runner=runner,
        on_change=None if shown is None else shown.append,
    )


async def _run(scheduler: Scheduler) -> BuildResult:
    with anyio.fail_after(10):
        return await scheduler.run()


RETRIED = "  - {key: a, command: x, retry_policy: {limit: 1, backoff: {initial_seconds: 0}}}\n"


@pytest.mark.anyio
async def test_scheduler_records_a_jobs_start_at_its_first_attempt(
    store: Store, tmp_path: Path
) -> None:
    result = await _run(_scheduler(store, tmp_path, RETRIED, ScriptedRunner({"a": [1, 0]})))
    job_id = result.jobs["a"].job_id
    starts = [t.at for t in store.job_transitions(job_id) if t.to_state is JobState.RUNNING]
    assert len(starts) == 2
    assert store.get_job(job_id).started_at == starts[0]  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_scheduler_shows_each_job_change_at_its_recorded_time(
    store: Store, tmp_path: Path
) -> None:
    shown: list[JobUpdate] = []
    runner = ScriptedRunner({"a": [1, 0]})
    result = await _run(_scheduler(store, tmp_path, RETRIED, runner, shown=shown))
    history = store.job_transitions(result.jobs["a"].job_id)[1:]  # after "created"
    assert [(u.state, u.at) for u in shown if u.key == "a"] == [
        (t.to_state.value, t.at) for t in history
    ]


@pytest.mark.anyio
async def test_scheduler_shows_the_attempt_each_change_belongs_to(
    store: Store, tmp_path: Path
) -> None:
    shown: list[JobUpdate] = []
    await _run(_scheduler(store, tmp_path, RETRIED, ScriptedRunner({"a": [1, 0]}), shown=shown))
    assert [(u.state, u.attempt) for u in shown if u.key == "a"] == [
        ("scheduled", 0),
        ("assigned", 0),
        ("running", 1),
        ("scheduled", 1),  # the retry
        ("assigned", 1),
        ("running", 2),
        ("passed", 2),
    ]


@pytest.mark.anyio
async def test_scheduler_shows_attempt_zero_when_a_resumed_job_becomes_ready(
    store: Store, tmp_path: Path
) -> None:
    shown: list[JobUpdate] = []
    scheduler = _scheduler(store, tmp_path, RETRIED, ScriptedRunner(), shown=shown)
    job_id = scheduler.build.job_ids["a"]
    scheduler = Scheduler(
        scheduler.plan,
        store,
        scheduler.build,
        options=scheduler.options,
        runner=scheduler.runner,
        on_change=shown.append,
        prior={"a": JobResult("a", job_id, JobState.PENDING, attempts=2)},
        state=BuildState.RUNNING,
    )
    await _run(scheduler)
    assert [(u.state, u.attempt) for u in shown if u.key == "a"][:3] == [
        ("scheduled", 0),
        ("assigned", 2),
        ("running", 3),
    ]


@pytest.mark.anyio
async def test_scheduler_fail_fast_on_resume_stops_after_a_failure_recorded_before(
    store: Store, tmp_path: Path
) -> None:
    steps = "  - {key: a, command: x}\n  - {key: b, command: x}\n"
    first = _scheduler(store, tmp_path, steps, ScriptedRunner())
    ids = first.build.job_ids
    runner = ScriptedRunner()
    scheduler = Scheduler(
        first.plan,
        store,
        first.build,
        options=RunOptions(working_dir=tmp_path, fail_fast=True),
        runner=runner,
        prior={"a": JobResult("a", ids["a"], JobState.FAILED, exit_code=1)},
        state=BuildState.RUNNING,
    )
    result = await _run(scheduler)
    assert runner.started == []
    assert (result.jobs["b"].state, result.jobs["b"].error_code) == (
        JobState.CANCELED,
        ErrorCode.BUILD_CANCELED,
    )
    assert result.jobs["b"].error_message == "--fail-fast: 'a' failed"
    assert result.state is BuildState.FAILED


SOFT_HARD_SKIPPED = """\
  - {key: soft, command: x, soft_fail_policy: {exit_codes: [3]}}
  - {key: hard, command: x}
  - {key: after, command: x, depends_on: hard}
"""


@pytest.mark.anyio
async def test_scheduler_shows_the_result_each_change_records(store: Store, tmp_path: Path) -> None:
    shown: list[JobUpdate] = []
    runner = ScriptedRunner({"a": [1, 0], "soft": [3], "hard": [4]})
    result = await _run(
        _scheduler(store, tmp_path, RETRIED + SOFT_HARD_SKIPPED, runner, shown=shown)
    )
    last = {u.key: u for u in shown if u.key is not None}
    for key, job in result.jobs.items():
        row = store.get_job(job.job_id)
        assert row is not None
        assert (last[key].exit_code, last[key].soft_failed, last[key].error_message) == (
            row.exit_code,
            row.soft_failed,
            row.error_message,
        )
    assert (last["soft"].exit_code, last["soft"].soft_failed) == (3, True)
    assert last["after"].error_message == "skipped because 'hard' failed"
    retry = [u for u in shown if u.key == "a" and u.state == "scheduled"][1]
    assert retry.exit_code == 1


@pytest.mark.anyio
async def test_scheduler_rolls_the_build_up_to_running_at_its_first_start(
    store: Store, tmp_path: Path
) -> None:
    shown: list[JobUpdate] = []
    steps = "  - {key: a, command: x}\n"
    result = await _run(_scheduler(store, tmp_path, steps, ScriptedRunner(), shown=shown))
    assert [u.state for u in shown if u.key is None] == ["running", "passed"]
    build = store.get_build_by_id(result.build_id)
    assert build is not None
    assert build.started_at == store.get_job(result.jobs["a"].job_id).started_at  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_scheduler_records_the_build_failing_when_its_first_job_fails(
    store: Store, tmp_path: Path
) -> None:
    shown: list[JobUpdate] = []
    steps = (
        "  - {key: a, command: x}\n"
        "  - {key: b, command: x, depends_on: a, allow_dependency_failure: true}\n"
    )
    runner = ScriptedRunner({"a": [1]})
    result = await _run(_scheduler(store, tmp_path, steps, runner, shown=shown))
    builds = [(u.state, u.at) for u in shown if u.key is None]
    assert [state for state, _ in builds] == ["running", "failing", "failed"]
    failed = store.get_job(result.jobs["a"].job_id)
    assert failed is not None and builds[1][1] == failed.finished_at


@pytest.mark.anyio
async def test_scheduler_records_the_build_finished_when_its_last_job_ends(
    store: Store, tmp_path: Path
) -> None:
    steps = "  - {key: a, command: x}\n  - {key: b, command: x, depends_on: a}\n"
    result = await _run(_scheduler(store, tmp_path, steps, ScriptedRunner()))
    build = store.get_build_by_id(result.build_id)
    last = store.get_job(result.jobs["b"].job_id)
    assert build is not None and last is not None
    assert build.finished_at == last.finished_at


INDEPENDENT = "  - {key: a, command: x, soft_fail_policy: true}\n  - {key: b, command: x}\n"


@pytest.mark.anyio
async def test_scheduler_fail_fast_ignores_a_soft_failure(store: Store, tmp_path: Path) -> None:
    runner = ScriptedRunner({"a": [3]})
    scheduler = _scheduler(store, tmp_path, INDEPENDENT, runner, fail_fast=True, concurrency=1)
    result = await _run(scheduler)
    assert result.state is BuildState.PASSED
    assert result.jobs["b"].state is JobState.PASSED


@pytest.mark.anyio
async def test_scheduler_fail_fast_names_the_failed_job_in_what_it_cancels(
    store: Store, tmp_path: Path
) -> None:
    steps = "  - {key: a, command: x}\n  - {key: b, command: x}\n"
    runner = ScriptedRunner({"a": [1]})
    scheduler = _scheduler(store, tmp_path, steps, runner, fail_fast=True, concurrency=1)
    result = await _run(scheduler)
    canceled = result.jobs["b"]
    assert (canceled.state, canceled.error_message) == (
        JobState.CANCELED,
        "--fail-fast: 'a' failed",
    )


CHAIN = """\
  - {key: a, command: x}
  - {key: b, command: x, depends_on: a}
  - {key: c, command: x, depends_on: b}
"""


@pytest.mark.anyio
async def test_scheduler_cancel_cascade_names_the_canceled_prerequisite(
    store: Store, tmp_path: Path
) -> None:
    runner = ScriptedRunner({"a": [HANG]})
    scheduler = _scheduler(store, tmp_path, CHAIN, runner)
    runner.on_hang = lambda key: scheduler.cancel("stop it")
    result = await _run(scheduler)
    b, c = result.jobs["b"], result.jobs["c"]
    assert (b.state, b.error_code, b.error_message) == (
        JobState.CANCELED,
        ErrorCode.BUILD_CANCELED,
        "stop it",
    )
    assert (c.state, c.error_code, c.error_message) == (
        JobState.CANCELED,
        ErrorCode.BUILD_CANCELED,
        "canceled because 'b' was canceled",
    )


@pytest.mark.anyio
async def test_scheduler_cascade_passes_record_failed_on_to_dependents(tmp_path: Path) -> None:
    store, faults = open_faulty_store(tmp_path / "h.db")

    def fill() -> None:
        store.flush()
        faults.inject("PRAGMA max_page_count = 1")
        store.append_log(job_a, 1, "stdout", b"x" * 100_000, at=datetime.now(UTC))

    runner = ScriptedRunner({"a": [HANG]})  # fills the record's disk once it runs
    runner.on_hang = lambda key: fill()
    scheduler = _scheduler(store, tmp_path, CHAIN, runner)
    job_a = scheduler.build.job_ids["a"]
    with pytest.raises(RecordFailedError):
        await _run(scheduler)
    store.close()
    with open_store(tmp_path / "h.db") as again:
        jobs = {j.step_key: j for j in again.list_jobs(scheduler.build.id)}
    assert (jobs["c"].state, jobs["c"].error_code) == (JobState.CANCELED, ErrorCode.RECORD_FAILED)


@pytest.mark.anyio
async def test_scheduler_interrupt_leaves_every_unfinished_job_resumable(
    store: Store, tmp_path: Path
) -> None:
    runner = ScriptedRunner({"a": [HANG]})
    scheduler = _scheduler(store, tmp_path, CHAIN, runner)
    runner.on_hang = lambda key: scheduler.interrupt("serve is stopping")
    result = await _run(scheduler)
    assert {k: j.error_code for k, j in result.jobs.items()} == dict.fromkeys(
        "abc", ErrorCode.BUILD_ABANDONED
    )


@pytest.mark.anyio
async def test_scheduler_records_the_signal_that_ended_an_attempt(
    store: Store, tmp_path: Path
) -> None:
    runner = ScriptedRunner({"a": [137]}, signal=9)
    result = await _run(_scheduler(store, tmp_path, "  - {key: a, command: x}\n", runner))
    (attempt,) = store.list_attempts(result.jobs["a"].job_id)
    assert (attempt.exit_code, attempt.signal) == (137, 9)


@pytest.mark.anyio
async def test_scheduler_records_an_attempts_end_at_the_time_it_ended(
    store: Store, tmp_path: Path
) -> None:
    result = await _run(_scheduler(store, tmp_path, RETRIED, ScriptedRunner({"a": [1, 2]})))
    job_id = result.jobs["a"].job_id
    ends = [a.finished_at for a in store.list_attempts(job_id)]
    ending = ("retry_scheduled", "exited_nonzero")
    moves = [(t.event, t.at) for t in store.job_transitions(job_id) if t.event in ending]
    assert moves == [("retry_scheduled", ends[0]), ("exited_nonzero", ends[1])]


@pytest.mark.anyio
async def test_scheduler_logs_one_line_per_finished_attempt(store: Store, tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        scheduler = _scheduler(store, tmp_path, RETRIED, ScriptedRunner({"a": [1, 0]}))
        await _run(scheduler)
    finished = [e for e in logs if e["event"] == "attempt_finished"]
    assert [(e["job"], e["attempt"], e["reason"], e["exit_code"]) for e in finished] == [
        ("a", 1, "exited", 1),
        ("a", 2, "exited", 0),
    ]


@pytest.mark.anyio
async def test_scheduler_logs_each_retry_with_the_next_attempt_and_its_delay(
    store: Store, tmp_path: Path
) -> None:
    steps = (
        "  - key: a\n    command: x\n"
        "    retry_policy: {limit: 1, backoff: {initial_seconds: 0.0123456, jitter: false}}\n"
    )
    with structlog.testing.capture_logs() as logs:
        await _run(_scheduler(store, tmp_path, steps, ScriptedRunner({"a": [1, 0]})))
    retries = [e for e in logs if e["event"] == "retry_scheduled"]
    assert [(e["job"], e["attempt"], e["delay_s"]) for e in retries] == [("a", 2, 0.012)]


TIMES_OUT = "  - key: t\n    command: x\n    timeout_seconds: 0.05\n"


@pytest.mark.anyio
async def test_scheduler_retries_a_timed_out_attempt_when_its_policy_says_on_timeout(
    store: Store, tmp_path: Path
) -> None:
    steps = TIMES_OUT + "    retry_policy: {limit: 1, on_timeout: true}\n"
    result = await _run(_scheduler(store, tmp_path, steps, ScriptedRunner({"t": [HANG, 0]})))
    assert (result.jobs["t"].state, result.jobs["t"].attempts) == (JobState.PASSED, 2)


@pytest.mark.anyio
async def test_scheduler_does_not_retry_a_timeout_that_ends_while_the_build_stops(
    store: Store, tmp_path: Path
) -> None:
    steps = TIMES_OUT + "    retry_policy: {limit: 3, on_timeout: true}\n"
    runner = ScriptedRunner({"t": [HANG]})
    scheduler = _scheduler(store, tmp_path, steps, runner)
    runner.on_stop = lambda key: scheduler.cancel("stop it")  # while the job is timing out
    result = await _run(scheduler)
    assert (result.jobs["t"].state, result.jobs["t"].attempts) == (JobState.TIMED_OUT, 1)


@pytest.mark.anyio
async def test_scheduler_fails_a_passing_job_whose_artifact_cannot_be_kept(
    store: Store, tmp_path: Path
) -> None:
    steps = "  - {key: a, command: x, artifact_paths: [big.bin]}\n"
    runner = ScriptedRunner(files={"a": {"big.bin": b"x" * 100}})
    result = await _run(_scheduler(store, tmp_path, steps, runner, max_artifact_bytes=10))
    job = result.jobs["a"]
    assert (job.state, job.exit_code, job.error_code) == (
        JobState.FAILED,
        0,
        ErrorCode.ARTIFACT_UPLOAD_FAILED,
    )
