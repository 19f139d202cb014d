"""What every route needs: the caller's token, and the org / pipeline / build / job lookups
that answer the SAME 404 for what does not exist and for what the token may not see.

``Lookups`` runs store reads in a worker thread (``read``): each handler's reads in ONE hop,
since a hop to a thread costs more than a read of a row. The lookup methods are synchronous,
to be called inside that hop.
"""

# No ``from __future__ import annotations``: FastAPI reads ``caller``'s annotations at runtime.
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from executor.api import models
from executor.api.errors import ApiError, not_found, unauthorized
from executor.store import BuildRow, JobRow, OrganizationRow, Store, TokenRow

__all__ = ["API_PREFIX", "STATUS_TEXT", "Lookups", "clamp", "documented", "is_uuid"]

API_PREFIX = "/api/v0"
T = TypeVar("T")

STATUS_TEXT = {
    400: "An invalid cursor",
    401: "No token, or not a usable one",
    404: "Not found, or not visible to this token",
    422: "A path or query value of the wrong type",
    503: "The record's database is unreachable or refusing now; retry later",
}

_bearer = HTTPBearer(auto_error=False, description="A token from `harmont-exec token create`.")


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36


def clamp(limit: int) -> int:
    """A page size within 1-100 (SPEC §6: out of range is clamped, not refused)."""
    return max(1, min(100, limit))


def documented(model: type[Any], *errors: int, **extra: Any) -> dict[str, Any]:
    """Route options: the 200 body's model and the error statuses, as the envelope."""
    responses: dict[int | str, Any] = {200: {"model": model}}
    for status in (401, 404, 422, 503, *errors):
        responses[status] = {"model": models.Error, "description": STATUS_TEXT[status]}
    return {"responses": responses, **extra}


class Lookups:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread: store reads never block the event loop."""
        return await anyio.to_thread.run_sync(partial(fn, *args))

    async def caller(
        self,
        request: Request,
        _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> TokenRow:
        """The route dependency for a Bearer token (401 envelope for anything else)."""
        # Parsed here, not by HTTPBearer (which only documents it): the scheme must be exactly
        # "Bearer", and every failure must be the envelope.
        header = request.headers.get("authorization")
        if header is None:
            raise unauthorized(
                "no Authorization header; send 'Authorization: Bearer hm_...' with a token "
                "from `harmont-exec token create`"
            )
        scheme, _, secret = header.partition(" ")
        if scheme != "Bearer" or not secret.startswith("hm_"):
            raise unauthorized(
                "the Authorization header is not 'Bearer hm_...' (the scheme is "
                "case-sensitive); send a token from `harmont-exec token create`"
            )
        token = await self.read(self.store.token_for_secret, secret)
        if token is None:
            raise unauthorized(
                "this token is not known here; create one with `harmont-exec token create`"
            )
        if not token.usable_at(datetime.now(UTC)):
            why = "revoked" if token.revoked_at is not None else "expired"
            raise unauthorized(
                f"token {token.id} is {why}; create a new one with `harmont-exec token create`"
            )
        return token

    @staticmethod
    def org_missing(org: str) -> ApiError:
        return not_found(
            "organization_not_found",
            f"no organization {org!r} that this token can see; list them with "
            f"GET {API_PREFIX}/organizations",
        )

    def organization_of(self, token: TokenRow, org: str) -> OrganizationRow:
        row = self.store.get_organization(org) if token.sees(org) else None
        if row is None:
            raise self.org_missing(org)
        return row

    def pipeline_of(self, token: TokenRow, org: str, pipeline: str) -> None:
        if not token.sees(org):
            raise self.org_missing(org)
        if self.store.get_pipeline(org, pipeline) is None:
            if not any(o.slug == org for o in self.store.list_organizations()):
                raise self.org_missing(org)
            raise not_found(
                "pipeline_not_found",
                f"no pipeline {pipeline!r} in organization {org!r}; list them with "
                f"GET {API_PREFIX}/organizations/{org}/pipelines",
            )

    def build_of(self, token: TokenRow, org: str, pipeline: str, number: int) -> BuildRow:
        self.pipeline_of(token, org, pipeline)
        build = None
        if 0 < number < 1 << 63:  # beyond, SQLite cannot even compare it: surely no such build
            build = self.store.get_build(number, org=org, pipeline=pipeline)
        if build is None:
            raise not_found(
                "build_not_found",
                f"no build #{number} in {org}/{pipeline}; list them with GET "
                f"{API_PREFIX}/organizations/{org}/pipelines/{pipeline}/builds",
            )
        return build

    def job_in(self, build: BuildRow, job_id: str) -> JobRow:
        """The build's job ``job_id`` (a full UUID); 404 ``job_not_found`` otherwise."""
        job = self.store.get_job(job_id.lower()) if is_uuid(job_id) else None
        if job is None or job.build_id != build.id:
            raise not_found(
                "job_not_found",
                f"no job {job_id!r} in build #{build.number} of {build.org}/{build.pipeline}; "
                f"job ids are the UUIDs listed by GET .../builds/{build.number}/jobs",
            )
        return job

    def job_of(self, token: TokenRow, org: str, pipeline: str, number: int, job_id: str) -> JobRow:
        return self.job_in(self.build_of(token, org, pipeline, number), job_id)
