"""A pipeline's builds, newest first, and one of them."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from executor.api import models, wire
from executor.api.deps import Caller, Cursor, Limit, StoreDep
from executor.api.errors import documented
from executor.api.lookup import build_of, pipeline_of, read
from executor.api.middleware import HeadRouter
from executor.api.pagination import clamp, decode_cursor, page_json
from executor.api.paths import BUILD, BUILDS
from executor.store import BuildRow, Store, TokenRow

__all__ = ["router"]

router = HeadRouter()


@router.get(
    BUILDS,
    tags=["builds"],
    operation_id="listBuilds",
    summary="A pipeline's builds, newest first",
    **documented(models.BuildList, 400),
)
async def builds(
    org: str,
    pipeline: str,
    store: StoreDep,
    token: Caller,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> JSONResponse:
    before = None if cursor is None else decode_cursor(cursor, "builds", int)
    size = clamp(limit)
    rows = await read(_builds_before, store, token, org, pipeline, before, size + 1)
    return JSONResponse(page_json(rows, size, "builds", wire.build_json, lambda b: b.number))


def _builds_before(
    store: Store, token: TokenRow, org: str, pipeline: str, before: int | None, limit: int
) -> list[BuildRow]:
    pipeline_of(store, token, org, pipeline)
    return store.builds_page(org, pipeline, before=before, limit=limit)


@router.get(
    BUILD,
    tags=["builds"],
    operation_id="getBuild",
    summary="A build",
    **documented(models.Build),
)
async def build(
    org: str, pipeline: str, number: int, store: StoreDep, token: Caller
) -> JSONResponse:
    return JSONResponse(wire.build_json(await read(build_of, store, token, org, pipeline, number)))
