"""The API's response shapes as pydantic models, for the OpenAPI document only.

They mirror Harmont's schemas (Job plus ``retries_count``; Build; Pipeline; Organization; the
lists; the error envelope) so that the served document describes what the handlers return and
tools such as schemathesis can check it. Handlers build plain dicts (``wire``) and return them
as JSON directly: validating a 200-job list through these models on every request would cost
more than the rest of the request.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "Artifact",
    "ArtifactList",
    "Attempt",
    "AttemptList",
    "Build",
    "BuildList",
    "ErrorBody",
    "ErrorEnvelope",
    "Job",
    "JobList",
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
    created_at: str
    url: str | None


class OrganizationList(_Model):
    data: list[Organization]
    next_cursor: str | None


class Pipeline(_Model):
    slug: str
    name: str
    description: str | None
    repository: str
    repo_name: str | None
    default_branch: str
    visibility: Literal["private", "public"]
    allow_manual: bool
    created_at: str


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
    created_at: str
    scheduled_at: str | None
    started_at: str | None
    finished_at: str | None


class BuildList(_Model):
    data: list[Build]
    next_cursor: str | None


class Job(_Model):
    id: str
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
    depends_on: list[str]
    created_at: str
    started_at: str | None
    finished_at: str | None


class JobList(_Model):
    data: list[Job]


class Attempt(_Model):
    number: int
    outcome: str | None
    exit_code: int | None
    signal: int | None
    started_at: str
    finished_at: str | None


class AttemptList(_Model):
    data: list[Attempt]


class ErrorBody(_Model):
    type: str
    code: str
    message: str
    doc_url: str
    request_id: str


class ErrorEnvelope(_Model):
    error: ErrorBody


class Artifact(_Model):
    id: str
    job_id: str
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
