"""The record's own fsck: ``harmont-exec verify``.

``check_record`` reads the whole record and reports every way it breaks what the rest of the
store promises (SPEC §2, §5): the database's own structure (SQLite ``integrity_check``; a
PostgreSQL server guarantees its pages, so there its constraints must all be validated), no row
pointing at a row that is not there, every job's history a legal path through THE transition
table from ``pending`` ending in the job's state, attempts numbered 1, 2, 3... without gaps,
every finished build in the state its jobs roll up to, and every artifact's blob present with
its SHA-256. It never writes and never repairs: what to do about a problem is the user's call
(resume, restore a backup). This module only reads, through the reader's connection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from executor.errors import ErrorCode, StoreError
from executor.states import TRANSITIONS, BuildState, Event, JobState, JobStatus, roll_up
from executor.store import sql
from executor.store.blobs import CHUNK_BYTES, BlobStore
from executor.store.rows import REFUSED_CODES

__all__ = ["Problem", "Verification", "check_record"]

_Rows = Callable[[str], Sequence[Any]]
_MAX_PER_KIND = 1000  # a record broken everywhere is reported, not listed in full


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong: where (``build`` as ``org/pipeline #n``, ``job`` as its step key, each
    None when the problem is not theirs) and what."""

    what: str
    build: str | None = None
    job: str | None = None

    def __str__(self) -> str:
        where = " ".join(
            part for part in (self.build, f"job {self.job!r}" if self.job else None) if part
        )
        return f"{where}: {self.what}" if where else self.what


@dataclass(slots=True)
class Verification:
    """What ``check_record`` read and found."""

    builds: int = 0
    jobs: int = 0
    transitions: int = 0
    attempts: int = 0
    artifacts: int = 0
    problems: list[Problem] = field(default_factory=list)
    omitted: int = 0  # problems past _MAX_PER_KIND of one kind, counted only

    @property
    def ok(self) -> bool:
        return not self.problems and not self.omitted

    def summary(self) -> str:
        read = ", ".join(
            _count(n, what)
            for n, what in (
                (self.builds, "build"),
                (self.jobs, "job"),
                (self.transitions, "transition"),
                (self.attempts, "attempt"),
                (self.artifacts, "artifact"),
            )
        )
        if self.ok:
            return f"ok: {read}"
        return f"{_count(len(self.problems) + self.omitted, 'problem')} in {read}"


class _Found:
    """Problems by kind, at most ``_MAX_PER_KIND`` of each kept."""

    def __init__(self, into: Verification) -> None:
        self._into = into
        self._counts: dict[str, int] = {}

    def add(self, kind: str, problem: Problem) -> None:
        count = self._counts.get(kind, 0) + 1
        self._counts[kind] = count
        if count <= _MAX_PER_KIND:
            self._into.problems.append(problem)
        else:
            self._into.omitted += 1


def check_record(rows: _Rows, dialect: sql.Dialect, blobs: BlobStore) -> Verification:
    """Every check, in order; see the module docstring. Driver errors propagate (the reader
    names the store)."""
    result = Verification()
    found = _Found(result)
    for row in rows(sql.verify_structure(dialect)):
        for line in str(row[0]).splitlines():
            if line not in ("ok", "*** in database main ***"):
                found.add("structure", Problem(f"the database's structure: {line}"))
    for child, column, parent in sql.VERIFY_REFERENCES:
        for (count,) in rows(sql.verify_orphans(child, column, parent)):
            if count:
                found.add(
                    "reference",
                    Problem(
                        f"{_count(count, 'row')} of {child} point at {parent} that are not "
                        f"there ({child}.{column}); restore the record from a backup"
                    ),
                )
    builds = {r[0]: r for r in rows(sql.VERIFY_BUILDS)}
    result.builds = len(builds)
    jobs: dict[str, Any] = {}
    jobs_of: dict[str, list[Any]] = {}
    for job in rows(sql.VERIFY_JOBS):
        jobs[job[0]] = job
        jobs_of.setdefault(job[1], []).append(job)
    result.jobs = len(jobs)

    def where(job_id: str) -> tuple[str | None, str | None]:
        job = jobs.get(job_id)
        if job is None:
            return None, f"id {job_id}"
        build = builds.get(job[1])
        return (_build_name(build) if build is not None else None), job[2]

    histories = rows(sql.VERIFY_TRANSITIONS)
    result.transitions = len(histories)
    seen: set[str] = set()
    for job_id, steps in groupby(histories, key=lambda r: r[0]):
        seen.add(job_id)
        what = _history_problem(list(steps), jobs.get(job_id))
        if what is not None:
            found.add("history", Problem(what, *where(job_id)))
    for job_id in jobs.keys() - seen:
        found.add("history", Problem("it has no history (not even its creation)", *where(job_id)))

    attempts = rows(sql.VERIFY_ATTEMPTS)
    result.attempts = len(attempts)
    for job_id, numbered in groupby(attempts, key=lambda r: r[0]):
        numbers = [n for _, n in numbered]
        if numbers != list(range(1, len(numbers) + 1)):
            found.add(
                "attempts",
                Problem(
                    f"its attempts are numbered {numbers}; they must be 1, 2, 3... without gaps",
                    *where(job_id),
                ),
            )

    for build_id, build in builds.items():
        what = _roll_up_problem(build, jobs_of.get(build_id, []))
        if what is not None:
            found.add("roll_up", Problem(what, _build_name(build)))

    artifacts = rows(sql.VERIFY_ARTIFACTS)
    result.artifacts = len(artifacts)
    for artifact_id, job_id, path, size, sha256 in artifacts:
        what = _blob_problem(blobs, sha256, size)
        if what is not None:
            build, job = where(job_id)
            found.add("artifact", Problem(f"artifact {path!r} ({artifact_id}): {what}", build, job))
    return result


def _build_name(build: Any) -> str:
    return f"{build[5]}/{build[6]} #{build[1]}"


def _history_problem(steps: list[Any], job: Any) -> str | None:
    """What is wrong with one job's history (rows: job_id, seq, from_state, event, to_state),
    or None."""
    seqs = [s[1] for s in steps]
    if seqs != list(range(len(seqs))):
        return f"its history's seq numbers are {_short(seqs)}; they must be 0, 1, 2... in order"
    first = steps[0]
    if first[2] is not None or first[3] != "created" or first[4] != JobState.PENDING:
        return (
            f"its history starts with {first[2]!r} --{first[3]}--> {first[4]!r}; it must start "
            "with its creation (None --created--> 'pending')"
        )
    state = JobState.PENDING
    for step in steps[1:]:
        if step[2] != state:
            return f"history seq {step[1]} starts from {step[2]!r} but the job was {state.value!r}"
        try:
            event = Event(step[3])
            to = TRANSITIONS[(state, event)]
        except (ValueError, KeyError):
            return (
                f"history seq {step[1]}: {state.value!r} --{step[3]}--> {step[4]!r} is not in "
                "the transition table"
            )
        if to != step[4]:
            return (
                f"history seq {step[1]}: {state.value!r} --{event.value}--> leads to "
                f"{to.value!r}, but the history says {step[4]!r}"
            )
        state = to
    if job is not None and job[3] != state:
        return f"its state is {job[3]!r} but its history ends in {state.value!r}"
    return None


def _roll_up_problem(build: Any, jobs: Iterable[Any]) -> str | None:
    """A finished build whose state is not what its jobs roll up to, or None. Builds still
    running are left alone: their executor writes their jobs and their state in turn."""
    try:
        state = BuildState(build[2])
    except ValueError:
        return f"its state {build[2]!r} is not a build state"
    if not state.is_terminal:
        return None
    try:
        statuses = [JobStatus(JobState(j[3]), bool(j[4])) for j in jobs]
    except ValueError:
        return None  # a job with an unknown state is reported by its history
    if not statuses and state is BuildState.FAILED and build[4] in REFUSED_CODES:
        return None  # refused when it was submitted: recorded failed, with nothing to run
    expected = roll_up(statuses, cancel_requested=bool(build[3]))
    if build[4] == ErrorCode.BUILD_ABANDONED or (
        build[4] == ErrorCode.RECORD_FAILED and expected is BuildState.CANCELED
    ):
        expected = BuildState.FAILED  # nobody canceled it: its executor or its record failed
    if expected is state:
        return None
    return (
        f"it is {state.value!r} but its jobs roll up to {expected.value!r} "
        f"(cancel requested: {'yes' if build[3] else 'no'}, error code: {build[4]})"
    )


def _blob_problem(blobs: BlobStore, sha256: str, size: int) -> str | None:
    try:
        path = blobs.path_of(sha256)
    except StoreError as exc:
        return str(exc)
    digest = hashlib.sha256()
    length = 0
    try:
        with path.open("rb") as blob:
            while chunk := blob.read(CHUNK_BYTES):
                digest.update(chunk)
                length += len(chunk)
    except FileNotFoundError:
        return f"its content is missing (no file {path})"
    except OSError as exc:
        return f"its content {path} cannot be read: {exc.strerror or exc}"
    if digest.hexdigest() != sha256:
        return f"its content {path} has SHA-256 {digest.hexdigest()}, not {sha256}"
    if length != size:
        return f"its content {path} is {length} bytes; the record says {size}"
    return None


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...]"
