"""One job as the scheduler tracks it, and how an attempt's end moves it.

``Job`` is the scheduler's working copy of a job's row (state, exit code, error, attempts,
times) with what only a run has (its step, its stop handle). THE retry rule
(``Job.retry_wanted``), the backoff (``retry_delay``) and the one record of how an attempt
ended (``Outcome``, from ``Job.outcome``) live here. Pure: the scheduler makes the transition
and records it; nothing here touches the store, a process or the event loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from executor.errors import ErrorCode
from executor.model import RetryPolicy, StepSpec
from executor.run.process import AttemptResult, Reason, StopRequest
from executor.run.results import JobResult
from executor.states import Event, JobState

__all__ = ["Job", "Outcome", "retry_delay"]


class Outcome(NamedTuple):
    """How an attempt's end moves its job: the event, and the fields recorded with it (those
    the end does not decide keep the job's values). ``RETRY_SCHEDULED``: back to
    ``scheduled``, with only ``exit_code`` recorded."""

    event: Event
    exit_code: int | None
    soft_failed: bool
    error_code: str | None
    error_message: str | None


@dataclass(slots=True)
class Job:
    """One job of the run: the fields of its row the scheduler keeps in step with the record
    (each changed by ``Scheduler._transition`` only), its step, and its stop handle."""

    key: str
    id: str
    step: StepSpec
    state: JobState = JobState.PENDING
    attempts: int = 0
    retries_count: int = 0
    exit_code: int | None = None
    soft_failed: bool = False
    error_code: str | None = None
    error_message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    stop: StopRequest | None = None
    cause: str | None = None

    def take(self, prior: JobResult) -> None:
        """Start from where ``prior`` left the job (a resumed build's, or a reused result)."""
        self.state = prior.state
        self.exit_code = prior.exit_code
        self.soft_failed = prior.soft_failed
        self.error_code = prior.error_code
        self.error_message = prior.error_message
        self.attempts = prior.attempts
        self.retries_count = prior.retries_count
        self.started_at = prior.started_at
        self.finished_at = prior.finished_at

    def result(self) -> JobResult:
        return JobResult(
            self.key,
            self.id,
            self.state,
            self.exit_code,
            self.soft_failed,
            self.attempts,
            self.error_code,
            self.error_message,
            self.started_at,
            self.finished_at,
            self.retries_count,
        )

    def retry_wanted(self, attempt: int, result: AttemptResult, *, stopping: bool) -> bool:
        """Whether this attempt's end sends the job back to ``scheduled`` (THE retry rule)."""
        retry = self.step.retry_policy
        if retry is None or attempt > retry.limit or stopping or self.state.is_terminal:
            return False
        if result.reason is Reason.SPAWN_FAILED:
            return False
        if result.reason is Reason.EXECUTOR_LOST:
            # A remote worker that went away (Buildkite's "agent lost"): an attempt that ran
            # is retried like any failure when the policy retries every exit ("*"): it has no
            # exit code to match a list against.
            return self.state is JobState.RUNNING and retry.exit_codes == "*"
        if self.state is JobState.CANCELING:
            return False
        if self.state is JobState.TIMING_OUT:
            return retry.on_timeout
        if result.exit_code == 0:
            return False
        return retry.retries_exit_code(result.exit_code if result.exit_code is not None else 255)

    def outcome(self, result: AttemptResult, failures: list[str], *, retry: bool) -> Outcome:
        """How the end of the attempt that gave ``result`` moves this (not yet terminal) job.
        ``failures``: files its artifact_paths matched that could not be kept; ``retry``: what
        ``retry_wanted`` said."""
        kept = (self.soft_failed, self.error_code, self.error_message)
        if result.reason is Reason.EXECUTOR_LOST and retry:
            return Outcome(Event.RETRY_SCHEDULED, result.exit_code, *kept)
        if result.reason is Reason.SPAWN_FAILED or result.reason is Reason.EXECUTOR_LOST:
            lost = (
                ErrorCode.SPAWN_FAILED
                if result.reason is Reason.SPAWN_FAILED
                else ErrorCode.EXECUTOR_LOST
            )
            message = result.error or lost
            return Outcome(Event.EXECUTOR_LOST, result.exit_code, self.soft_failed, lost, message)
        if self.state is JobState.CANCELING:
            return Outcome(Event.PROCESS_GONE, result.exit_code, *kept)
        if self.state is JobState.TIMING_OUT:
            event = Event.RETRY_SCHEDULED if retry else Event.PROCESS_GONE
            return Outcome(event, result.exit_code, *kept)
        if failures:  # its files could not be kept: a hard failure, the exit code kept
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            return Outcome(
                Event.ARTIFACT_UPLOAD_FAILED,
                result.exit_code,
                False,
                ErrorCode.ARTIFACT_UPLOAD_FAILED,
                f"{failures[0]}{more}",
            )
        # An exit clears the error an earlier attempt left (a timeout retried): the exit code
        # says it, error codes are for what it cannot.
        if result.exit_code == 0:
            return Outcome(Event.EXITED_ZERO, 0, self.soft_failed, None, None)
        code = result.exit_code if result.exit_code is not None else 255
        if retry:
            return Outcome(Event.RETRY_SCHEDULED, code, *kept)
        policy = self.step.soft_fail_policy
        soft = policy is not None and policy.matches(code)
        return Outcome(Event.EXITED_NONZERO, code, soft, None, None)


def retry_delay(retry: RetryPolicy, attempt: int) -> float:
    """Seconds to wait before the attempt after ``attempt`` (its backoff, jittered)."""
    backoff = retry.backoff
    delay = min(backoff.max_seconds, backoff.initial_seconds * backoff.factor ** (attempt - 1))
    if backoff.jitter:
        delay = random.uniform(0, delay)
    return delay
