"""The live routes (SPEC §6.2, §9): a build's log token, a job's live log stream and a build's
live state changes (Server-Sent Events). The protocols are ``executor.api.live`` and
``executor.api.events``; these only bind them to HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from executor.api import models
from executor.api.deps import Caller, LiveLogDep, StoreDep
from executor.api.errors import error_responses
from executor.api.events import admit_build, build_events, resume_after
from executor.api.live import EVENT_SCHEMA, LiveLog, LogGrant, resume_point
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


def _stream_doc(resume: str, ok: str, forbidden: str) -> dict[str, Any]:
    """What the two live streams document alike: the Last-Event-ID header (read by the route,
    not declared: FastAPI would document an optional header as nullable), the event stream,
    and Harmont's flat refusals."""
    refusal = {"model": models.LogStreamError}
    return {
        "openapi_extra": {
            "parameters": [
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": resume,
                    "schema": {"type": "string"},
                }
            ]
        },
        "response_class": StreamingResponse,
        "responses": {
            200: {"description": ok, "content": {"text/event-stream": {"schema": EVENT_SCHEMA}}},
            401: {**refusal, "description": "No log token, not one this server minted, or expired"},
            403: {**refusal, "description": forbidden},
            429: {**refusal, "description": "Too many live streams open for this token"},
            **error_responses(422),
        },
    }


def _stream(live_log: LiveLog, grant: LogGrant, events: AsyncIterator[bytes]) -> StreamingResponse:
    """``events`` as a live stream, counted against its API token's streams (429 past them)."""
    live_log.check_room(grant)
    return StreamingResponse(
        live_log.counted(grant, events),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


@router.get(
    LIVE_LOG,
    tags=["jobs"],
    operation_id="streamJobLogs",
    summary="A job's log as Server-Sent Events (history, chunk, done)",
    **_stream_doc(
        "Resume after this chunk seq (EventSource sends it); a negative value counts as 0, "
        "one that is not an integer is ignored.",
        "A history event (no id), then a chunk event per new piece of output (id: its seq), "
        "then done once the job has ended",
        "The job is not in the log token's build",
    ),
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
    after = resume_point(request.headers.get("last-event-id"), last_event_id)
    job, grant = await read(live_log.admit, store, token, job_id)
    return _stream(live_log, grant, live_log.events(store, job, grant, after))


_EVENTS_DOC = _stream_doc(
    "Resume after this change (EventSource sends it).",
    "The build now, then a job event per job change (the last of each batch with id: the "
    "change), a build event when the build changes, done once it is finished",
    "The log token is another build's",
)
_EVENTS_DOC["openapi_extra"]["x-harmont-extension"] = True


@router.get(
    BUILD_EVENTS,
    tags=["builds"],
    operation_id="streamBuildEvents",
    summary="A build's state changes as Server-Sent Events (build, job, done)",
    **_EVENTS_DOC,
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
    return _stream(live_log, grant, build_events(live_log, store, build, grant, start))
