"""Store rows in Harmont's wire format (SPEC §6): each row as the JSON object the API sends.

Job and Build objects carry exactly the fields of Harmont's schemas (Job plus
``retries_count``), timestamps as RFC 3339 UTC. Pipelines and organizations that ``run`` made
on first use have no repository, website or visibility settings: the fields Harmont requires
get fixed values, documented in docs/api.md (those made through the API keep what they were
created with). Pure: no I/O, no HTTP (pages and cursors are ``pagination``'s).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from executor.store import (
    ArtifactRow,
    AttemptRow,
    BuildRow,
    JobRow,
    JobText,
    OrganizationRow,
    PipelineRow,
    TokenRow,
)
from executor.store.rows import format_time

__all__ = [
    "LOCAL_USER_ID",
    "artifact_json",
    "attempt_json",
    "build_json",
    "current_user_json",
    "job_json",
    "organization_json",
    "pipeline_json",
    "token_json",
]


def _time(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


LOCAL_USER_ID = "4c0ca1e5-0000-4000-8000-000000000001"
"""harmont-exec has no user accounts: every token belongs to this one local user."""


def current_user_json(personal_org: str | None) -> dict[str, Any]:
    """Harmont's CurrentUserResponse for the local user (SPEC §6.1)."""
    return {
        "uuid": LOCAL_USER_ID,
        "email": "local@localhost",
        "name": "local",
        "personal_org_slug": personal_org,
    }


def organization_json(org: OrganizationRow) -> dict[str, Any]:
    """What ``createOrganization`` was given; for one ``run`` made, the slug as its name."""
    return {
        "slug": org.slug,
        "name": org.slug if org.name is None else org.name,
        "created_at": _time(org.created_at),
        "url": org.url,
    }


def pipeline_json(pipeline: PipelineRow) -> dict[str, Any]:
    """What ``createPipeline`` was given; for one ``run`` made, the fixed local values."""
    return {
        "slug": pipeline.slug,
        "name": pipeline.slug if pipeline.name is None else pipeline.name,
        "description": pipeline.description,
        "repository": "local" if pipeline.repository is None else pipeline.repository,
        "repo_name": pipeline.repo_name,
        "default_branch": "main" if pipeline.default_branch is None else pipeline.default_branch,
        "visibility": "private",
        "allow_manual": True,
        "created_at": _time(pipeline.created_at),
    }


def build_json(build: BuildRow) -> dict[str, Any]:
    return {
        "number": build.number,
        "state": build.state.value,
        "pipeline_slug": build.pipeline,
        "source": build.source,
        "branch": build.branch,
        "commit": build.commit,
        "message": build.message,
        "error_code": build.error_code,
        "error_message": build.error_message,
        "created_at": _time(build.created_at),
        "scheduled_at": _time(build.scheduled_at),
        "started_at": _time(build.started_at),
        "finished_at": _time(build.finished_at),
    }


def _stamp(value: datetime | str | None) -> str | None:
    """RFC 3339 UTC text: formatted from a datetime, or as stored (already that text)."""
    return value if value is None or isinstance(value, str) else format_time(value)


def job_json(job: JobRow | JobText) -> dict[str, Any]:
    """A Job from a typed row, or from one read as text (the job list: nothing is parsed)."""
    return {
        "id": job.id,
        "step_key": job.step_key,
        "name": job.name,
        "command": job.command,
        "state": job.state.value if isinstance(job, JobRow) else job.state,
        "exit_code": job.exit_code,
        "soft_failed": job.soft_failed,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "retry_policy": job.retry_policy,
        "soft_fail_policy": job.soft_fail_policy,
        "retries_count": job.retries_count,
        "depends_on": list(job.depends_on),
        "created_at": _stamp(job.created_at),
        "started_at": _stamp(job.started_at),
        "finished_at": _stamp(job.finished_at),
    }


def token_json(token: TokenRow) -> dict[str, Any]:
    """Harmont's ApiToken: never the secret, which only its creation shows."""
    return {
        "id": token.id,
        "description": token.description,
        "created_at": _time(token.created_at),
        "expires_at": _time(token.expires_at),
        "last_used_at": _time(token.last_used_at),
    }


def attempt_json(attempt: AttemptRow) -> dict[str, Any]:
    return {
        "number": attempt.number,
        "outcome": attempt.outcome,
        "exit_code": attempt.exit_code,
        "signal": attempt.signal,
        "started_at": _time(attempt.started_at),
        "finished_at": _time(attempt.finished_at),
    }


def artifact_json(artifact: ArtifactRow) -> dict[str, Any]:
    """Harmont's artifact columns, plus ``sha256`` (the content's address in the store)."""
    return {
        "id": artifact.id,
        "job_id": artifact.job_id,
        "path": artifact.path,
        "filename": artifact.filename,
        "mime_type": artifact.mime_type,
        "file_size": artifact.file_size,
        "sha1_sum": artifact.sha1_sum,
        "sha256": artifact.sha256,
        "state": artifact.state,
    }
