"""Job and build states, the events that move them, THE transition table and the build roll-up.

This module is pure: no I/O, no clocks. Every state change anywhere in harmont-exec goes through
``transition``; a ``(state, event)`` pair missing from ``TRANSITIONS`` is a bug and raises
``InvalidTransitionError`` instead of being dropped. The string values are public API: the same
words appear in the store, the HTTP API and log lines (Harmont's vocabulary).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from executor.errors import InvalidTransitionError

__all__ = [
    "ACTIVE_BUILD_STATES",
    "TERMINAL_BUILD_STATES",
    "TERMINAL_JOB_STATES",
    "TRANSITIONS",
    "BuildState",
    "Event",
    "JobState",
    "JobStatus",
    "roll_up",
    "transition",
]


class JobState(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    ASSIGNED = "assigned"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELING = "canceling"
    CANCELED = "canceled"
    TIMING_OUT = "timing_out"
    TIMED_OUT = "timed_out"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


class BuildState(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    FAILING = "failing"
    PASSED = "passed"
    FAILED = "failed"
    CANCELING = "canceling"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_BUILD_STATES


class Event(StrEnum):
    READY = "ready"
    CANCEL_REQUESTED = "cancel_requested"
    SLOT_ACQUIRED = "slot_acquired"
    STARTED = "started"
    EXITED_ZERO = "exited_zero"
    EXITED_NONZERO = "exited_nonzero"
    RETRY_SCHEDULED = "retry_scheduled"
    TIMEOUT_EXPIRED = "timeout_expired"
    PROCESS_GONE = "process_gone"
    DEPENDENCY_FAILED = "dependency_failed"
    BUILD_TIMEOUT = "build_timeout"
    EXECUTOR_LOST = "executor_lost"
    RESUMED = "resumed"
    REUSED = "reused"
    ARTIFACT_UPLOAD_FAILED = "artifact_upload_failed"


TERMINAL_JOB_STATES = frozenset(
    {JobState.PASSED, JobState.FAILED, JobState.SKIPPED, JobState.CANCELED, JobState.TIMED_OUT}
)
TERMINAL_BUILD_STATES = frozenset({BuildState.PASSED, BuildState.FAILED, BuildState.CANCELED})
ACTIVE_BUILD_STATES = frozenset(BuildState) - TERMINAL_BUILD_STATES

_S = JobState
_E = Event


def _table() -> dict[tuple[JobState, Event], JobState]:
    table: dict[tuple[JobState, Event], JobState] = {
        (_S.PENDING, _E.READY): _S.SCHEDULED,
        (_S.SCHEDULED, _E.SLOT_ACQUIRED): _S.ASSIGNED,
        (_S.ASSIGNED, _E.STARTED): _S.RUNNING,
        (_S.RUNNING, _E.EXITED_ZERO): _S.PASSED,
        (_S.RUNNING, _E.EXITED_NONZERO): _S.FAILED,
        (_S.RUNNING, _E.RETRY_SCHEDULED): _S.SCHEDULED,
        (_S.RUNNING, _E.TIMEOUT_EXPIRED): _S.TIMING_OUT,
        (_S.RUNNING, _E.CANCEL_REQUESTED): _S.CANCELING,
        (_S.TIMING_OUT, _E.PROCESS_GONE): _S.TIMED_OUT,
        (_S.TIMING_OUT, _E.RETRY_SCHEDULED): _S.SCHEDULED,
        (_S.CANCELING, _E.PROCESS_GONE): _S.CANCELED,
        (_S.PENDING, _E.DEPENDENCY_FAILED): _S.SKIPPED,
        (_S.ASSIGNED, _E.EXECUTOR_LOST): _S.FAILED,
        (_S.RUNNING, _E.EXECUTOR_LOST): _S.FAILED,
        # Extension: `harmont-exec resume` runs a lost job (failed, executor_lost) or one its
        # lost build never started (canceled, build_abandoned) again. The code checks those
        # error codes; the table only allows the move.
        (_S.FAILED, _E.RESUMED): _S.PENDING,
        (_S.CANCELED, _E.RESUMED): _S.PENDING,
        # Extension: `harmont-exec retry --failed` takes a job's result from the build it
        # retries instead of running it (recorded with a reference to that job).
        (_S.PENDING, _E.REUSED): _S.PASSED,
        # Extension (SPEC §7): the final attempt's process is gone but a file its
        # artifact_paths matched could not be kept: the job fails, whatever it exited with.
        (_S.RUNNING, _E.ARTIFACT_UPLOAD_FAILED): _S.FAILED,
    }
    for state in (_S.PENDING, _S.SCHEDULED, _S.ASSIGNED):
        table[(state, _E.CANCEL_REQUESTED)] = _S.CANCELED
    for state in JobState:
        if not state.is_terminal:
            table[(state, _E.BUILD_TIMEOUT)] = _S.TIMED_OUT
    return table


TRANSITIONS: Mapping[tuple[JobState, Event], JobState] = _table()
"""THE job transition table (SPEC §2). Nothing else decides a job's next state."""


def transition(state: JobState, event: Event) -> JobState:
    """The state a job in ``state`` moves to on ``event``; raises if the pair is not allowed."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = sorted(e.value for (s, e) in TRANSITIONS if s == state)
        raise InvalidTransitionError(
            f"job in state {state.value!r} cannot take event {event.value!r}; "
            f"allowed events: {', '.join(allowed) or 'none (terminal state)'}. "
            "This is a bug in harmont-exec: please report it with the build's history"
        ) from None


@dataclass(frozen=True, slots=True)
class JobStatus:
    """What the roll-up needs to know about one job."""

    state: JobState
    soft_failed: bool = False
    cause: str | None = None  # for a skipped or canceled job: the step key of the root cause

    @property
    def is_hard_failure(self) -> bool:
        """Failed without soft-fail, or timed out. Skipped jobs only echo an upstream failure."""
        return (self.state is JobState.FAILED and not self.soft_failed) or (
            self.state is JobState.TIMED_OUT
        )


_NOT_STARTED = frozenset({JobState.PENDING, JobState.SCHEDULED})


def roll_up(jobs: Iterable[JobStatus], *, cancel_requested: bool = False) -> BuildState:
    """The build state implied by its jobs' states (Harmont's roll-up), recomputed every time.

    ``cancel_requested`` is a user's cancel of the whole build (signal or API), not the cascade
    of ``--fail-fast``: a fail-fast build ends ``failed``, a user-canceled one ``canceled``.
    Soft-failed jobs never count as failures.
    """
    active = False
    started = False
    hard_failure = False
    canceled = False
    for job in jobs:
        if not job.state.is_terminal:
            active = True
            if job.state not in _NOT_STARTED:
                started = True
        else:
            started = True
            hard_failure = hard_failure or job.is_hard_failure
            canceled = canceled or job.state is JobState.CANCELED
    if active:
        if cancel_requested:
            return BuildState.CANCELING
        if hard_failure:
            return BuildState.FAILING
        return BuildState.RUNNING if started else BuildState.SCHEDULED
    if cancel_requested:
        return BuildState.CANCELED
    if hard_failure:
        return BuildState.FAILED
    if canceled:
        return BuildState.CANCELED
    return BuildState.PASSED
