"""The tenancy rule, in one place: the organization / pipeline / build / job / artifact lookups
that answer the SAME 404 for what does not exist and for what the caller's token may not see.

Every route finds what its path names through these functions, so that a token limited to
some organizations learns nothing about the others: the rule is written once, in
``organization_of`` (``organizations_of`` for the list); ``pipeline_of``, hence ``build_of``
and ``job_of``, goes through it, and
``job_in`` / ``artifact_in`` look inside a build found that way. They are synchronous store
reads, to be run in a worker thread by ``read``: each handler's reads in ONE hop, since a hop
to a thread costs more than a read of a row.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio

from executor.api.errors import ApiError, not_found_error
from executor.api.paths import BUILDS, ORGANIZATIONS, PIPELINES
from executor.errors import ErrorCode
from executor.store import (
    ArtifactRow,
    BuildRow,
    JobRow,
    OrganizationRow,
    PipelineRow,
    Store,
    TokenRow,
)

__all__ = [
    "artifact_in",
    "build_of",
    "is_uuid",
    "job_in",
    "job_of",
    "organization_of",
    "organizations_of",
    "pipeline_of",
    "read",
]

T = TypeVar("T")


async def read(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread: store reads never block the event loop."""
    return await anyio.to_thread.run_sync(partial(fn, *args))


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36


def organizations_of(store: Store, token: TokenRow) -> list[OrganizationRow]:
    """The organizations ``token`` may see, by slug."""
    return [o for o in store.list_organizations() if token.sees(o.slug)]


def _organization_missing(org: str) -> ApiError:
    return not_found_error(
        ErrorCode.ORGANIZATION_NOT_FOUND,
        f"no organization {org!r} that this token can see; list them with GET {ORGANIZATIONS}",
    )


def organization_of(store: Store, token: TokenRow, org: str) -> OrganizationRow:
    """The organization ``org``; the same 404 ``organization_not_found`` whether it does not
    exist or ``token`` may not see it."""
    row = store.get_organization(org) if token.sees(org) else None
    if row is None:
        raise _organization_missing(org)
    return row


def pipeline_of(store: Store, token: TokenRow, org: str, pipeline: str) -> PipelineRow:
    """The pipeline; the organization's 404 first (``organization_of``), then
    ``pipeline_not_found``."""
    row = store.get_pipeline(org, pipeline) if token.sees(org) else None
    if row is None:
        organization_of(store, token, org)
        raise not_found_error(
            ErrorCode.PIPELINE_NOT_FOUND,
            f"no pipeline {pipeline!r} in organization {org!r}; list them with "
            f"GET {PIPELINES.format(org=org)}",
        )
    return row


def build_of(store: Store, token: TokenRow, org: str, pipeline: str, number: int) -> BuildRow:
    """Build ``number`` of the pipeline (``pipeline_of``'s 404s first); ``build_not_found``."""
    pipeline_of(store, token, org, pipeline)
    build = None
    if 0 < number < 1 << 63:  # beyond, SQLite cannot even compare it: surely no such build
        build = store.get_build(number, org=org, pipeline=pipeline)
    if build is None:
        raise not_found_error(
            ErrorCode.BUILD_NOT_FOUND,
            f"no build #{number} in {org}/{pipeline}; list them with GET "
            f"{BUILDS.format(org=org, pipeline=pipeline)}",
        )
    return build


def job_in(store: Store, build: BuildRow, job_id: str) -> JobRow:
    """The build's job ``job_id`` (a full UUID); 404 ``job_not_found`` otherwise (a job of
    another build too)."""
    job = store.get_job(job_id.lower()) if is_uuid(job_id) else None
    if job is None or job.build_id != build.id:
        raise not_found_error(
            ErrorCode.JOB_NOT_FOUND,
            f"no job {job_id!r} in build #{build.number} of {build.org}/{build.pipeline}; "
            f"job ids are the UUIDs listed by GET .../builds/{build.number}/jobs",
        )
    return job


def job_of(
    store: Store, token: TokenRow, org: str, pipeline: str, number: int, job_id: str
) -> JobRow:
    """Job ``job_id`` of build ``number`` (``build_of``'s 404s first)."""
    return job_in(store, build_of(store, token, org, pipeline, number), job_id)


def artifact_in(store: Store, build: BuildRow, artifact_id: str) -> ArtifactRow:
    """The build's artifact ``artifact_id`` (a full UUID); 404 ``artifact_not_found``
    otherwise (an artifact of another build too)."""
    artifact = store.get_artifact(artifact_id.lower()) if is_uuid(artifact_id) else None
    if artifact is None or artifact.build_id != build.id:
        raise not_found_error(
            ErrorCode.ARTIFACT_NOT_FOUND,
            f"no artifact {artifact_id!r} in build #{build.number} of {build.org}/"
            f"{build.pipeline}; list them with GET .../builds/{build.number}/artifacts",
        )
    return artifact
