"""The read API: ``create_app(db)`` serves a store in Harmont's wire format (SPEC §6).

Every handler is async and reads the store in a worker thread (``anyio.to_thread``), so a slow
read never blocks the event loop; the store's reads see only committed data, so a build that
``harmont-exec run`` is recording shows its live state. Auth is a Bearer token (see
``harmont-exec token``); a token limited to some organizations gets, for every other one, the
same 404 as for something that does not exist. Every error is Harmont's envelope with the
request id (``errors``); ``RequestIdMiddleware`` sets that id first and turns a crash into a
500 envelope too.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at
# runtime, and the dependency aliases (Caller, Limit, Cursor) are local to create_app.
import importlib.metadata
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from executor.api import models, wire
from executor.api.artifacts import add_artifact_routes
from executor.api.errors import ApiError, envelope, not_found
from executor.api.live import add_live_log_routes
from executor.api.lookup import API_PREFIX, STATUS_TEXT, Lookups, clamp, documented
from executor.api.middleware import CorsMiddleware, HeadMiddleware, add_head_routes
from executor.errors import ErrorCode, StoreError, StoreReadOnlyError
from executor.store import (
    AttemptRow,
    BuildRow,
    JobText,
    PipelineRow,
    Store,
    TokenRow,
    open_store,
)
from executor.store.reads import LOG_PAGE_ROWS

__all__ = ["API_PREFIX", "STORE_RETRY_AFTER_S", "create_app"]

STORE_RETRY_AFTER_S = 5
"""The Retry-After of a 503 store_unavailable."""

log = logging.getLogger("executor.api")
T = TypeVar("T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestIdMiddleware:
    """Gives every request an id (``x-request-id`` on every response, and in error bodies)
    and answers an unexpected exception with the 500 envelope instead of a bare page."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except StoreReadOnlyError as exc:  # retrying will not help: say what would
            if started:
                raise
            response = _error_response(
                ApiError(503, "server_error", ErrorCode.STORE_READ_ONLY, str(exc)), request_id
            )
            await response(scope, receive, send_with_id)
        except StoreError as exc:  # the database is down or refusing: not a bug, no traceback
            log.warning(
                "store unavailable answering %s %s (%s): %s",
                scope["method"],
                scope["path"],
                request_id,
                exc,
            )
            if started:
                raise
            response = _error_response(
                ApiError(
                    503,
                    "server_error",
                    "store_unavailable",
                    "the record cannot be read now (its database is unreachable or refusing); "
                    f"retry in a moment; the server's log says why (request id {request_id})",
                ),
                request_id,
                {"retry-after": str(STORE_RETRY_AFTER_S)},
            )
            await response(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error answering %s %s", scope["method"], scope["path"])
            if started:
                raise
            response = _error_response(
                ApiError(
                    500,
                    "server_error",
                    "internal_error",
                    f"harmont-exec failed to answer this request; report it with request id "
                    f"{request_id} and the server's log",
                ),
                request_id,
            )
            await response(scope, receive, send_with_id)


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "req_unknown"))


def _error_response(
    error: ApiError, request_id: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The envelope; 401 says how to authenticate, and ``headers`` (e.g. a 405's ``Allow``)
    are kept."""
    extra = dict(headers or {})
    if error.status == 401:
        extra["www-authenticate"] = "Bearer"
    body = envelope(error.type, error.code, error.message, request_id)
    return JSONResponse(body, status_code=error.status, headers=extra or None)


def create_app(
    db: str | Path | None = None,
    *,
    store: Store | None = None,
    heartbeat_s: float = 15.0,
    poll_s: float = 0.1,
    closing: threading.Event | None = None,
    recover_every_s: float | None = None,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The ASGI app over the store at ``db`` (path or URL, default as for ``run``; opened now,
    so a bad path fails here, and closed when the app shuts down), or over an already open
    ``store`` (left open: its owner closes it). ``heartbeat_s`` and ``poll_s`` tune the live
    log stream (``live``): a comment after that long without an event, and how often it reads
    the store for new chunks; once ``closing`` is set (the server is stopping), open streams
    end. With ``recover_every_s``, builds whose executor died are finished that often while
    the app runs (``Store.recover_lost_builds``). ``cors_origins`` are the browser origins
    allowed to call the API (``serve --cors-origin``; none by default)."""
    own = store is None
    opened = open_store(db) if store is None else store

    async def recover_now_and_then(every_s: float) -> None:
        # A long-running server must not show a dead executor's build as running forever:
        # it looks for lost builds as every other command does when it opens the store.
        while True:
            await anyio.sleep(every_s)
            lost = await anyio.to_thread.run_sync(opened.recover_lost_builds, datetime.now(UTC))
            for build in lost:
                log.warning(
                    "build %s/%s #%d abandoned: its executor (%s) is gone",
                    build.org,
                    build.pipeline,
                    build.number,
                    build.executor,
                )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            async with anyio.create_task_group() as tg:
                if recover_every_s is not None:
                    tg.start_soon(recover_now_and_then, recover_every_s)
                yield
                tg.cancel_scope.cancel()
        finally:
            if own:
                opened.close()

    app = FastAPI(
        lifespan=lifespan,
        title="harmont-exec API",
        version=importlib.metadata.version("harmont-exec"),
        description="Harmont's v0 API over a harmont-exec record: Harmont's paths, operationIds "
        "and schema names. Operations marked x-harmont-extension are not in Harmont's API.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    # Outermost last: the request id first, then CORS (its refusals carry the id), then HEAD.
    app.add_middleware(HeadMiddleware)
    if cors_origins:
        app.add_middleware(CorsMiddleware, origins=tuple(cors_origins))
    app.add_middleware(RequestIdMiddleware)

    lookups = Lookups(opened)
    read = lookups.read

    def the_store() -> Store:
        return opened

    # --- errors ------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc, _request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            error = ApiError(
                405,
                "invalid_request",
                "method_not_allowed",
                f"{request.method} is not allowed on {request.url.path}; this API only reads "
                "(use GET)",
            )
        elif exc.status_code == 404:
            error = not_found(
                "not_found",
                f"no route {request.url.path}; the API lives under {API_PREFIX}/ (see "
                f"{API_PREFIX}/openapi.json)",
            )
        else:
            error = ApiError(exc.status_code, "invalid_request", "invalid_request", str(exc.detail))
        headers = dict(exc.headers or {})
        allow = headers.get("Allow") or headers.get("allow")
        if allow is not None and "GET" in allow.split(", ") and "HEAD" not in allow:
            headers["Allow"] = allow + ", HEAD"  # every GET route answers HEAD too
            headers.pop("allow", None)
        return _error_response(error, _request_id(request), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item.get("loc", ()))
            problems.append(f"{where}={item.get('input')!r}: {item.get('msg')}")
        message = "; ".join(problems) + "; fix the value in the URL and retry"
        error = ApiError(422, "invalid_request", "invalid_request", message)
        return _error_response(error, _request_id(request))

    Caller = Annotated[TokenRow, Depends(lookups.caller)]
    org_missing = lookups.org_missing
    pipeline_of = lookups.pipeline_of
    build_of = lookups.build_of
    job_of = lookups.job_of

    Limit = Annotated[int, Query(description="Page size (1-100, default 50; clamped).")]
    Cursor = Annotated[
        str | None, Query(description="Opaque cursor from a previous page's next_cursor.")
    ]

    # --- routes --------------------------------------------------------------------------

    prefix = API_PREFIX

    @app.get(
        f"{prefix}/ping",
        tags=["meta"],
        operation_id="ping",
        summary="Liveness (no auth)",
        responses={200: {"model": models.Ping}},
    )
    async def ping() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get(
        f"{prefix}/organizations",
        tags=["organizations"],
        operation_id="listOrganizations",
        summary="The organizations the token may see",
        **documented(models.OrganizationList, 400),
    )
    async def organizations(
        token: Caller, limit: Limit = 50, cursor: Cursor = None
    ) -> JSONResponse:
        after = "" if cursor is None else wire.decode_cursor(cursor, "organizations", str)
        orgs = [
            o
            for o in await read(the_store().list_organizations)
            if token.sees(o.slug) and o.slug > str(after)
        ]
        page = orgs[: clamp(limit)]
        more = len(orgs) > len(page)
        return JSONResponse(
            {
                "data": [wire.organization_json(o) for o in page],
                "next_cursor": wire.encode_cursor("organizations", page[-1].slug) if more else None,
            }
        )

    @app.get(
        f"{prefix}/organizations/{{org}}",
        tags=["organizations"],
        operation_id="getOrganization",
        summary="An organization",
        **documented(models.Organization),
    )
    async def organization(org: str, token: Caller) -> JSONResponse:
        return JSONResponse(wire.organization_json(await read(lookups.organization_of, token, org)))

    @app.get(
        f"{prefix}/user",
        tags=["user"],
        operation_id="getCurrentUser",
        summary="The token's user (locally one fixed user)",
        **documented(models.CurrentUserResponse),
    )
    async def current_user(token: Caller) -> JSONResponse:
        # The user's "personal" organization is local, unless the token may not see it: then
        # the first one it sees (so a front-end that starts there finds one).
        def first_org() -> str | None:
            if token.sees("local"):
                return "local"
            return next(
                (o.slug for o in the_store().list_organizations() if token.sees(o.slug)), None
            )

        return JSONResponse(wire.current_user_json(await read(first_org)))

    @app.get(
        f"{prefix}/organizations/{{org}}/pipelines",
        tags=["pipelines"],
        operation_id="listPipelines",
        summary="An organization's pipelines",
        **documented(models.PipelineList, 400),
    )
    async def pipelines(
        org: str, token: Caller, limit: Limit = 50, cursor: Cursor = None
    ) -> JSONResponse:
        after = "" if cursor is None else wire.decode_cursor(cursor, "pipelines", str)
        size = clamp(limit)

        def lookup() -> list[PipelineRow]:
            store = the_store()
            if not token.sees(org) or not any(o.slug == org for o in store.list_organizations()):
                raise org_missing(org)
            return store.list_pipelines(org, after=str(after), limit=size + 1)

        rows = await read(lookup)
        page = rows[:size]
        more = len(rows) > size
        return JSONResponse(
            {
                "data": [wire.pipeline_json(p) for p in page],
                "next_cursor": wire.encode_cursor("pipelines", page[-1].slug) if more else None,
            }
        )

    @app.get(
        f"{prefix}/organizations/{{org}}/pipelines/{{pipeline}}",
        tags=["pipelines"],
        operation_id="getPipeline",
        summary="A pipeline",
        **documented(models.Pipeline),
    )
    async def pipeline(org: str, pipeline: str, token: Caller) -> JSONResponse:
        def lookup() -> Any:
            pipeline_of(token, org, pipeline)
            return the_store().get_pipeline(org, pipeline)

        return JSONResponse(wire.pipeline_json(await read(lookup)))

    builds_path = f"{prefix}/organizations/{{org}}/pipelines/{{pipeline}}/builds"

    @app.get(
        builds_path,
        tags=["builds"],
        operation_id="listBuilds",
        summary="A pipeline's builds, newest first",
        **documented(models.BuildList, 400),
    )
    async def builds(
        org: str, pipeline: str, token: Caller, limit: Limit = 50, cursor: Cursor = None
    ) -> JSONResponse:
        before = None if cursor is None else int(wire.decode_cursor(cursor, "builds", int))
        size = clamp(limit)

        def lookup() -> list[BuildRow]:
            pipeline_of(token, org, pipeline)
            return the_store().builds_page(org, pipeline, before=before, limit=size + 1)

        rows = await read(lookup)
        page = rows[:size]
        more = len(rows) > size
        return JSONResponse(
            {
                "data": [wire.build_json(b) for b in page],
                "next_cursor": wire.encode_cursor("builds", page[-1].number) if more else None,
            }
        )

    @app.get(
        f"{builds_path}/{{number}}",
        tags=["builds"],
        operation_id="getBuild",
        summary="A build",
        **documented(models.Build),
    )
    async def build(org: str, pipeline: str, number: int, token: Caller) -> JSONResponse:
        return JSONResponse(wire.build_json(await read(build_of, token, org, pipeline, number)))

    @app.get(
        f"{builds_path}/{{number}}/jobs",
        tags=["jobs"],
        operation_id="listJobs",
        summary="A build's jobs, in topological order",
        **documented(models.JobList),
    )
    async def jobs(org: str, pipeline: str, number: int, token: Caller) -> JSONResponse:
        def lookup() -> list[JobText]:
            return the_store().list_jobs_text(build_of(token, org, pipeline, number).id)

        return JSONResponse({"data": [wire.job_json(j) for j in await read(lookup)]})

    @app.get(
        f"{builds_path}/{{number}}/jobs/{{job_id}}",
        tags=["jobs"],
        operation_id="getJob",
        summary="A job",
        **documented(models.Job),
    )
    async def job(org: str, pipeline: str, number: int, job_id: str, token: Caller) -> JSONResponse:
        job = await read(job_of, token, org, pipeline, number, job_id)
        return JSONResponse(wire.job_json(job))

    @app.get(
        f"{builds_path}/{{number}}/jobs/{{job_id}}/attempts",
        tags=["jobs"],
        operation_id="listJobAttempts",
        summary="A job's attempts (extension)",
        **documented(models.AttemptList, openapi_extra={"x-harmont-extension": True}),
    )
    async def attempts(
        org: str, pipeline: str, number: int, job_id: str, token: Caller
    ) -> JSONResponse:
        def lookup() -> list[AttemptRow]:
            return the_store().list_attempts(job_of(token, org, pipeline, number, job_id).id)

        return JSONResponse({"data": [wire.attempt_json(a) for a in await read(lookup)]})

    @app.get(
        f"{builds_path}/{{number}}/jobs/{{job_id}}/log",
        tags=["jobs"],
        operation_id="getJobLog",
        summary="A job's raw output, every attempt (extension)",
        openapi_extra={"x-harmont-extension": True},
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **{
                status: {"model": models.Error, "description": STATUS_TEXT[status]}
                for status in (401, 404, 422)
            },
        },
    )
    async def job_log(
        org: str, pipeline: str, number: int, job_id: str, token: Caller
    ) -> StreamingResponse:
        row = await read(job_of, token, org, pipeline, number, job_id)
        store = the_store()

        async def chunks() -> AsyncIterator[bytes]:
            after = 0
            while True:
                page = await read(partial(store.log_page, row.id, after_seq=after))
                for chunk in page:
                    yield chunk.content
                if len(page) < LOG_PAGE_ROWS:
                    return
                after = page[-1].seq

        return StreamingResponse(chunks(), media_type="text/plain")

    add_artifact_routes(app, lookups)
    add_live_log_routes(
        app, lookups, heartbeat_s=heartbeat_s, poll_s=poll_s, closing=closing or threading.Event()
    )
    add_head_routes(app)
    return app
