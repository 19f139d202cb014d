"""The scheduler driven by a fake process runner under random outcomes and cancels.

Hypothesis draws a build (``executor.testing.build_specs``), the exit code of every attempt
(or "hang until stopped") and when to cancel the build. A fake runner plays those outcomes and
checks, at every start, that the job's prerequisites allow it and the concurrency limit holds.
Afterwards the real SQLite record must show every job terminal, every history a legal path
through the transition table that never leaves a terminal state, and the build's roll-up.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from executor import (
    Backoff,
    BuildSpec,
    JobState,
    JobStatus,
    Readiness,
    StepSpec,
    WaitSpec,
    build_plan,
)
from executor.plan import Plan
from executor.run.process import AttemptResult, AttemptSpec, Reason, StopRequest, Stream
from executor.run.scheduler import JobUpdate, RunOptions, Scheduler
from executor.states import TRANSITIONS, Event, roll_up
from executor.store import open_store
from executor.testing import build_specs

HANG = -1
EXIT_CODES = [0, 0, 0, 1, 3, 137, HANG]


def _without_clocks(spec: BuildSpec) -> BuildSpec:
    """No timeouts and no backoff delays: only the drawn outcomes and cancels stop attempts."""
    steps = []
    for step in spec.steps:
        if isinstance(step, StepSpec):
            update: dict[str, object] = {"timeout_seconds": None}
            if step.retry_policy is not None:
                update["retry_policy"] = step.retry_policy.model_copy(
                    update={"backoff": Backoff(initial_seconds=0, jitter=False)}
                )
            step = step.model_copy(update=update)
        steps.append(step)
    return spec.model_copy(update={"steps": tuple(steps), "timeout_seconds": None})


class FakeRunner:
    def __init__(self, plan: Plan, outcomes: Callable[[str, int], int], limit: int) -> None:
        self.plan = plan
        self.outcomes = outcomes
        self.limit = limit
        self.running = 0
        self.peak = 0
        self.starts = 0
        self.attempts: dict[str, int] = {}
        self.on_first_hang: Callable[[], None] = lambda: None
        self.hung = False
        self.scheduler: Scheduler | None = None  # whose knowledge a start is checked against
        self.shown: list[JobUpdate] = []

    def observe(self, change: JobUpdate) -> None:
        self.shown.append(change)

    async def run(
        self,
        spec: AttemptSpec,
        *,
        on_start: Callable[[], None],
        on_output: Callable[..., None],
        stop: StopRequest,
    ) -> AttemptResult:
        key = spec.env["HARMONT_STEP_KEY"]
        attempt = int(spec.env["HARMONT_ATTEMPT"])
        assert attempt == self.attempts.get(key, 0) + 1
        self.attempts[key] = attempt
        assert self.scheduler is not None
        statuses = {
            k: s for k, s in self.scheduler.statuses.items() if k != key and s.state.is_terminal
        }
        decision = self.plan.readiness(key, statuses)
        assert decision.readiness is Readiness.READY, (key, decision, statuses)
        started_at = datetime.now(UTC)
        await anyio.lowlevel.checkpoint()  # let other jobs interleave
        self.running += 1
        self.peak = max(self.peak, self.running)
        assert self.running <= self.limit
        try:
            on_start()
            on_output(Stream.STDOUT, f"{key} attempt {attempt}\n".encode())
            code = self.outcomes(key, attempt)
            if code == HANG or stop.requested.is_set():
                if not self.hung:
                    self.hung = True
                    self.on_first_hang()
                await stop.requested.wait()
                code = 143
            else:
                await anyio.lowlevel.checkpoint()
            reason = stop.reason if stop.reason is not None else Reason.EXITED
            return AttemptResult(reason, code, None, started_at, datetime.now(UTC))
        finally:
            self.running -= 1


@settings(max_examples=40, deadline=None)
@given(
    spec=build_specs(max_steps=12, unicode=False),
    codes=st.lists(st.sampled_from(EXIT_CODES), min_size=1, max_size=40),
    concurrency=st.integers(1, 4),
    fail_fast=st.booleans(),
    cancel_at=st.none() | st.integers(1, 10),
)
def test_scheduler_invariants_under_random_outcomes_and_cancels(
    spec: BuildSpec, codes: list[int], concurrency: int, fail_fast: bool, cancel_at: int | None
) -> None:
    spec = _without_clocks(spec)
    plan = build_plan(spec)
    draws = iter(codes * 50)

    def outcome(key: str, attempt: int) -> int:
        code = next(draws)
        return 0 if code == HANG and cancel_at is None else code

    runner = FakeRunner(plan, outcome, concurrency)
    with tempfile.TemporaryDirectory() as tmp, open_store(Path(tmp) / "h.db") as store:
        created = store.create_build(
            org="local",
            pipeline="p",
            plan=plan,
            build_file=None,
            working_dir=tmp,
            now=datetime.now(UTC),
        )
        scheduler = Scheduler(
            plan,
            store,
            created,
            options=RunOptions(concurrency=concurrency, fail_fast=fail_fast, working_dir=Path(tmp)),
            runner=runner,
            on_change=runner.observe,
        )
        runner.scheduler = scheduler
        cancel = lambda: scheduler.cancel("test")  # noqa: E731
        runner.on_first_hang = cancel if cancel_at is not None else (lambda: None)

        async def go() -> None:
            with anyio.fail_after(30):
                if cancel_at is not None:
                    original = runner.run

                    async def counting(*args: object, **kwargs: object) -> AttemptResult:
                        runner.starts += 1
                        if runner.starts == cancel_at:
                            scheduler.cancel("test")
                        return await original(*args, **kwargs)  # type: ignore[arg-type]

                    runner.run = counting  # type: ignore[method-assign]
                result = await scheduler.run()
                assert result.state.is_terminal

        anyio.run(go)
        jobs = store.list_jobs(created.id)
        assert {j.step_key for j in jobs} == set(plan.order)
        for job in jobs:
            assert job.state.is_terminal, job
            history = store.job_transitions(job.id)
            assert history[0].to_state is JobState.PENDING
            for row in history[1:]:
                assert TRANSITIONS[(row.from_state, Event(row.event))] is row.to_state, row
            terminal = [n for n, row in enumerate(history) if row.to_state.is_terminal]
            assert terminal == [len(history) - 1], "a terminal state changed"
            step = plan.step(job.step_key)
            attempts = store.list_attempts(job.id)
            limit = step.retry_policy.limit if step.retry_policy else 0
            assert len(attempts) <= limit + 1
        build = store.get_build_by_id(created.id)
        assert build is not None
        expected = roll_up(
            (JobStatus(j.state, j.soft_failed) for j in jobs),
            cancel_requested=build.cancel_requested,
        )
        assert build.state is expected
        assert runner.peak <= concurrency
        # What on_change showed is what was recorded, in the record's order (it waits for
        # each change's commit): the last change shown for each job is its recorded state.
        last = {c.key: c.state for c in runner.shown if c.key is not None}
        assert last == {j.step_key: j.state.value for j in jobs}
        assert [c.state for c in runner.shown if c.key is None][-1] == build.state.value


class GateRunner:
    """Holds the attempts of a group of independent jobs until ``limit`` of them run at once,
    or the whole group has started; once a group's gate opens it stays open. So the build can
    only end if the scheduler fills every slot it may fill: the peak is determined."""

    def __init__(self, groups: list[int], limit: int) -> None:
        self.groups = groups
        self.limit = limit
        self.running = 0
        self.peak = 0
        self.started = [0] * len(groups)
        self.gates = [anyio.Event() for _ in groups]

    async def run(
        self,
        spec: AttemptSpec,
        *,
        on_start: Callable[[], None],
        on_output: Callable[..., None],
        stop: StopRequest,
    ) -> AttemptResult:
        group = int(spec.env["HARMONT_STEP_KEY"].split("-")[0].removeprefix("g"))
        started_at = datetime.now(UTC)
        self.running += 1
        self.started[group] += 1
        self.peak = max(self.peak, self.running)
        try:
            assert self.running <= self.limit, (self.running, self.limit)
            on_start()
            if self.running == self.limit or self.started[group] == self.groups[group]:
                self.gates[group].set()
            await self.gates[group].wait()
            return AttemptResult(Reason.EXITED, 0, None, started_at, datetime.now(UTC))
        finally:
            self.running -= 1


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    concurrency=st.integers(1, 5),
    in_build_file=st.booleans(),
)
def test_scheduler_runs_as_many_jobs_at_once_as_the_limit_and_the_plan_allow(
    groups: list[int], concurrency: int, in_build_file: bool
) -> None:
    """Groups of independent jobs separated by wait barriers: the most jobs running at once is
    exactly min(limit, largest group), the limit given in the build file or the options."""
    steps: list[StepSpec | WaitSpec] = []
    for g, size in enumerate(groups):
        if g:
            steps.append(WaitSpec())
        steps.extend(StepSpec(key=f"g{g}-{i}", command="true") for i in range(size))
    spec = BuildSpec(steps=tuple(steps), concurrency=concurrency if in_build_file else None)
    plan = build_plan(spec)
    runner = GateRunner(groups, concurrency)
    with tempfile.TemporaryDirectory() as tmp, open_store(Path(tmp) / "h.db") as store:
        created = store.create_build(
            org="local",
            pipeline="p",
            plan=plan,
            build_file=None,
            working_dir=tmp,
            now=datetime.now(UTC),
        )
        options = RunOptions(
            concurrency=None if in_build_file else concurrency, working_dir=Path(tmp)
        )
        scheduler = Scheduler(plan, store, created, options=options, runner=runner)

        async def go() -> None:
            try:
                with anyio.fail_after(30):
                    result = await scheduler.run()
            except TimeoutError:
                raise AssertionError(
                    f"stuck: jobs started per group {runner.started} of {groups}, at most "
                    f"{runner.peak} at once with a limit of {concurrency}: the scheduler left "
                    "slots free while jobs were ready"
                ) from None
            assert result.state.value == "passed"

        anyio.run(go)
    assert runner.peak == min(concurrency, max(groups))
