"""The live routes (SPEC §6.2, §9): a build's log token, a job's live log stream and a build's
live state changes (Server-Sent Events). The protocols are ``executor.api.live`` and
``executor.api.events``; these only bind them to HTTP.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from executor.api import models
from executor.api.deps import Caller, LiveLogDep, StoreDep
from executor.api.errors import error_responses
from executor.api.events import admit_build, build_events, resume_after
from executor.api.live import EVENT_SCHEMA, LiveLog, resume_point
from executor.api.lookup import build_of, read
from executor.api.middleware import HeadRouter
from executor.api.paths import BUILD, BUILD_EVENTS, LIVE_LOG
from executor.store import Store, TokenRow

__all__ = ["router"]

router = HeadRouter()


@router.get(
    f"{BUILD}/log-token",
    tags=["builds"],
    operation_id="getBuildLogToken",
    summary="Mint a build-scoped log token for the SSE log stream",
    responses={200: {"model": models.LogTokenResponse}, **error_responses(401, 404, 422)},
)
async def log_token(
    org: str, pipeline: str, number: int, store: StoreDep, token: Caller, live_log: LiveLogDep
) -> JSONResponse:
    return JSONResponse(await read(_issue, live_log, store, token, org, pipeline, number))


def _issue(
    live_log: LiveLog, store: Store, token: TokenRow, org: str, pipeline: str, number: int
) -> dict[str, Any]:
    return live_log.issue(store, build_of(store, token, org, pipeline, number).id, token)


@router.get(
    LIVE_LOG,
    tags=["jobs"],
    operation_id="streamJobLogs",
    summary="A job's log as Server-Sent Events (history, chunk, done)",
    openapi_extra={
        "parameters": [
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Resume after this chunk seq (EventSource sends it); a "
                "negative value counts as 0, one that is not an integer is ignored.",
                "schema": {"type": "string"},
            }
        ]
    },
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "A history event (no id), then a chunk event per new piece of "
            "output (id: its seq), then done once the job has ended",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
        },
        401: {
            "model": models.LogStreamError,
            "description": "No log token, not one this server minted, or expired",
        },
        403: {
            "model": models.LogStreamError,
            "description": "The job is not in the log token's build",
        },
        429: {
            "model": models.LogStreamError,
            "description": "Too many live streams open for this token",
        },
        **error_responses(422),
    },
)
async def job_log_stream(
    job_id: str,
    request: Request,
    store: StoreDep,
    live_log: LiveLogDep,
    token: Annotated[
        str | None, Query(description="A token from …/builds/{number}/log-token.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Query(description="Resume after this chunk seq (when no Last-Event-ID header)."),
    ] = None,
) -> StreamingResponse:
    # Read here rather than declared: FastAPI would document an optional header as
    # nullable. Documented in openapi_extra.
    after = resume_point(request.headers.get("last-event-id"), last_event_id)
    job, grant = await read(live_log.admit, store, token, job_id)
    live_log.check_room(grant)
    return StreamingResponse(
        live_log.counted(grant, live_log.events(store, job, grant, after)),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@router.get(
    BUILD_EVENTS,
    tags=["builds"],
    operation_id="streamBuildEvents",
    summary="A build's state changes as Server-Sent Events (build, job, done)",
    openapi_extra={
        "x-harmont-extension": True,
        "parameters": [
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Resume after this change (EventSource sends it).",
                "schema": {"type": "string"},
            }
        ],
    },
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The build now, then a job event per job change (id: the "
            "change), a build event when the build changes, done once it is finished",
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
        },
        401: {
            "model": models.LogStreamError,
            "description": "No log token, not one this server minted, or expired",
        },
        403: {
            "model": models.LogStreamError,
            "description": "The log token is another build's",
        },
        429: {
            "model": models.LogStreamError,
            "description": "Too many live streams open for this token",
        },
        **error_responses(422),
    },
)
async def build_event_stream(
    build_id: str,
    request: Request,
    store: StoreDep,
    live_log: LiveLogDep,
    token: Annotated[
        str | None, Query(description="A token from …/builds/{number}/log-token.")
    ] = None,
    after: Annotated[
        str | None,
        Query(description="Send the changes after this one (when no Last-Event-ID header)."),
    ] = None,
) -> StreamingResponse:
    build, grant = await read(admit_build, live_log, store, token, build_id)
    now = await read(store.last_change)
    start = resume_after(request.headers.get("last-event-id"), after, now)
    live_log.check_room(grant)
    return StreamingResponse(
        live_log.counted(grant, build_events(live_log, store, build, grant, start)),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
