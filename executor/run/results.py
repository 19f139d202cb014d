"""What a run is handed and hands back: its options, its live changes, its results.

``RunOptions`` goes into the scheduler; ``JobUpdate`` comes out of it as each change is
committed; ``BuildResult`` (with one ``JobResult`` per job) is what ``run()`` returns.
``JobResult`` is also how a job that does not start from scratch (a resumed build's, or one
``retry --failed`` reuses) is handed in. Plain data: no I/O, no store, no event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from executor.errors import ErrorCode
from executor.run.artifacts import DEFAULT_MAX_BYTES
from executor.states import BuildState, JobState

__all__ = ["BuildResult", "JobResult", "JobUpdate", "RunOptions", "exit_status"]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a plan. ``None`` fields take the build file's value, then the default."""

    concurrency: int | None = None
    fail_fast: bool = False
    grace_period_s: float = 10.0
    working_dir: Path | None = None
    base_env: Mapping[str, str] | None = None  # default: this process's environment
    max_artifact_bytes: int = DEFAULT_MAX_BYTES  # per file (--max-artifact-mb)


class JobUpdate(NamedTuple):
    """A state change, for live views: a job's (``key`` set) or the build's (``key`` None).
    (A NamedTuple: four are made per job, and it costs a quarter of a frozen dataclass.)"""

    key: str | None
    state: str
    at: datetime
    attempt: int = 0
    exit_code: int | None = None
    soft_failed: bool = False
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class JobResult:
    """Where a job stands, as its record has it: how it ended (``BuildResult.jobs``), or, in
    the scheduler's ``prior``, where a resumed or reused job starts from."""

    key: str
    job_id: str
    state: JobState
    exit_code: int | None = None
    soft_failed: bool = False
    attempts: int = 0
    error_code: str | None = None
    error_message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    retries_count: int = 0


@dataclass(frozen=True, slots=True)
class BuildResult:
    build_id: str
    number: int
    org: str
    pipeline: str
    state: BuildState
    error_code: str | None
    jobs: Mapping[str, JobResult]

    @property
    def exit_status(self) -> int:
        return exit_status(self.state, self.error_code)


def exit_status(state: BuildState, error_code: str | None) -> int:
    """``harmont-exec run``'s exit status (SPEC §4): 0 passed, 1 failed, 124 build timeout,
    130 canceled."""
    if state is BuildState.PASSED:
        return 0
    if state is BuildState.CANCELED:
        return 130
    if error_code == ErrorCode.PIPELINE_TIMEOUT:
        return 124
    return 1
