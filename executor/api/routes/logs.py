"""A job's raw log: every attempt's output, byte for byte as the store keeps it (the live,
decoded stream is ``live``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from fastapi.responses import StreamingResponse

from executor.api.deps import Caller, StoreDep
from executor.api.errors import error_responses
from executor.api.lookup import job_of, read
from executor.api.middleware import HeadRouter
from executor.api.paths import JOB
from executor.store import Store
from executor.store.reads import LOG_PAGE_ROWS

__all__ = ["router"]

router = HeadRouter()


@router.get(
    f"{JOB}/log",
    tags=["jobs"],
    operation_id="getJobLog",
    summary="A job's raw output, every attempt (extension)",
    openapi_extra={"x-harmont-extension": True},
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(401, 404, 422),
    },
)
async def job_log(
    org: str, pipeline: str, number: int, job_id: str, store: StoreDep, token: Caller
) -> StreamingResponse:
    row = await read(job_of, store, token, org, pipeline, number, job_id)
    return StreamingResponse(_chunks(store, row.id), media_type="text/plain")


async def _chunks(store: Store, job_id: str) -> AsyncIterator[bytes]:
    # A page of chunks per hop: a long log is never held whole in memory.
    after = 0
    while True:
        page = await read(partial(store.log_page, job_id, after_seq=after))
        for chunk in page:
            yield chunk.content
        if len(page) < LOG_PAGE_ROWS:
            return
        after = page[-1].seq
