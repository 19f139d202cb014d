"""The API's response shapes as pydantic models, for the OpenAPI document only.

They mirror Harmont's schemas (Job plus ``retries_count``; Build; Pipeline; Organization; the
lists; API tokens; the error envelope) so that the served document describes what the handlers
return and tools such as schemathesis can check it. Handlers build plain dicts (``wire``) and
return them as JSON directly: validating a 200-job list through these models on every request
would cost more than the rest of the request. The write routes' request bodies are ``body``'s.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ApiToken",
    "ApiTokenCreateResponse",
    "ApiTokenListResponse",
    "Artifact",
    "ArtifactList",
    "Attempt",
    "AttemptList",
    "Build",
    "BuildList",
    "CurrentUserResponse",
    "Error",
    "ErrorBody",
    "Job",
    "JobList",
    "LogStreamError",
    "LogTokenResponse",
    "Organization",
    "OrganizationList",
    "Ping",
    "Pipeline",
    "PipelineList",
]

JobStateName = Literal[
    "pending",
    "scheduled",
    "assigned",
    "running",
    "passed",
    "failed",
    "skipped",
    "canceling",
    "canceled",
    "timing_out",
    "timed_out",
]
BuildStateName = Literal[
    "scheduled", "running", "failing", "passed", "failed", "canceling", "canceled"
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Ping(_Model):
    status: Literal["ok"]


class Organization(_Model):
    slug: str
    name: str
    created_at: datetime
    url: str | None


class OrganizationList(_Model):
    data: list[Organization]
    next_cursor: str | None


class CurrentUserResponse(_Model):
    uuid: UUID
    email: str
    name: str | None
    personal_org_slug: str | None


class Pipeline(_Model):
    slug: str
    name: str
    description: str | None
    repository: str
    repo_name: str | None
    default_branch: str
    visibility: Literal["private", "public"]
    allow_manual: bool
    created_at: datetime


class PipelineList(_Model):
    data: list[Pipeline]
    next_cursor: str | None


class Build(_Model):
    number: int
    state: BuildStateName
    pipeline_slug: str
    source: str | None
    branch: str | None
    commit: str | None
    message: str | None
    error_code: str | None
    error_message: str | None
    created_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class BuildList(_Model):
    data: list[Build]
    next_cursor: str | None


class Job(_Model):
    id: UUID
    step_key: str | None
    name: str | None
    command: str | None
    state: JobStateName
    exit_code: int | None
    soft_failed: bool
    error_code: str | None
    error_message: str | None
    retry_policy: dict[str, Any] | None
    soft_fail_policy: dict[str, Any] | None
    retries_count: int
    depends_on: list[UUID]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(_Model):
    data: list[Job]


class LogTokenResponse(_Model):
    token: str
    expires_at: datetime


class Attempt(_Model):
    number: int
    outcome: str | None
    exit_code: int | None
    signal: int | None
    started_at: datetime
    finished_at: datetime | None


class AttemptList(_Model):
    data: list[Attempt]


class ErrorBody(_Model):
    type: str
    code: str
    message: str
    doc_url: str
    request_id: str


class Error(_Model):
    """Harmont's error envelope (its schema is named ``Error``)."""

    error: ErrorBody


class LogStreamError(_Model):
    """The live log stream's refusals: Harmont's flat body, not the envelope."""

    code: Literal["log_stream_unauthorized", "log_stream_forbidden"]
    message: str


class ApiToken(_Model):
    """An API token's record; its secret is shown once, at creation."""

    id: UUID
    description: str | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


class ApiTokenListResponse(_Model):
    api_tokens: list[ApiToken]


class ApiTokenCreateResponse(_Model):
    token: str
    api_token: ApiToken


class Artifact(_Model):
    id: UUID
    job_id: UUID
    path: str
    filename: str
    mime_type: str
    file_size: int
    sha1_sum: str
    sha256: str
    state: Literal["uploaded"]


class ArtifactList(_Model):
    data: list[Artifact]
    next_cursor: str | None
