"""What the store returns, and how values cross the database boundary.

Rows are frozen dataclasses with parsed values: tz-aware UTC datetimes, ``JobState`` /
``BuildState`` enums, policies as dicts, booleans as ``bool``, log content as ``bytes``. This
module also owns the one timestamp format (``format_time`` / ``parse_time``). It runs no SQL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, NamedTuple, Protocol

from executor.errors import ErrorCode, InternalError
from executor.states import BuildState, JobState

__all__ = [
    "REFUSED_CODES",
    "UNSET",
    "ArtifactRow",
    "AttemptRow",
    "BuildRow",
    "CreatedBuild",
    "DbRow",
    "JobProgress",
    "JobRow",
    "JobText",
    "LogChunk",
    "OrganizationRow",
    "PipelineRow",
    "TokenRow",
    "TransitionRow",
    "Unset",
    "format_time",
    "parse_time",
]


class Unset(Enum):
    """Marks a keyword argument left out, so that ``None`` can mean "set to NULL"."""

    UNSET = "unset"


UNSET = Unset.UNSET

REFUSED_CODES = frozenset(
    {ErrorCode.INVALID_BUILD_FILE, ErrorCode.INVALID_SOURCE, ErrorCode.PAYLOAD_TOO_LARGE}
)
"""The error codes of a build refused when it was submitted (its IR, its source): recorded
``failed`` with no jobs; nothing of it ever ran."""


class DbRow(Protocol):
    """A database row addressed by column name (``sqlite3.Row``, a psycopg dict row)."""

    def __getitem__(self, key: str, /) -> Any: ...


def format_time(value: datetime) -> str:
    """``2026-11-28T15:55:42.123456Z``: UTC, microseconds, fixed width, so text order is time
    order. A naive datetime is a bug (its zone is unknown) and raises."""
    if value.tzinfo is not UTC:
        if value.tzinfo is None or value.utcoffset() is None:
            raise InternalError(
                f"naive datetime {value!r} given to the store; use an aware UTC time"
            )
        value = value.astimezone(UTC)
    # %-formatting: ~40% faster than isoformat() with a tz, and this runs per recorded change.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.removesuffix("Z")).replace(tzinfo=UTC)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.removesuffix("Z")).replace(tzinfo=UTC)


def _json(value: str | None) -> dict[str, Any] | None:
    return None if value is None else dict(json.loads(value))


@dataclass(frozen=True, slots=True)
class CreatedBuild:
    """A build just recorded: its ids and number, for the runner."""

    id: str
    number: int
    org: str
    pipeline: str
    job_ids: Mapping[str, str]  # step key -> job id


@dataclass(frozen=True, slots=True)
class OrganizationRow:
    """An organization. ``name`` and ``url`` are what ``createOrganization`` was given; None
    for one that `run` made on first use (and for ``local``): the slug is its name."""

    slug: str
    created_at: datetime
    name: str | None = None
    url: str | None = None

    @classmethod
    def from_db(cls, r: DbRow) -> OrganizationRow:
        return cls(slug=r["slug"], created_at=_time(r["created_at"]), name=r["name"], url=r["url"])


@dataclass(frozen=True, slots=True)
class PipelineRow:
    """A pipeline. The fields after ``created_at`` are what ``createPipeline`` was given;
    None for one that `run` made on first use."""

    org: str
    slug: str
    created_at: datetime
    name: str | None = None
    repository: str | None = None
    default_branch: str | None = None
    description: str | None = None
    repo_name: str | None = None

    @classmethod
    def from_db(cls, r: DbRow) -> PipelineRow:
        return cls(
            org=r["org"],
            slug=r["slug"],
            created_at=_time(r["created_at"]),
            name=r["name"],
            repository=r["repository"],
            default_branch=r["default_branch"],
            description=r["description"],
            repo_name=r["repo_name"],
        )


@dataclass(frozen=True, slots=True)
class TokenRow:
    """An API token's record (never its secret: only the SHA-256 of it is stored)."""

    id: str
    description: str | None
    organizations: tuple[str, ...] | None  # None: every organization
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def from_db(cls, r: DbRow) -> TokenRow:
        orgs = r["organizations"]
        return cls(
            id=r["id"],
            description=r["description"],
            organizations=None if orgs is None else tuple(json.loads(orgs)),
            created_at=_time(r["created_at"]),
            expires_at=parse_time(r["expires_at"]),
            revoked_at=parse_time(r["revoked_at"]),
            last_used_at=parse_time(r["last_used_at"]),
        )

    def usable_at(self, now: datetime) -> bool:
        """Neither revoked nor expired at ``now``."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def sees(self, org: str) -> bool:
        return self.organizations is None or org in self.organizations


@dataclass(frozen=True, slots=True)
class BuildRow:
    id: str
    number: int
    org: str
    pipeline: str
    state: BuildState
    source: str
    branch: str | None
    commit: str | None
    message: str | None
    error_code: str | None
    error_message: str | None
    created_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    build_file: str | None
    working_dir: str
    cancel_requested: bool
    executor_host: str | None
    executor_pid: int | None
    heartbeat_at: datetime | None
    # The host whose `serve` queue took the build (its workspace is there); None for a build
    # a command (`run`, `retry`) ran directly.
    queue_host: str | None = None

    @property
    def queued(self) -> bool:
        """Waiting in a `serve` queue: recorded, not yet claimed by an executor."""
        return self.state is BuildState.SCHEDULED and self.executor_host is None

    @property
    def refused(self) -> bool:
        """Refused when it was submitted (``REFUSED_CODES``): nothing of it ran."""
        return self.state is BuildState.FAILED and self.error_code in REFUSED_CODES

    @classmethod
    def from_db(cls, r: DbRow) -> BuildRow:
        return cls(
            id=r["id"],
            number=r["number"],
            org=r["org"],
            pipeline=r["pipeline"],
            state=BuildState(r["state"]),
            source=r["source"],
            branch=r["branch"],
            commit=r["commit_sha"],
            message=r["message"],
            error_code=r["error_code"],
            error_message=r["error_message"],
            created_at=_time(r["created_at"]),
            scheduled_at=parse_time(r["scheduled_at"]),
            started_at=parse_time(r["started_at"]),
            finished_at=parse_time(r["finished_at"]),
            build_file=r["build_file"],
            working_dir=r["working_dir"],
            cancel_requested=bool(r["cancel_requested"]),
            executor_host=r["executor_host"],
            executor_pid=r["executor_pid"],
            heartbeat_at=parse_time(r["heartbeat_at"]),
            queue_host=r["queue_host"],
        )


@dataclass(frozen=True, slots=True)
class JobRow:
    id: str
    build_id: str
    position: int  # index in the plan order (topological)
    step_key: str
    name: str | None
    command: str | None
    state: JobState
    exit_code: int | None
    soft_failed: bool
    error_code: str | None
    error_message: str | None
    retry_policy: dict[str, Any] | None
    soft_fail_policy: dict[str, Any] | None
    retries_count: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    depends_on: tuple[str, ...]  # prerequisite job ids, in plan order
    reused_from_job_id: str | None = None  # its result was taken from this job (retry --failed)

    @classmethod
    def from_db(cls, r: DbRow, depends_on: tuple[str, ...]) -> JobRow:
        return cls(
            id=r["id"],
            build_id=r["build_id"],
            position=r["position"],
            step_key=r["step_key"],
            name=r["name"],
            command=r["command"],
            state=JobState(r["state"]),
            exit_code=r["exit_code"],
            soft_failed=bool(r["soft_failed"]),
            error_code=r["error_code"],
            error_message=r["error_message"],
            retry_policy=_json(r["retry_policy"]),
            soft_fail_policy=_json(r["soft_fail_policy"]),
            retries_count=r["retries_count"],
            created_at=_time(r["created_at"]),
            started_at=parse_time(r["started_at"]),
            finished_at=parse_time(r["finished_at"]),
            depends_on=depends_on,
            reused_from_job_id=r["reused_from_job_id"],
        )


class JobText(NamedTuple):
    """A job as stored, for readers that only pass it on (the API's job list): states and
    timestamps stay text (``format_time``'s RFC 3339 UTC), so nothing is parsed to be
    formatted back. Parsing three timestamps per row was most of a big job list's cost."""

    id: str
    step_key: str
    name: str | None
    command: str | None
    state: str
    exit_code: int | None
    soft_failed: bool
    error_code: str | None
    error_message: str | None
    retry_policy: dict[str, Any] | None
    soft_fail_policy: dict[str, Any] | None
    retries_count: int
    depends_on: tuple[str, ...]
    created_at: str
    started_at: str | None
    finished_at: str | None

    @classmethod
    def from_db(cls, r: DbRow, depends_on: tuple[str, ...]) -> JobText:
        return cls(
            r["id"],
            r["step_key"],
            r["name"],
            r["command"],
            r["state"],
            r["exit_code"],
            bool(r["soft_failed"]),
            r["error_code"],
            r["error_message"],
            _json(r["retry_policy"]),
            _json(r["soft_fail_policy"]),
            r["retries_count"],
            depends_on,
            r["created_at"],
            r["started_at"],
            r["finished_at"],
        )


@dataclass(frozen=True, slots=True)
class TransitionRow:
    """One entry of a job's history. ``seq`` 0 is the job's creation (``from_state`` None,
    ``event`` "created"); every later ``event`` is an ``Event`` value."""

    job_id: str
    seq: int
    from_state: JobState | None
    event: str
    to_state: JobState
    at: datetime

    @classmethod
    def from_db(cls, r: DbRow) -> TransitionRow:
        return cls(
            job_id=r["job_id"],
            seq=r["seq"],
            from_state=None if r["from_state"] is None else JobState(r["from_state"]),
            event=r["event"],
            to_state=JobState(r["to_state"]),
            at=_time(r["at"]),
        )


@dataclass(frozen=True, slots=True)
class AttemptRow:
    job_id: str
    number: int  # 1, 2, ...
    outcome: str | None  # None while the attempt runs
    exit_code: int | None
    signal: int | None
    started_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_db(cls, r: DbRow) -> AttemptRow:
        return cls(
            job_id=r["job_id"],
            number=r["number"],
            outcome=r["outcome"],
            exit_code=r["exit_code"],
            signal=r["signal"],
            started_at=_time(r["started_at"]),
            finished_at=parse_time(r["finished_at"]),
        )


class JobProgress(NamedTuple):
    """Where a job stands, for a live log stream: its state, exit code, and the number of its
    last finished attempt (0 before the first one ends; every chunk of a finished attempt is
    in the record)."""

    state: JobState
    exit_code: int | None
    finished_attempt: int

    @classmethod
    def from_db(cls, r: DbRow) -> JobProgress:
        return cls(JobState(r["state"]), r["exit_code"], int(r["finished_attempt"] or 0))


@dataclass(frozen=True, slots=True)
class LogChunk:
    job_id: str
    seq: int  # 1, 2, ... per job, in the order the output arrived
    attempt: int
    stream: str  # "stdout", "stderr" or "meta" (harmont-exec's own lines)
    content: bytes  # exactly as the process wrote it (not necessarily valid UTF-8)
    at: datetime

    @classmethod
    def from_db(cls, r: DbRow) -> LogChunk:
        return cls(
            job_id=r["job_id"],
            seq=r["seq"],
            attempt=r["attempt"],
            stream=r["stream"],
            content=bytes(r["content"]),
            at=_time(r["at"]),
        )


@dataclass(frozen=True, slots=True)
class ArtifactRow:
    """A file a job produced, kept in the store's artifact directory by its SHA-256."""

    id: str
    job_id: str
    build_id: str
    path: str  # relative to the build's working directory, "/"-separated
    filename: str
    mime_type: str
    file_size: int
    sha1_sum: str
    sha256: str
    state: str  # "uploaded" (Harmont's word: the file is in the store)
    created_at: datetime

    @classmethod
    def from_db(cls, r: DbRow) -> ArtifactRow:
        return cls(
            id=r["id"],
            job_id=r["job_id"],
            build_id=r["build_id"],
            path=r["path"],
            filename=r["filename"],
            mime_type=r["mime_type"] or "application/octet-stream",
            file_size=int(r["file_size"]),
            sha1_sum=r["sha1_sum"],
            sha256=r["sha256"],
            state=r["state"],
            created_at=_time(r["created_at"]),
        )
