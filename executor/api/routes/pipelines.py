"""An organization's pipelines, and one of them."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from executor.api import models, wire
from executor.api.deps import Caller, Cursor, Limit, StoreDep
from executor.api.errors import documented
from executor.api.lookup import organization_of, pipeline_of, read
from executor.api.middleware import HeadRouter
from executor.api.pagination import clamp, decode_cursor, page_json
from executor.api.paths import PIPELINE, PIPELINES
from executor.store import PipelineRow, Store, TokenRow

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


@router.get(
    PIPELINE,
    tags=["pipelines"],
    operation_id="getPipeline",
    summary="A pipeline",
    **documented(models.Pipeline),
)
async def pipeline(org: str, pipeline: str, store: StoreDep, token: Caller) -> JSONResponse:
    return JSONResponse(wire.pipeline_json(await read(pipeline_of, store, token, org, pipeline)))
