"""A build followed by polling a server (`submit`): what changed between two reads of the build
and its jobs (Harmont's Build and Job objects), as the ``JobUpdate``s `run`'s scheduler reports,
so that the same views show it.

A poll sees states, not transitions: a job that went from pending to passed between two polls
is shown running (at its ``started_at``) and then passed; the build likewise. The changes of one
poll are put in the order of their times, as `run` would have shown them. No I/O: the attempt
count of a retried job comes from the caller's ``count`` (the server's attempts route).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from executor.run.results import JobUpdate
from executor.states import BuildState, JobState

__all__ = ["PolledBuild", "job_key", "parse_time"]

Json = dict[str, Any]
CountAttempts = Callable[[Json], Awaitable[int]]

_STOPPING = frozenset({JobState.TIMING_OUT.value, JobState.CANCELING.value})


def job_key(job: Json) -> str:
    """The job's name in the views: its step key (its name or id for a job without one)."""
    return str(job.get("step_key") or job.get("name") or job["id"])


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp of the wire, or None."""
    return None if value is None else datetime.fromisoformat(value)


@dataclass
class _Seen:
    """What the view was last told about a job."""

    state: str = JobState.PENDING.value
    retries: int = 0
    ran: bool = False  # a `running` change was shown


@dataclass
class PolledBuild:
    """What the views were told so far about one build."""

    _jobs: dict[str, _Seen] = field(default_factory=dict)
    _build_state: str = BuildState.SCHEDULED.value
    _build_ran: bool = False
    _attempts: dict[str, int] = field(default_factory=dict)  # job id -> attempts, once ended

    async def changes(self, build: Json, jobs: list[Json], count: CountAttempts) -> list[JobUpdate]:
        """What changed since the last poll, in the order of their times."""
        now = datetime.now(UTC)
        out: list[JobUpdate] = []
        for job in jobs:
            out.extend(await self._job_changes(job, now, count))
        out.extend(self._build_changes(build, now))
        out.sort(key=lambda change: change.at)  # stable: a job's own changes stay in order
        return out

    async def _job_changes(self, job: Json, now: datetime, count: CountAttempts) -> list[JobUpdate]:
        seen = self._jobs.setdefault(job["id"], _Seen())
        state = job["state"]
        retries = int(job["retries_count"])
        if (state, retries) == (seen.state, seen.retries):
            return []
        seen.state, seen.retries = state, retries
        key = job_key(job)
        started = parse_time(job["started_at"])
        terminal = JobState(state).is_terminal
        out = []
        if (terminal or state in _STOPPING) and not seen.ran and started is not None:
            out.append(JobUpdate(key, JobState.RUNNING.value, started, 1))
            seen.ran = True
        if state == JobState.RUNNING:
            at = started if not seen.ran and started is not None else now
            out.append(JobUpdate(key, state, at, retries + 1))
            seen.ran = True
        elif terminal:
            out.append(
                JobUpdate(
                    key,
                    state,
                    parse_time(job["finished_at"]) or now,
                    await self.attempts(job, count),
                    job["exit_code"],
                    bool(job["soft_failed"]),
                    job["error_message"],
                )
            )
        elif state in _STOPPING:
            out.append(JobUpdate(key, state, now, retries + 1, None, False, job["error_message"]))
        else:  # scheduled (perhaps for a retry: after attempt ``retries``), assigned
            out.append(JobUpdate(key, state, now, retries, job["exit_code"] if retries else None))
        return out

    def _build_changes(self, build: Json, now: datetime) -> list[JobUpdate]:
        state = build["state"]
        if state == self._build_state:
            return []
        self._build_state = state
        started = parse_time(build["started_at"])
        out = []
        if state != BuildState.RUNNING and not self._build_ran and started is not None:
            out.append(JobUpdate(None, BuildState.RUNNING.value, started))
        self._build_ran = self._build_ran or started is not None
        when = started if state == BuildState.RUNNING else parse_time(build["finished_at"])
        out.append(JobUpdate(None, state, when or now))
        return out

    async def attempts(self, job: Json, count: CountAttempts) -> int:
        """How many attempts an ended job made: 1 if it ran and was never retried, else what
        ``count`` reads (a retry canceled before its attempt leaves one fewer than retries+1)."""
        if job["id"] not in self._attempts:
            if job["retries_count"]:
                self._attempts[job["id"]] = await count(job)
            else:
                self._attempts[job["id"]] = 0 if job["started_at"] is None else 1
        return self._attempts[job["id"]]
