"""``GET /api/v0/ping``: liveness, without a token."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from executor.api import models
from executor.api.middleware import HeadRouter
from executor.api.paths import API_PREFIX

__all__ = ["router"]

router = HeadRouter()


@router.get(
    f"{API_PREFIX}/ping",
    tags=["meta"],
    operation_id="ping",
    summary="Liveness (no auth)",
    responses={200: {"model": models.Ping}},
)
async def ping() -> JSONResponse:
    return JSONResponse({"status": "ok"})
