"""What the pages show, computed from the record's rows: counts by state, durations, a job's
note, the timeline of attempts, the page of the jobs table. Pure: no I/O, no HTML (the
templates draw these); ``routes`` reads the rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from executor.states import BuildState, JobState
from executor.store import AttemptRow, BuildRow, JobRow

__all__ = [
    "JOBS_PAGE",
    "STATE_ICONS",
    "STATE_ORDER",
    "Bar",
    "Timeline",
    "counts_by_state",
    "duration_text",
    "job_note",
    "page_of",
    "seconds_text",
    "timeline_of",
]

JOBS_PAGE = 100
"""Rows of the jobs table per page (a 10,000-job build is 100 pages, not one huge table)."""

STATE_ORDER = tuple(JobState)
"""The order states are counted in on the page."""

# Each state has an icon as well as a colour: a state is never told by colour alone.
STATE_ICONS: Mapping[str, str] = {
    "pending": "○",
    "scheduled": "◔",
    "assigned": "◑",
    "running": "▶",
    "passed": "✓",
    "failed": "✗",
    "skipped": "↷",
    "canceling": "◌",
    "canceled": "⊘",
    "timing_out": "◌",
    "timed_out": "⏱",
    "failing": "✗",  # a build's state: something failed, the rest still runs
}


def duration_text(start: datetime | None, end: datetime | None, now: datetime | None = None) -> str:
    """``35ms``, ``1.2s``, ``3m04.5s``, ``2h05m``; empty if it has not started."""
    if start is None:
        return ""
    seconds = max(((end or now or datetime.now(UTC)) - start).total_seconds(), 0.0)
    # Rounded as a whole first, then split into units: 119.96 s is 2m00.0s, never 1m60.0s.
    if round(seconds * 1000) < 1000:
        return f"{seconds * 1000:.0f}ms"
    tenths = round(seconds * 10)
    if tenths < 600:
        return f"{tenths / 10:.1f}s"
    if tenths < 36000:
        minutes, rest = divmod(tenths, 600)
        return f"{minutes}m{rest / 10:04.1f}s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours}h{minutes:02d}m"


def seconds_text(seconds: float) -> str:
    """A tick of the timeline: ``0s``, ``20ms``, ``2.5s``, ``1m30s``, ``1h05m``."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def counts_by_state(states: Iterable[JobState | str]) -> list[tuple[str, int]]:
    """(state, how many) for each state present, in STATE_ORDER."""
    counts = Counter(str(s) for s in states)
    return [(s.value, counts[s.value]) for s in STATE_ORDER if counts[s.value]]


def job_note(job: JobRow, reused_from: int | None = None) -> str:
    """What the jobs table says beside a job's state: why it was skipped or canceled (the
    root cause, as the record has it), that it was soft-failed, or whose result it reused."""
    if job.reused_from_job_id is not None:
        return f"reused from build #{reused_from}" if reused_from is not None else "reused"
    parts = []
    if job.soft_failed:
        parts.append(f"soft-failed (exit {job.exit_code})")
    if job.error_message:
        parts.append(job.error_message)
    elif job.error_code:
        parts.append(job.error_code)
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Bar:
    """One attempt on the timeline: its job's row, where it starts and ends (seconds from the
    build's start) and how it ended (``state``: a job state, or ``running``)."""

    row: int
    job_id: str
    key: str
    attempt: int
    start: float
    end: float
    state: str
    waited: float  # seconds from the build's start to the job's first attempt


@dataclass(frozen=True, slots=True)
class Timeline:
    bars: tuple[Bar, ...]
    rows: tuple[str, ...]  # step key per row
    span: float  # seconds from the build's start to its end (or now)
    ticks: tuple[float, ...]


def timeline_of(
    build: BuildRow,
    jobs: Sequence[JobRow],
    attempts: Mapping[str, Sequence[AttemptRow]],
    now: datetime,
    *,
    limit: int = JOBS_PAGE,
) -> Timeline:
    """The waterfall of the build's attempts (the first ``limit`` jobs that ran, by start):
    one row per job, a bar per attempt, so a person sees where the time went and what waited
    for what (the gap before a job's first bar is its wait)."""
    origin = build.started_at or build.created_at
    end = build.finished_at or now
    ran = sorted(
        (j for j in jobs if attempts.get(j.id)),
        key=lambda j: (attempts[j.id][0].started_at, j.position),
    )[:limit]
    bars = []
    for row, job in enumerate(ran):
        tries = attempts[job.id]
        waited = (tries[0].started_at - origin).total_seconds()
        for attempt in tries:
            stop = attempt.finished_at or (job.finished_at if job.state.is_terminal else None)
            last = attempt is tries[-1]
            state = job.state.value if last else "failed"
            if stop is None:
                stop, state = end, "running"
            bars.append(
                Bar(
                    row,
                    job.id,
                    job.step_key,
                    attempt.number,
                    max((attempt.started_at - origin).total_seconds(), 0.0),
                    max((stop - origin).total_seconds(), 0.0),
                    state,
                    max(waited, 0.0),
                )
            )
    span = max([(end - origin).total_seconds(), *(b.end for b in bars), 0.001])
    return Timeline(tuple(bars), tuple(j.step_key for j in ran), span, _ticks(span))


def _ticks(span: float) -> tuple[float, ...]:
    """Round tick marks, about five of them, across ``span`` seconds."""
    steps = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120)
    for step in (*steps, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400):
        if span / step <= 6:
            break
    count = int(span // step)
    return tuple(round(step * n, 3) for n in range(count + 1))


def page_of(count: int, page: int, size: int = JOBS_PAGE) -> tuple[int, int, int]:
    """(the page shown, clamped to 1..pages, its first index, the number of pages)."""
    pages = max((count + size - 1) // size, 1)
    shown = min(max(page, 1), pages)
    return shown, (shown - 1) * size, pages


def build_is_live(state: BuildState) -> bool:
    return not state.is_terminal
