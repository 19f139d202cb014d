"""An organization's pipelines, one of them, and a new one (SPEC §6.1, §6.3).

A new pipeline's slug is derived from its name by the store (a taken one is a 422
``slug_taken``); its ``repo_name``, when not given, from its repository's URL
(``https://host/owner/repo.git`` or ``git@host:owner/repo.git``: ``owner/repo``), as Harmont does.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from fastapi import Request
from fastapi.responses import JSONResponse

from executor.api import models, wire
from executor.api.body import (
    SMALL_BODY_LIMIT,
    CreatePipelineRequest,
    parse,
    read_body,
    request_body,
)
from executor.api.deps import Caller, Cursor, Limit, StoreDep
from executor.api.errors import documented, documented_write, store_refusals
from executor.api.lookup import organization_of, pipeline_of, read
from executor.api.middleware import HeadRouter
from executor.api.pagination import clamp, decode_cursor, page_json
from executor.api.paths import PIPELINE, PIPELINES
from executor.store import PipelineRow, Store, TokenRow

_REPO_NAME = re.compile(
    r"^(?:[a-z][a-z0-9+.-]*://[^/]+/|[^@/:]+@[^/:]+:)(?P<name>[^/]+/[^/]+?)(?:\.git)?/?$"
)

__all__ = ["router"]

router = HeadRouter()


@router.get(
    PIPELINES,
    tags=["pipelines"],
    operation_id="listPipelines",
    summary="An organization's pipelines",
    **documented(models.PipelineList, 400),
)
async def pipelines(
    org: str, store: StoreDep, token: Caller, limit: Limit = 50, cursor: Cursor = None
) -> JSONResponse:
    after = "" if cursor is None else decode_cursor(cursor, "pipelines", str)
    size = clamp(limit)
    rows = await read(_pipelines_after, store, token, org, after, size + 1)
    return JSONResponse(page_json(rows, size, "pipelines", wire.pipeline_json, lambda p: p.slug))


def _pipelines_after(
    store: Store, token: TokenRow, org: str, after: str, limit: int
) -> list[PipelineRow]:
    organization_of(store, token, org)
    return store.list_pipelines(org, after=after, limit=limit)


@router.post(
    PIPELINES,
    tags=["pipelines"],
    operation_id="createPipeline",
    summary="Create a pipeline; its slug is derived from the name",
    **documented_write(
        models.Pipeline,
        201,
        404,
        413,
        s422="Not a CreatePipelineRequest, or the name's slug is taken or empty",
        openapi_extra=request_body(CreatePipelineRequest),
    ),
)
async def create_pipeline(
    org: str, request: Request, store: StoreDep, token: Caller
) -> JSONResponse:
    await read(organization_of, store, token, org)
    body = parse(CreatePipelineRequest, await read_body(request, SMALL_BODY_LIMIT))
    row = await read(_create_pipeline, store, org, body)
    return JSONResponse(
        wire.pipeline_json(row),
        status_code=201,
        headers={"location": PIPELINE.format(org=org, pipeline=row.slug)},
    )


def repo_name_of(repository: str) -> str | None:
    """``owner/repo`` from a clone URL, or None when it is not one."""
    found = _REPO_NAME.match(repository.strip())
    return None if found is None else found["name"]


def _create_pipeline(store: Store, org: str, body: CreatePipelineRequest) -> PipelineRow:
    with store_refusals():
        return store.create_pipeline(
            org,
            name=body.name,
            repository=body.repository,
            default_branch=body.default_branch,
            description=body.description,
            repo_name=body.repo_name
            if body.repo_name is not None
            else repo_name_of(body.repository),
            now=datetime.now(UTC),
        )


@router.get(
    PIPELINE,
    tags=["pipelines"],
    operation_id="getPipeline",
    summary="A pipeline",
    **documented(models.Pipeline),
)
async def pipeline(org: str, pipeline: str, store: StoreDep, token: Caller) -> JSONResponse:
    return JSONResponse(wire.pipeline_json(await read(pipeline_of, store, token, org, pipeline)))
