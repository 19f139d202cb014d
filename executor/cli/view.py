"""How a build looks while it runs and when it ends, for `run` (and `resume`, `retry`) and for
`submit`: the live view on a terminal, one line per change when piped, the summary table and
the verdict line. Given the changes and the results, from wherever they come (the scheduler in
this process, or a server's API): nothing here reads a store or the network.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

import click
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from executor.cli.common import STATE_STYLE, duration_text
from executor.run.results import JobResult, JobUpdate
from executor.states import JobState

__all__ = [
    "SUMMARY_ROWS",
    "LiveView",
    "PlainLines",
    "Summary",
    "plain_line",
    "print_summary",
    "tail_option",
    "verdict",
    "wants_tail",
]


class LiveView:
    """Terminal view while a build runs: progress, state counts and the jobs running now."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.states: dict[str, JobUpdate] = {}
        self.started: dict[str, datetime] = {}
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("build", total=total)
        self.build_state = "scheduled"

    def __call__(self, change: JobUpdate) -> None:
        if change.key is None:
            self.build_state = change.state
            self.progress.update(self.task, description=f"build {change.state}")
            return
        previous = self.states.get(change.key)
        self.states[change.key] = change
        if change.state == "running" and change.key not in self.started:
            self.started[change.key] = change.at
        if JobState(change.state).is_terminal and not (
            previous is not None and JobState(previous.state).is_terminal
        ):
            self.progress.advance(self.task)
            if change.state != "passed":
                self.console.print(plain_line(change), highlight=False)

    def __rich__(self) -> Group:
        counts = Counter(c.state for c in self.states.values())
        summary = "  ".join(
            f"[{STATE_STYLE.get(state, 'white')}]{state} {n}[/]"
            for state, n in sorted(counts.items())
        )
        active = Table.grid(padding=(0, 2))
        shown = 0
        for key, change in self.states.items():
            if change.state in ("running", "timing_out", "canceling") and shown < 10:
                shown += 1
                active.add_row(
                    f"[{STATE_STYLE.get(change.state, 'white')}]{change.state}[/]",
                    key,
                    f"attempt {change.attempt}",
                    duration_text(self.started.get(key), None),
                )
        return Group(self.progress, summary, active)


_ENDING = frozenset(s.value for s in JobState if s.is_terminal)
_STOPPING = frozenset({JobState.TIMING_OUT.value, JobState.CANCELING.value})


def plain_line(change: JobUpdate) -> str:
    """One change as the piped view writes it: ``HH:MM:SS job state (details)``."""
    # Plain string tests and %-formatting: this runs four times per job.
    at = change.at if change.at.tzinfo is UTC else change.at.astimezone(UTC)
    when = "%02d:%02d:%02d" % (at.hour, at.minute, at.second)  # noqa: UP031
    state = change.state
    if change.key is None:
        return f"{when} build {state}"
    details = []
    if state == "running":
        details.append(f"attempt {change.attempt}")
    elif state == "scheduled":
        if change.attempt:
            details.append(f"retry after attempt {change.attempt}")
            if change.exit_code is not None:
                details.append(f"exit {change.exit_code}")
    elif state in _ENDING or state in _STOPPING:
        if change.attempt > 1:
            details.append(f"{change.attempt} attempts")
        if change.exit_code is not None and state in _ENDING:
            details.append(f"exit {change.exit_code}")
        if change.soft_failed:
            details.append("soft-failed")
        if change.error_message and state != "passed":
            details.append(change.error_message)
    if details:
        return f"{when} {change.key} {state} ({', '.join(details)})"
    return f"{when} {change.key} {state}"


class PlainLines:
    """The piped view: one line per change, flushed within ``FLUSH_S`` of being written, so
    whoever reads the pipe (tee, a CI log) sees each change at once, without one write system
    call per change (a 10k-job build makes 40k changes). Call ``close`` at the end."""

    FLUSH_S = 0.1

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, change: JobUpdate) -> None:
        self._out.write(plain_line(change) + "\n")
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._timer = None
        self._out.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._flush()


SUMMARY_ROWS = 40
"""A build with more jobs lists only those that did not pass; the counts say the rest."""


@dataclass(frozen=True, slots=True)
class Summary:
    """What the end of a build shows, gathered by the caller from where the build is recorded
    (the store, or the server's API); the hints say where to read more there."""

    org: str
    pipeline: str
    number: int
    state: str
    jobs: Sequence[JobResult]  # plan order
    tails: Mapping[str, Sequence[str]]  # job id -> last log lines of a failed or timed-out job
    artifacts_kept: int
    artifacts_capped: bool  # there may be more than ``artifacts_kept``
    error_message: str | None  # the build's own, e.g. its timeout
    jobs_hint: str  # e.g. "harmont-exec jobs 3"
    log_hint: Callable[[str], str]  # job id -> e.g. "harmont-exec logs ID"
    artifacts_hint: str


def print_summary(console: Console, summary: Summary) -> None:
    """The table of jobs, the last log lines of each failed job, the artifacts kept and the
    build's own error."""
    jobs = summary.jobs
    table = Table(
        title=f"{summary.org}/{summary.pipeline} build #{summary.number}: {summary.state}"
    )
    for column in ("job", "state", "attempts", "exit", "duration", "note"):
        table.add_column(column)
    shown = (
        jobs
        if len(jobs) <= SUMMARY_ROWS
        else [j for j in jobs if j.state is not JobState.PASSED or j.soft_failed][:SUMMARY_ROWS]
    )
    for job in shown:
        state = job.state.value + (" (soft)" if job.soft_failed else "")
        table.add_row(
            job.key,
            f"[{STATE_STYLE.get(job.state.value, 'white')}]{state}[/]",
            str(job.attempts),
            "" if job.exit_code is None else str(job.exit_code),
            duration_text(job.started_at, job.finished_at),
            "" if job.state is JobState.PASSED else (job.error_message or ""),
        )
    if len(shown) < len(jobs):
        counts = Counter(j.state.value for j in jobs)
        table.caption = (
            ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            + f"; showing {len(shown)} of {len(jobs)} jobs ({summary.jobs_hint})"
        )
    if shown:
        console.print(table)
    elif jobs:
        console.print(f"{table.title}; {table.caption}")
    else:
        console.print(f"{table.title} (no jobs)")
    for job in jobs:
        lines = summary.tails.get(job.job_id)
        if not lines:
            continue
        console.rule(f"{job.key}: last {len(lines)} log lines ({summary.log_hint(job.job_id)})")
        for line in lines:
            console.out(line, highlight=False)
    kept = summary.artifacts_kept
    if kept:
        console.print(
            f"{kept}{'+' if summary.artifacts_capped else ''} artifact{'s' if kept > 1 else ''} "
            f"kept ({summary.artifacts_hint})",
            highlight=False,
        )
    if summary.error_message:
        console.print(f"[red]{summary.error_message}[/]")


def wants_tail(job: JobResult) -> bool:
    """Whether the summary shows the end of this job's log."""
    return job.state in (JobState.FAILED, JobState.TIMED_OUT)


def verdict(number: int, state: str, elapsed_s: float, exit_status: int) -> str:
    """The last line: ``build #N STATE in S.Ss (exit E)``."""
    return f"build #{number} {state} in {elapsed_s:.1f}s (exit {exit_status})"


tail_option = click.option(
    "--tail",
    "tail_lines",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="Log lines shown for each failed job at the end.",
)
